import numpy as np
import pytest

from lvlm_interpret.families.base import ImageLayout
from lvlm_interpret.rendering import blend, normalise, overlay


def test_overlay_is_the_original_size_and_covers_only_the_box():
    layout = ImageLayout.contiguous(0, 2, 2, box=(50.0, 0.0, 150.0, 100.0), image_size=(200, 100))
    grid = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)
    image = overlay(grid, layout, alpha=0.5)
    assert image.size == (200, 100) and image.mode == "RGBA"
    alpha = np.asarray(image)[..., 3]
    assert not alpha[:, :50].any() and not alpha[:, 150:].any()
    assert (alpha[:, 50:150] == 128).all()
    pixels = np.asarray(image)[..., :3].astype(int)
    # brighter colour where the map is higher (inferno is dark at 0, bright at 1)
    assert pixels[25, 125].sum() > pixels[25, 75].sum()


def test_ignore_top_saturates_sinks_and_rescales_the_rest():
    grid = np.array([[100.0, 1.0], [0.5, 0.0]])
    assert normalise(grid)[0, 1] == pytest.approx(0.01)
    scaled = normalise(grid, ignore_top=1)
    assert scaled[0, 0] == 1.0 and scaled[0, 1] == 1.0 and scaled[1, 0] == pytest.approx(0.5)
    assert not normalise(np.zeros((2, 2))).any()


def test_blend_keeps_the_image_size(scene):
    layout = ImageLayout.contiguous(0, 3, 4, box=(0, 0, *scene.size), image_size=scene.size)
    assert blend(scene, overlay(np.random.rand(3, 4), layout)).size == scene.size
