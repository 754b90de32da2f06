"""Reading user images: one clear message for anything that is not a usable image."""

from __future__ import annotations

import os

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import TooLargeError, UserInputError

MAX_PIXELS = 64_000_000  # beyond this, refuse instead of risking a decompression bomb


def prepare_image(image: Image.Image) -> Image.Image:
    """First frame, EXIF rotation honoured, RGB (transparency composited on white)."""
    image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserInputError(f"image file not found: {path}")
    if not os.path.isfile(path):
        raise UserInputError(f"image path is not a file: {path}")
    if os.path.getsize(path) == 0:
        raise UserInputError(f"image file is empty (0 bytes): {path}")
    return decode_image(path, path)


def decode_image(source, name: str) -> Image.Image:
    """Open a path or binary file as an RGB picture (`prepare_image`), or refuse it in one line that ends with
    `name`; the declared size is checked before any pixel is decoded."""
    too_large = f"use one of at most {MAX_PIXELS:,} pixels: {name}"
    try:
        with Image.open(source) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise TooLargeError(f"image is too large ({opened.width}x{opened.height} = "
                                    f"{opened.width * opened.height:,} pixels); {too_large}")
            opened.load()
            return prepare_image(opened)
    except UserInputError:
        raise
    except Image.DecompressionBombError as error:  # PIL refuses to open it (its limit is above MAX_PIXELS)
        raise TooLargeError(f"image is too large; {too_large}") from error
    except UnidentifiedImageError as error:
        raise UserInputError(f"not a readable image (PNG, JPEG, WebP, ...): {name}") from error
    except PermissionError as error:
        raise UserInputError(f"image file cannot be read (permission denied): {name}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise UserInputError(f"image file is corrupt or truncated: {name}") from error
