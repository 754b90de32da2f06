import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from lvlm_interpret import GenerationOptions, generate_with_capture, load_model  # noqa: E402


@pytest.fixture(scope="module")
def models():
    """models(name): the tiny random preset `name`, loaded once per test module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(f"random:{name}", device="cpu")
        return cache[name]
    return get


@pytest.fixture(scope="session")
def llava():
    return load_model("random:llava", device="cpu")


@pytest.fixture(scope="session")
def qwen2_vl():
    return load_model("random:qwen2_vl", device="cpu")


def make_scene(width: int = 160, height: int = 96) -> Image.Image:
    image = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 50, 50), fill=(220, 30, 30))
    draw.rectangle((width - 50, height - 45, width - 12, height - 8), fill=(30, 60, 220))
    return image


@pytest.fixture(scope="session")
def scene():
    return make_scene()


@pytest.fixture(scope="session")
def llava_trace(llava, scene):
    return generate_with_capture(llava, [scene], "Describe the image.", GenerationOptions(max_new_tokens=6))


@pytest.fixture(scope="session")
def qwen_trace(qwen2_vl):
    return generate_with_capture(qwen2_vl, [make_scene(200, 90)], "What color is the circle?",
                                 GenerationOptions(max_new_tokens=5))
