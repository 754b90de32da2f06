"""iGOS++ (methods/igos.py): the mask reaches every family's pixels at the right place, finds the region a model
reads, lowers its objective, gives the same masks batched as one token at a time, and checks its options."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_interpret import GenerationOptions, generate_with_capture, get_method, load_image, load_model
from lvlm_interpret.cli import main
from lvlm_interpret.errors import UserInputError
from lvlm_interpret.export import shown_map
from lvlm_interpret.methods.igos import (TIE_BREAK, baseline_image, floating_inputs, mask_shape, optimise_masks,
                                        pixel_maps)
from lvlm_interpret.methods.visual_relevance import answer_logprobs_batch
from lvlm_interpret.resources import EXAMPLES_DIR
from tests.conftest import make_scene

QUIET = {"noise": 0.0}  # no IG noise: objectives comparable between iterations


class RegionReader(torch.nn.Module):
    """A hand-made model: answer token t's logit is 8 x the mean (red - blue) of the normalised pixels in
    quadrant t of the model's 64 x 64 input (quadrants in reading order), all other logits 0."""

    def __init__(self, trace, config):
        super().__init__()
        self.config = config  # the processor's checks read it
        self.sources = [trace.source_position(t) for t in range(trace.n_answer)]
        self.targets = trace.answer_ids
        self.vocabulary = config.text_config.vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter, as real models have

    def forward(self, input_ids, pixel_values, logits_to_keep=0, **unused):
        batch, length = input_ids.shape
        pixels = pixel_values.reshape(batch, 3, 64, 64)
        logits = torch.zeros(batch, length, self.vocabulary) + self.anchor
        for t, (source, target) in enumerate(zip(self.sources, self.targets)):
            rows, cols = divmod(t % 4, 2)
            region = pixels[:, :, 32 * rows:32 * rows + 32, 32 * cols:32 * cols + 32]
            logits[:, source, target] = logits[:, source, target] + 8 * (region[:, 0] - region[:, 2]).mean((1, 2))
        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        else:
            logits = logits[:, logits_to_keep]
        return SimpleNamespace(logits=logits)


def quadrant_scene() -> Image.Image:
    """A red disc in every quadrant of a light square image (so each quadrant's token has evidence)."""
    image = Image.new("RGB", (128, 128), (235, 235, 235))
    pixels = np.asarray(image).copy()
    yy, xx = np.mgrid[:128, :128]
    for cy in (32, 96):
        for cx in (32, 96):
            pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < 14 ** 2] = (220, 30, 30)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def reader(llava):
    trace = generate_with_capture(llava, [quadrant_scene()], "Describe the image.",
                                  GenerationOptions(max_new_tokens=4, min_new_tokens=4))
    assert trace.images[0].rows == 8 and trace.model_inputs["pixel_values"].shape[-2:] == (64, 64)
    return replace(llava, model=RegionReader(trace, llava.model.config)), trace


def quadrant_share(grid: np.ndarray, t: int) -> float:
    """The share of a map's mass in quadrant t of its grid."""
    rows, cols = divmod(t, 2)
    half_r, half_c = grid.shape[0] // 2, grid.shape[1] // 2
    inside = grid[rows * half_r:(rows + 1) * half_r, cols * half_c:(cols + 1) * half_c].sum()
    return float(inside / max(grid.sum(), 1e-12))


def test_the_mask_finds_the_region_the_model_reads(reader):
    loaded, trace = reader
    explanations = get_method("igos").explain_many(trace, [0, 3], model=loaded, **QUIET)
    for explanation, t in zip(explanations, [0, 3]):
        grid = explanation.maps[0]
        assert grid.shape == (8, 8) and grid.min() >= 0
        assert quadrant_share(grid, t) > 0.8, (t, grid.round(2))
        row, col = np.unravel_index(grid.argmax(), grid.shape)
        assert (row // 4, col // 4) == divmod(t, 2)


def test_cells_the_mask_leaves_equal_are_ordered_by_their_evidence(reader):
    """A mask held at 1 (a large area weight) still ranks the cells: the pointing game and the deletion order see
    the token's region first, by the last integrated gradient, and no more than TIE_BREAK of it."""
    loaded, trace = reader
    for t in (0, 3):
        fine = get_method("igos").explain(trace, t, model=loaded, area=100.0, **QUIET).details["fine_map"]
        assert 0 < fine.max() <= TIE_BREAK + 1e-7
        row, col = np.unravel_index(fine.argmax(), fine.shape)
        assert (row // 4, col // 4) == divmod(t, 2)
        assert quadrant_share(fine, t) > 0.99
        ranked = fine[fine > 0]
        assert len(np.unique(ranked)) == len(ranked) >= 4  # no ties among the cells with evidence


def test_the_objective_decreases(reader):
    loaded, trace = reader
    for options in ({**QUIET, "area": 0.0, "smoothness": 0.0, "pull": 0.0}, QUIET):
        result = optimise_masks(loaded, trace, [[1]], iterations=6, tolerance=0.0, **options)
        objective = result.objective[0]
        assert len(objective) == 6 and objective[-1] < objective[0] - 0.05, objective


def test_batched_masks_equal_one_token_at_a_time(reader):
    loaded, trace = reader
    method = get_method("igos")
    together = method.explain_many(trace, [0, 1, 2], model=loaded, chunk_size=7, iterations=3)
    for explanation in together:
        alone = method.explain(trace, explanation.token_index, model=loaded, iterations=3)
        np.testing.assert_allclose(explanation.details["fine_map"], alone.details["fine_map"], atol=1e-4)
        np.testing.assert_allclose(explanation.maps[0], alone.maps[0], atol=1e-4)
        assert explanation.details["fine_map"].max() > 0.1  # the masks moved: the comparison means something


def test_the_answer_mask_reads_the_visually_relevant_tokens_together(reader):
    loaded, trace = reader
    answer = get_method("igos").explain_answer(trace, model=loaded, iterations=3, **QUIET)
    assert answer.method == "igos_answer" and answer.details["tokens"]
    assert answer.maps[0].shape == (8, 8)
    # every chosen token reads its own quadrant: the answer's mask covers each of them
    for t in answer.details["tokens"]:
        assert quadrant_share(answer.maps[0], t % 4) > 0.1


def test_a_finer_mask_keeps_the_grid_in_maps_and_its_own_resolution_in_details(reader):
    loaded, trace = reader
    explanation = get_method("igos").explain(trace, 0, model=loaded, mask_size=16, iterations=2, **QUIET)
    assert explanation.maps[0].shape == (8, 8)
    assert explanation.details["fine_map"].shape == (16, 16) and explanation.details["mask_size"] == [16, 16]
    np.testing.assert_allclose(explanation.maps[0].mean(), explanation.details["fine_map"].mean(), rtol=1e-5)
    assert shown_map(explanation, "igos", 0) is explanation.details["fine_map"]  # overlays draw the finer mask
    assert mask_shape(3, 7, 14) == (6, 14) and mask_shape(3, 7, None) == (3, 7)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next", "idefics3", "gemma3", "qwen3_vl"])
def test_every_family_masks_its_own_pixels_where_the_image_is(models, family):
    """The pixel map read from the family's processor places every input element on the image: an image whose
    value is a known function of the position processes to that function of the decoded places."""
    loaded = models(family)
    scene = make_scene(200, 90)
    trace = generate_with_capture(loaded, [scene], "Describe the image.", GenerationOptions(max_new_tokens=2))
    width, height = scene.size
    xs, ys = np.meshgrid(np.arange(width) / (width - 1), np.arange(height) / (height - 1))
    product = Image.fromarray(np.repeat((255 * xs * ys).round().astype(np.uint8)[..., None], 3, axis=2))
    black, white, processed = (floating_inputs(loaded, trace, image) for image in
                               (Image.new("RGB", scene.size), Image.new("RGB", scene.size, (255,) * 3), product))
    x0, y0, x1, y1 = trace.images[0].box
    for name, pixel_map in pixel_maps(loaded, trace).items():
        value = ((processed[name] - black[name]) / (white[name] - black[name]))[pixel_map.inside]
        x = ((pixel_map.coordinates[:, 0] + 1) / 2 * (x1 - x0) + x0 - 0.5) / (width - 1)
        y = ((pixel_map.coordinates[:, 1] + 1) / 2 * (y1 - y0) + y0 - 0.5) / (height - 1)
        assert pixel_map.inside.any()
        assert float((value - x.clamp(0, 1) * y.clamp(0, 1)).abs().max()) < 0.02

    explanations = get_method("igos").explain_many(trace, [0, 1], model=loaded, iterations=1, ig_steps=2)
    layout = trace.images[0]
    for explanation in explanations:
        assert explanation.maps[0].shape == (layout.rows, layout.cols)
        assert np.isfinite(explanation.maps[0]).all() and explanation.maps[0].min() >= 0


@pytest.mark.parametrize("options, message", [
    ({"iterations": 0}, "iterations must be at least 1"),
    ({"ig_steps": 0}, "ig_steps must be at least 1"),
    ({"mask_size": 0}, "mask_size must be between 1 and 256"),
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"area": -1.0}, "area must be a non-negative number"),
    ({"smoothness": float("nan")}, "smoothness must be a non-negative number"),
    ({"baseline": "gray"}, "baseline must be one of auto, blur, hue_blur, hue, grey, mean, got 'gray'"),
])
def test_bad_option_values_say_what_to_change(llava, llava_trace, options, message):
    with pytest.raises(UserInputError, match=message):
        get_method("igos").explain(llava_trace, 0, model=llava, **options)


def test_options_are_checked_against_the_signature():
    method = get_method("igos")
    assert {"iterations", "mask_size", "ig_steps", "lr", "area", "smoothness", "seed"} <= set(method.option_names())
    with pytest.raises(UserInputError, match="igos has no option 'steps'"):
        method.check_options({"steps": 3})
    with pytest.raises(UserInputError, match="option iterations must be a whole number"):
        method.check_options({"iterations": 2.5})
    with pytest.raises(UserInputError, match="igos needs the model"):
        method.explain_answer(None, model=None)


def test_the_hue_baselines_remove_a_colour_the_blur_keeps():
    """The demo model says "blue" of the example's blue circle as surely on the blurred image (a blurred solid shape
    keeps its colour) and on a grey one (the language prior fills in the second colour), so those baselines give
    the mask nothing to find; turning the hues takes the colour away, and its blurred copy the shape too."""
    loaded = load_model("demo")
    image = load_image(EXAMPLES_DIR / "green-square-blue-circle.png")
    trace = generate_with_capture(loaded, [image], "Describe the image.", GenerationOptions(max_new_tokens=16))
    words = [text.strip() for text in trace.answer_texts]
    blue, square = words.index("blue"), words.index("square")
    kinds = ("blur", "grey", "hue", "hue_blur")
    logprobs = answer_logprobs_batch(loaded, trace, [[image]] + [[baseline_image(image, kind)] for kind in kinds])
    drop = {kind: (logprobs[0] - row).tolist() for kind, row in zip(kinds, logprobs[1:])}
    assert drop["blur"][blue] < 0.1 and drop["grey"][blue] < 0.1, drop
    assert drop["hue"][blue] > 2 and drop["hue_blur"][blue] > 1 and drop["hue_blur"][square] > 2, drop
    explanation = get_method("igos").explain(trace, blue, model=loaded, baseline="hue_blur", iterations=2)
    assert explanation.details["options"]["baseline"] == "hue_blur" and explanation.maps[0].max() > 0.1
    # "auto": each mask takes the baseline that removes its word (the colour's hue, the shape's blur), and the
    # answer-level mask takes the colour the blur keeps among its tokens
    method = get_method("igos")
    colour, shape = method.explain_many(trace, [blue, square], model=loaded, baseline="auto", iterations=1)
    assert (colour.details["baseline"], shape.details["baseline"]) == ("hue", "blur")
    answer = method.explain_answer(trace, model=loaded, baseline="auto", iterations=1)
    assert {blue, square} <= set(answer.details["tokens"]) and "the blur or hue" in answer.details["chosen_by"]
    assert blue not in method.explain_answer(trace, model=loaded, baseline="blur", iterations=1).details["tokens"]


def test_explain_writes_every_token_mask_the_answer_mask_and_their_record(tmp_path):
    scene = tmp_path / "scene.png"
    make_scene(160, 96).save(scene)
    out = tmp_path / "run"
    assert main(["explain", "--model", "random:llava", "--image", str(scene), "--prompt", "Describe the image.",
                 "--max-new-tokens", "4", "--methods", "igos", "--tokens", "0,2", "--option", "igos.iterations=2",
                 "--option", "igos.mask_size=16", "--png", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    maps = np.load(out / "maps.npz")
    rows, cols = result["image"]["grid"]
    assert maps["igos"].shape == (2, rows, cols) and maps["igos_answer"].shape == (1, rows, cols)
    summary = result["igos"]
    assert summary["mask_size"] == [16, 16] and summary["iterations"] <= 2 and summary["tokens"]
    assert all(0 <= t < len(result["answer_tokens"]) for t in summary["tokens"])
    assert np.isfinite([summary["deletion_auc"], summary["insertion_auc"]]).all()
    assert result["method_options"]["igos"] == {"iterations": 2, "mask_size": 16}
    pictures = {path.name for path in (out / "overlays").iterdir()}
    assert pictures == {"igos_token0.png", "igos_token2.png", "igos_answer.png"}


def test_a_wrong_option_fails_before_the_model_loads(tmp_path, capsys):
    assert main(["explain", "--model", "random:llava", "--image", "missing.png", "--prompt", "Describe.",
                 "--methods", "igos", "--option", "igos.iteration=2", "--out", str(tmp_path / "x")]) == 2
    assert "igos has no option 'iteration'" in capsys.readouterr().err


def test_http_serves_token_masks_and_the_answer_mask_as_in_process():
    from fastapi.testclient import TestClient

    from lvlm_interpret import ExplainService
    from lvlm_interpret.client import RemoteService
    from lvlm_interpret.server import create_api

    service = ExplainService(default_model="random:llava", device="cpu")
    remote = RemoteService(client=TestClient(create_api(service)))
    options = {"iterations": 2, "mask_size": 12}
    for backend in (service, remote):
        request_id, _ = backend.generate([make_scene(160, 96)], "Describe the image.")
        token = backend.explain(request_id, "igos", 1, **options)
        answer = backend.explain_answer(request_id, "igos", **options)
        assert token.method == "igos" and answer.method == "igos_answer"
        assert np.asarray(token.details["fine_map"]).shape == (12, 12) and answer.maps[0].shape == (8, 8)
        assert backend.explain_answer(request_id, "igos", **options) is answer or backend is remote  # cached
        if backend is service:
            expected = token.maps[0], answer.maps[0]
        else:
            np.testing.assert_allclose(token.maps[0], expected[0], atol=1e-6)
            np.testing.assert_allclose(answer.maps[0], expected[1], atol=1e-6)
        # in process the method says so; over HTTP the schema offers igos only
        with pytest.raises(UserInputError, match="tam has no answer-level map|choose one of 'igos'"):
            backend.explain_answer(request_id, "tam")


def test_the_page_shows_the_answer_map_until_a_token_is_picked_and_follows_the_iterations():
    from components.method_panel import method_names, render_method
    from lvlm_interpret import ExplainService

    assert "igos" in method_names()
    service = ExplainService(default_model="random:llava", device="cpu")
    scene = make_scene(160, 96)
    request_id, trace = service.generate([scene], "Describe the image.")
    fractions = []
    picture, names, shown, summary, *_ = render_method(service, request_id, scene, None, "igos",
                                                       progress=lambda fraction, desc: fractions.append(fraction))
    assert shown == "igos_answer" and "visually relevant tokens together" in summary
    assert fractions and fractions == sorted(fractions) and 0 < fractions[-1] <= 1
    fractions.clear()
    render_method(service, request_id, scene, None, "igos", progress=lambda fraction, desc: fractions.append(fraction))
    assert not fractions  # cached: nothing recomputed
    picture, names, shown, summary, *_ = render_method(service, request_id, scene, 1, "igos")
    assert shown == "igos" and names == [("iGOS++ saliency (1 - optimised mask)", "igos")]
    # other methods show token 0 before a token is picked, as before
    assert render_method(service, request_id, scene, None, "tam")[2] == "tam"


def test_cancel_stops_the_running_mask_at_the_next_iteration_and_keeps_nothing():
    from components.method_panel import Cancellations, render_method
    from lvlm_interpret import ExplainService

    service = ExplainService(default_model="random:llava", device="cpu")
    scene = make_scene(160, 96)
    request_id, _ = service.generate([scene], "Describe the image.")
    cancellations = Cancellations()
    options = {"iterations": 4, "tolerance": 0.0}
    seen = []

    def press_cancel_during_the_run(fraction, desc):
        seen.append(fraction)
        cancellations.ask("page-a")

    with pytest.raises(UserInputError, match=r"cancelled \(igos: iteration 2 of 4\)"):
        render_method(service, request_id, scene, None, "igos", options=options,
                      progress=cancellations.progress(press_cancel_during_the_run, "page-a"))
    assert seen == [0.25]  # pressed while the first iteration showed: the second is the last that ran
    cancellations.ask("page-a")  # a Cancel pressed while nothing runs does not stop the next run
    cancellations.ask("page-b")  # nor does another page's
    fractions = []
    render_method(service, request_id, scene, None, "igos", options=options,
                  progress=cancellations.progress(lambda fraction, desc: fractions.append(fraction), "page-a"))
    assert fractions == [0.25, 0.5, 0.75, 1.0]  # computed again in full: the cancelled run cached nothing


def test_the_page_cancel_button_stops_the_method_events():
    from app import build_app
    from lvlm_interpret import ExplainService

    page = build_app(ExplainService(default_model="random:llava", device="cpu"))
    button = next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == "method-cancel")
    method = next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == "method")
    triggered = [f for f in page.fns.values() if (button._id, "click") in [tuple(t) for t in f.targets]]
    canceller = next(f for f in triggered if f.cancels)
    on_cancel = next(f for f in triggered if f.name == "on_cancel")
    cancelled = [page.fns[i] for i in canceller.cancels]
    assert {f.name for f in cancelled} == {"on_method"}
    assert any((method._id, "input") in [tuple(t) for t in f.targets] for f in cancelled)
    assert on_cancel.concurrency_id != cancelled[0].concurrency_id  # runs while the method it stops does


def test_a_named_job_reports_its_iterations_and_stops_on_cancel_over_http():
    """POST /v1/explain with a job id: GET /v1/jobs/{job} follows the iterations, POST .../cancel stops the mask at
    the next one (400 "cancelled", nothing cached); a malformed id is one 400 line, an unknown one 404."""
    import threading

    from fastapi.testclient import TestClient

    from lvlm_interpret import ExplainService
    from lvlm_interpret.server import create_api

    service = ExplainService(default_model="random:llava", device="cpu")
    client = TestClient(create_api(service))
    request_id, _ = service.generate([make_scene(160, 96)], "Describe the image.")
    job = "a" * 16 + "-job-one"
    body = {"request_id": request_id, "method": "igos", "token_index": 1, "job": job,
            "options": {"iterations": 40, "tolerance": 0.0}}
    answered = {}
    call = threading.Thread(target=lambda: answered.update(response=client.post("/v1/explain", json=body)))
    call.start()
    seen = []
    while call.is_alive() and not (seen and seen[-1]["done"] >= 2):
        status = client.get(f"/v1/jobs/{job}")
        if status.status_code == 200:
            seen.append(status.json())
    cancelled = client.post(f"/v1/jobs/{job}/cancel")
    call.join(60)
    assert cancelled.status_code == 200 and cancelled.json()["cancelling"] is True
    assert seen[-1]["total"] == 40 and [s["done"] for s in seen] == sorted(s["done"] for s in seen)
    response = answered["response"]
    assert response.status_code == 400 and response.json()["error"].startswith("cancelled after step")
    assert int(response.json()["error"].split()[3]) < 40  # stopped early
    assert client.get(f"/v1/jobs/{job}").status_code == 404  # ended
    assert client.post(f"/v1/jobs/{job}/cancel").status_code == 404
    bad = client.get("/v1/jobs/short")
    assert bad.status_code == 400 and "job" in bad.json()["error"]
    bad = client.post("/v1/explain", json={**body, "job": "no spaces allowed here"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("job:")
    # nothing was cached: the same call without a job runs every iteration
    steps = []
    from lvlm_interpret.progress import reporting_progress
    with reporting_progress(lambda done, total: steps.append(done)):
        service.explain(request_id, "igos", 1, **body["options"])
    assert steps == list(range(1, 41))


def test_a_page_on_a_backend_follows_the_iterations_and_its_cancel_stops_the_backend():
    """RemoteService inside `reporting_progress` (the page's progress bar): the backend's iterations reach the
    reporter; a reporter that raises (Cancel) stops the mask on the backend, which keeps nothing."""
    from fastapi.testclient import TestClient

    from lvlm_interpret import ExplainService
    from lvlm_interpret.client import RemoteService
    from lvlm_interpret.progress import reporting_progress
    from lvlm_interpret.server import create_api

    service = ExplainService(default_model="random:llava", device="cpu")
    remote = RemoteService(client=TestClient(create_api(service)))
    request_id, _ = remote.generate([make_scene(160, 96)], "Describe the image.")
    options = {"iterations": 30, "tolerance": 0.0}

    class Stop(Exception):
        pass

    def stop_at_the_third(done, total):
        steps.append((done, total))
        if done >= 3:
            raise Stop

    steps = []
    with pytest.raises(Stop), reporting_progress(stop_at_the_third):
        remote.explain_answer(request_id, "igos", **options)
    assert steps[0][1] == 30 and steps[-1][0] >= 3 and steps[-1][0] < 30
    steps = []
    with reporting_progress(lambda done, total: steps.append((done, total))):
        answer = remote.explain_answer(request_id, "igos", **options)
    assert answer.details["iterations"] == 30  # computed again in full: the cancelled run kept nothing
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1][1] == 30  # polled while it ran
