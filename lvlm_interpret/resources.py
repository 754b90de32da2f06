"""Where the shipped data lies: configs/ and assets/ at the top of a checkout, or inside the installed package.

`pip install .` copies the two folders into the package as `lvlm_interpret/_configs` and `lvlm_interpret/_assets`
(pyproject.toml maps them), so the library finds its presets and the demo model from any directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CHECKOUT_ROOT = Path(__file__).resolve().parents[1]


def shipped(folder: str) -> Path:
    """The shipped `folder` ("configs" or "assets"): the installed package's copy, else the checkout's."""
    installed = resources.files("lvlm_interpret") / f"_{folder}"
    if installed.is_dir():
        return Path(str(installed))
    return CHECKOUT_ROOT / folder


CONFIGS_DIR = shipped("configs")
ASSETS_DIR = shipped("assets")
EXAMPLES_DIR = ASSETS_DIR / "examples"
