"""Generation panel: image, prompt, example scenes, model picker and generation options."""

from __future__ import annotations

import json
from dataclasses import dataclass

import gradio as gr

from lvlm_interpret import ExplainBackend, GenerationOptions, UserInputError
from lvlm_interpret.images import decode_image, prepare_image
from lvlm_interpret.models.loading import BUILTIN_MODELS, RANDOM_PREFIX, random_presets
from lvlm_interpret.resources import EXAMPLES_DIR

EXAMPLES_FILE = EXAMPLES_DIR / "examples.json"
DEFAULT_PROMPT = "Describe the image."


def examples() -> list[list[str]]:
    """[image path, prompt] pairs of the example scenes shipped in assets/examples."""
    if not EXAMPLES_FILE.is_file():
        return []
    return [[str(EXAMPLES_FILE.parent / item["image"]), item["prompt"]]
            for item in json.loads(EXAMPLES_FILE.read_text())]


MODEL_NOTES = {"demo": "demo: 4.4 M parameters, trained here on coloured shapes only; it does not understand "
                       "photographs",
               "demo-qwen2_vl": "demo-qwen2_vl: a second demo model (Qwen2-VL family), 4.7 M parameters, trained "
                                "here on the same coloured shapes only"}


def model_choices(default: str, allowed: list[str] | None = None) -> list[tuple[str, str]]:
    """(label, name) pairs: the default first, then the built-in and random presets (only the allowed ones in
    hosted mode); the labels say what each model is."""
    names = [default, *allowed] if allowed is not None else \
        [default, *BUILTIN_MODELS, *(RANDOM_PREFIX + p for p in random_presets())]
    return [(model_label(name), name) for name in dict.fromkeys(names)]


def model_label(name: str) -> str:
    if name.startswith(RANDOM_PREFIX):
        return f"{name} (untrained, random weights: for tests)"
    return MODEL_NOTES.get(name, name)


def decoded_by_the_product(image: gr.Image) -> gr.Image:
    """Uploads to `image` go through the product's own decoder (declared size checked first, first frame, EXIF
    rotation, RGB), so a file that is no usable image is one clear notice in the page, not Gradio's bare error.
    (An instance override: subclassing a Gradio component makes Gradio write a .pyi stub next to this file.)"""
    gradio_preprocess = image.preprocess

    def preprocess(payload):
        if payload is None or payload.path is None:
            return gradio_preprocess(payload)
        try:
            return decode_image(payload.path, f"the uploaded file {payload.orig_name or ''}".strip())
        except UserInputError as error:
            raise gr.Error(str(error)) from None

    image.preprocess = preprocess
    return image


@dataclass
class GenerationPanel:
    image: gr.Image
    prompt: gr.Textbox
    model: gr.Dropdown
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    button: gr.Button
    examples: gr.Examples | None  # picking one loads it and generates

    @classmethod
    def build(cls, default_model: str, allowed_models: list[str] | None = None,
              max_new_tokens: int = 128) -> "GenerationPanel":
        with gr.Column():
            image = decoded_by_the_product(gr.Image(type="pil", label="Image", image_mode=None, height=320,
                                                    elem_id="input-image"))
            prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=1, elem_id="prompt")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            scenes = gr.Examples(examples(), inputs=[image, prompt], label="Example scenes (pick one: it runs)") \
                if examples() else None
            model = gr.Dropdown(model_choices(default_model, allowed_models), value=default_model,
                                label="Model", elem_id="model")
            with gr.Accordion("Generation options", open=False):
                max_new_tokens = gr.Slider(1, max_new_tokens, value=min(32, max_new_tokens), step=1,
                                           label="Max new tokens")
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p (when sampling)")
        return cls(image, prompt, model, max_new_tokens, temperature, top_p, button, scenes)

    def inputs(self) -> list:
        return [self.image, self.prompt, self.model, self.max_new_tokens, self.temperature, self.top_p]


def run_generation(service: ExplainBackend, image, prompt: str, model: str | None = None, max_new_tokens: int = 32,
                   temperature: float = 0.0, top_p: float = 1.0) -> tuple[str, object]:
    """Generate for one uploaded image; returns the request id and its Trace. Raises UserInputError."""
    if image is None:
        raise UserInputError("upload an image first (or pick an example scene)")
    options = GenerationOptions.from_temperature(int(max_new_tokens), float(temperature), float(top_p))
    return service.generate([prepare_image(image)], prompt, model=model or None, options=options)
