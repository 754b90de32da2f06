"""Every kind of image file a user may have is read as the RGB picture they see, or refused in one line."""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lvlm_interpret import UserInputError, load_image
from lvlm_interpret.images import MAX_PIXELS, decode_image


def _save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "LA", "1"])
def test_modes_become_rgb(tmp_path, mode):
    source = Image.new("RGB", (40, 30), (200, 50, 50)).convert(mode)
    path = _save(tmp_path, source, "x.tiff" if mode == "CMYK" else "x.png")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_transparency_is_composited_on_white(tmp_path):
    source = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert np.asarray(load_image(_save(tmp_path, source, "t.png")))[0, 0].tolist() == [255, 255, 255]


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (12, 12), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(path))[0, 0].tolist()[0] > 200  # red, the first frame


def test_exif_rotation_is_honoured(tmp_path):
    source = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = source.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: the picture is 20 wide and 40 high
    path = _save(tmp_path, source, "r.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize("case,message", [("empty", "empty"), ("text", "not a readable image"),
                                          ("truncated", "corrupt or truncated"), ("folder", "not a file"),
                                          ("missing", "not found")])
def test_bad_files_are_refused_in_one_line(tmp_path, case, message):
    path = tmp_path / "bad.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello")
    elif case == "truncated":
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue()[:60])
    elif case == "folder":
        path.mkdir()
    with pytest.raises(UserInputError, match=message) as error:
        load_image(path)
    assert "\n" not in str(error.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 100
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # tiny file, huge declared size
    assert path.stat().st_size < 2_000_000
    with pytest.raises(UserInputError, match="too large"):
        load_image(path)


def _encoded(format_name: str) -> bytes:
    """A small picture with two colours and an EXIF orientation, encoded as `format_name`."""
    image = Image.new("RGB", (24, 16), (240, 240, 240))
    image.paste((200, 30, 30), (2, 2, 12, 12))
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **({"exif": exif} if format_name in ("JPEG", "PNG", "WEBP") else {}))
    return buffer.getvalue()


VALID_FILES = {name: _encoded(name) for name in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")}


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(sorted(VALID_FILES)),
       edits=st.lists(st.tuples(st.integers(0, 2 ** 16), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 2 ** 16)), inserted=st.binary(max_size=32),
       at=st.integers(0, 2 ** 16))
def test_fuzzed_image_bytes_are_read_or_refused_in_one_line(name, edits, cut, inserted, at):
    """Mutated files of every format (bytes overwritten, cut short, bytes inserted) through the one decoder the
    CLI, the API and the HTTP backend share: an RGB picture or one UserInputError, nothing else."""
    data = bytearray(VALID_FILES[name])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    position = at % (len(data) + 1)
    data[position:position] = inserted
    try:
        image = decode_image(io.BytesIO(bytes(data)), "the uploaded file")
    except UserInputError as error:
        assert "\n" not in str(error) and str(error).endswith("the uploaded file")
        return
    assert image.mode == "RGB" and image.width * image.height <= MAX_PIXELS


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=256))
def test_random_bytes_are_refused_in_one_line(data):
    with pytest.raises(UserInputError):
        decode_image(io.BytesIO(data), "the uploaded file")
