"""Sparse autoencoders: SAELens' forward definitions and format, training on two families' tiny random models,
encoding onto the map's grid, splicing through the hook points, the CLI and its errors."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lvlm_interpret import UserInputError
from lvlm_interpret.cli import main
from lvlm_interpret.sae import (
    DataSpec, SparseAutoencoder, TrainConfig, encode_image, feature_edit, load_sae, load_sae_for, save_sae,
    train_on_model, train_sae,
)
from lvlm_interpret.sae.activations import image_activations, image_site
from lvlm_interpret.sae.features import FeatureEdit, edit_hook, editing, request_layouts
from lvlm_interpret.sae.metrics import explained_variance, spliced_effect
from lvlm_interpret.evaluation.metrics import cell_mask_overlap
from lvlm_interpret.sae.probe import auroc
from tests.conftest import make_scene

STEERING_FACTOR = 16  # the clamp (x the feature's typical activation) assets/demo-sae-steer/README.md reports

TINY = TrainConfig(expansion=2, k=4, batch_size=64, max_steps=12, eval_every=4, dead_steps=3)
# the LLaVA preset's projector reads the tower's second-to-last layer (vision_feature_layer -2): block 0 of 2
HOOKS = {"llava": "vision.blocks.0.hook_resid_post", "qwen2_vl": "lm.blocks.1.hook_resid_post"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tiny models' matrices are too small to share among threads: with more than one, on a loaded 2-core
    machine, threads waiting for each other made this module ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saelens_reference(sae_in, W_enc, W_dec, b_enc, b_dec, architecture, k=None, threshold=None,
                      rescale_by_decoder_norm=False):
    """SAELens 6's documented forward, written out independently: process_sae_in subtracts b_dec, hidden_pre =
    sae_in @ W_enc + b_enc (times ||W_dec,i|| when rescaling), the activation, then decode divides the rescale
    back out and adds b_dec."""
    hidden_pre = (sae_in - b_dec) @ W_enc + b_enc
    norms = W_dec.norm(dim=-1)
    if rescale_by_decoder_norm:
        hidden_pre = hidden_pre * norms
    if architecture == "standard":
        acts = torch.relu(hidden_pre)
    elif architecture == "jumprelu":
        acts = torch.relu(hidden_pre) * (hidden_pre > threshold).to(hidden_pre.dtype)
    else:
        values, indices = torch.topk(hidden_pre, k, dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, indices, torch.relu(values))
    decoded = (acts / norms if rescale_by_decoder_norm else acts) @ W_dec + b_dec
    return acts, decoded


@pytest.mark.parametrize("architecture,rescale", [("standard", False), ("topk", False), ("topk", True),
                                                  ("jumprelu", False)])
def test_forward_equals_saelens_definition_on_the_same_weights(architecture, rescale):
    torch.manual_seed(0)
    sae = SparseAutoencoder(12, 40, architecture, k=5, rescale_acts_by_decoder_norm=rescale)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    x = torch.randn(30, 12)
    acts, out = saelens_reference(x, sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, architecture, k=5,
                                  threshold=getattr(sae, "threshold", None), rescale_by_decoder_norm=rescale)
    torch.testing.assert_close(sae.encode(x), acts)
    torch.testing.assert_close(sae(x), out)
    if architecture == "topk":
        assert ((sae.encode(x) > 0).sum(-1) <= 5).all()


def test_folded_input_scale_reads_raw_activations():
    torch.manual_seed(1)
    sae = SparseAutoencoder(8, 32, "topk", k=6)
    sae.initialise(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1)
        sae.b_dec.normal_()
    x, scale = torch.randn(20, 8) * 7, 0.37
    scaled = sae(x * scale) / scale
    features = sae.encode(x * scale)
    sae.fold_input_scale(scale)
    torch.testing.assert_close(sae(x), scaled)
    torch.testing.assert_close(sae.encode(x), features)


def test_explained_variance_is_pooled_not_a_mean_of_ratios():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 4.0]])
    x_hat = x + torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
    total = float(((x - x.mean(0)) ** 2).sum())
    assert explained_variance(x, x_hat) == pytest.approx(1 - 0.25 / total)
    assert explained_variance(x, x) == 1.0


def test_auroc_of_a_perfect_and_a_reversed_feature():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.0, 0.8]])
    labels = np.array([True, True, False, False])
    np.testing.assert_allclose(auroc(scores, labels), [1.0, 0.0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, models):
    """name -> (loaded model, folder) of an SAE trained a few steps on that family's hook."""
    folders = {}

    def get(name):
        if name not in folders:
            folder = tmp_path_factory.mktemp(f"sae-{name}")
            train_on_model(models(name), HOOKS[name], TrainConfig(**vars(TINY)), DataSpec(n=4, eval_scenes=1), folder,
                           progress=False)
            folders[name] = folder
        return models(name), folders[name]
    return get


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_training_writes_a_saelens_folder_that_loads_back(trained, name):
    loaded, folder = trained(name)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "checkpoint.pt", "metrics.json",
                                                        "sae_weights.safetensors", "top_cells.npz"]
    config = json.loads((folder / "cfg.json").read_text())
    d_in = image_activations(loaded, HOOKS[name], make_scene())[0].shape[1]
    assert config["architecture"] == "topk" and config["k"] == 4 and config["d_in"] == d_in
    assert config["d_sae"] == 2 * d_in and config["normalize_activations"] == "none"
    assert config["metadata"]["model_name"] == f"random:{name}" and config["metadata"]["hook_name"] == HOOKS[name]
    with safe_open(str(folder / "sae_weights.safetensors"), "pt") as handle:
        assert set(handle.keys()) == {"W_enc", "W_dec", "b_enc", "b_dec"}
        assert handle.get_tensor("W_enc").shape == (d_in, 2 * d_in)
        assert handle.get_tensor("W_dec").shape == (2 * d_in, d_in)
        header = handle.metadata()
    assert header["hook_name"] == HOOKS[name] and json.loads(header["seed"]) == 0
    assert json.loads(header["normalisation"])["folded"] is True
    metrics = json.loads((folder / "metrics.json").read_text())
    held = metrics["held_out"]
    assert held["l0"] <= 4 and 0 <= held["dead_fraction"] <= 1 and np.isfinite(held["explained_variance"])
    assert set(metrics["spliced"]) >= {"clean", "sae", "mean_ablated", "loss_recovered", "hook_reaches_answer"}
    assert metrics["spliced"]["hook_reaches_answer"]  # both hooks feed the answer

    # a second save of what was loaded gives the same SAE
    sae, _ = load_sae(folder)
    x = torch.randn(5, d_in)
    resaved = save_sae(sae, folder.parent / f"{name}-resaved", config["metadata"])
    torch.testing.assert_close(load_sae(resaved)[0](x), sae(x))


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_encode_gives_features_on_the_maps_grid(trained, name):
    loaded, folder = trained(name)
    bundle = load_sae_for(loaded, folder)
    image = make_scene(200, 90)
    grid = encode_image(loaded, bundle, image)
    layout = grid.site.layout
    assert grid.activations.shape == (layout.rows, layout.cols, bundle.n_features)
    assert grid.activations.dtype == np.float32 and (grid.activations >= 0).all()
    rows, site = image_activations(loaded, bundle.hook_name, image)
    cell = site.cell_rows[0]
    expected = (bundle.sae.encode(rows[cell]) * torch.as_tensor(site.cell_weights[0])[:, None]).sum(0)
    np.testing.assert_allclose(grid.activations[0, 0], expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    top = grid.top_features(0, 0, 3)
    assert [f for f, _ in top] == list(np.argsort(-grid.activations[0, 0], kind="stable")[:len(top)])


def identity_sae(d_in: int) -> SparseAutoencoder:
    """relu([x, -x]) decoded by [I; -I] gives x back exactly."""
    sae = SparseAutoencoder(d_in, 2 * d_in, "standard")
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_splicing_an_exact_reconstruction_changes_nothing(models, name):
    loaded = models(name)
    d_in = image_activations(loaded, HOOKS[name], make_scene())[0].shape[1]
    questions = [(make_scene(), "Describe the image.", None), (make_scene(120, 120), "What color is the circle?",
                                                               None)]
    result = spliced_effect(loaded, identity_sae(d_in), HOOKS[name], questions, torch.zeros(d_in))
    assert result["sae"]["answer_kept"] == 1.0
    assert result["sae"]["nll"] == pytest.approx(result["clean"]["nll"], abs=1e-4)
    assert result["mean_ablated"]["nll"] != pytest.approx(result["clean"]["nll"], abs=1e-4)  # the hook acts
    assert result["loss_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_feature_edits_keep_the_error_term_and_scale_one_feature():
    torch.manual_seed(2)
    sae = SparseAutoencoder(6, 12, "standard")
    sae.initialise(torch.Generator().manual_seed(3))
    x = torch.randn(4, 6)
    torch.testing.assert_close(feature_edit(sae, {3: 1.0})(x), x)
    features = sae.encode(x)
    zeroed = feature_edit(sae, {3: 0.0})(x)
    torch.testing.assert_close(zeroed, x - features[:, 3:4] * sae.W_dec[3])
    with pytest.raises(UserInputError, match="feature 99 is out of range"):
        feature_edit(sae, {99: 0.0})


def test_cell_edits_rewrite_only_those_cells_tokens_and_pass_the_one_token_steps(trained):
    loaded, folder = trained("qwen2_vl")
    bundle = load_sae_for(loaded, folder)
    layouts = request_layouts(loaded, [make_scene()], "Describe the image.")
    site = image_site(loaded, bundle.hook_name, layouts)
    hook = edit_hook(site, lambda rows: rows + 1.0, cells=((0, 1), (1, 0)))
    value = torch.zeros(1, int(site.rows.max()) + 5, bundle.sae.d_in)
    changed = hook(value, bundle.hook_name).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == sorted([int(layouts[0].positions[0, 1]), int(layouts[0].positions[1, 0])])
    assert hook(torch.zeros(1, 1, bundle.sae.d_in), bundle.hook_name) is None  # a generate step past the image
    with pytest.raises(UserInputError, match="cell \\[0, 99\\] is outside the"):
        edit_hook(site, lambda rows: rows, cells=((0, 99),))


def test_a_steered_request_is_explained_with_its_edit(trained, tmp_path):
    """Methods that run the model again (relevancy) run it with the request's feature edit: the steered answer's
    maps are the edited model's, and the trace keeps the edit when saved."""
    from lvlm_interpret import ExplainService, GenerationOptions, Trace, get_method

    loaded, folder = trained("llava")
    service = ExplainService(default_model="random:llava", device="cpu")
    service.saes["tiny"] = folder
    request_id, _ = service.generate([make_scene()], "Describe the image.", options=GenerationOptions(max_new_tokens=3))
    feature = service.sae_features(request_id, "tiny", k=1)["cells"][0][0][0]["feature"]
    steered = service.sae_steer(request_id, "tiny", values={feature: 200.0}, cells=[[0, 0], [1, 1]])
    trace = service.trace(steered["request_id"])
    assert trace.feature_edit == {"sae": "tiny", "scales": {}, "values": {str(feature): 200.0},
                                  "cells": [[0, 0], [1, 1]], "hook_name": HOOKS["llava"]}
    served = service.explain(steered["request_id"], "relevancy", 0).maps[0]
    edit = FeatureEdit.from_json(trace.feature_edit)
    with editing(loaded, load_sae_for(loaded, folder), edit, trace.images):
        edited = get_method("relevancy").explain(trace, 0, model=loaded).maps[0]
    unedited = get_method("relevancy").explain(trace, 0, model=loaded).maps[0]
    np.testing.assert_allclose(served, edited, rtol=1e-4, atol=1e-6)
    assert not np.allclose(served, unedited, rtol=1e-4, atol=1e-6)
    assert Trace.load(trace.save(tmp_path / "steered.safetensors")).feature_edit == trace.feature_edit
    with pytest.raises(UserInputError, match="generated with features edited already"):
        service.sae_steer(steered["request_id"], "tiny", {feature: 0.0})


@pytest.mark.parametrize("scales,values,cells,message", [
    ({}, {}, None, "name at least one feature to scale"),
    ({3: 0.0}, {3: 5.0}, None, "feature 3 is both scaled and clamped"),
    ({3: float("nan")}, {}, None, "scales: each must be a finite number"),
    ({"x": 1}, {}, None, "scales map feature numbers to numbers"),
    ({3: 0.0}, {}, [], "cells is empty"),
    ({3: 0.0}, {}, [[1]], "cells are \\[row, col\\] pairs"),
])
def test_feature_edits_refuse_bad_input_with_one_message(scales, values, cells, message):
    with pytest.raises(UserInputError, match=message):
        FeatureEdit.make("demo", scales, values, cells)


def test_training_resumes_from_its_checkpoint_exactly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(400, 8, generator=generator).half()
    owners = torch.arange(400) // 40
    config = dict(expansion=2, k=3, batch_size=32, eval_every=5, patience=100, seed=4)
    whole = train_sae(activations, owners, TrainConfig(max_steps=20, **config), tmp_path / "whole", progress=False)
    # stopped after 10 steps, then the same command with more steps goes on from the checkpoint
    train_sae(activations, owners, TrainConfig(max_steps=10, **config), tmp_path / "split", progress=False)
    resumed = train_sae(activations, owners, TrainConfig(max_steps=20, **config), tmp_path / "split", progress=False)
    assert resumed.steps == whole.steps == 20
    assert [e["step"] for e in resumed.history] == [5, 10, 15, 20]
    torch.testing.assert_close(resumed.sae.W_enc, whole.sae.W_enc)
    torch.testing.assert_close(resumed.sae.b_dec, whole.sae.b_dec)
    with pytest.raises(UserInputError, match="checkpoint of other settings"):
        train_sae(activations, owners, TrainConfig(max_steps=20, **{**config, "k": 2}), tmp_path / "split",
                  progress=False)


def test_service_and_http_backend_give_the_same_feature_views(trained):
    from fastapi.testclient import TestClient

    from lvlm_interpret import ExplainService, GenerationOptions
    from lvlm_interpret.client import RemoteService
    from lvlm_interpret.server import create_api

    loaded, folder = trained("llava")
    service = ExplainService(default_model="random:llava", device="cpu")
    service.saes["tiny"] = folder
    remote = RemoteService(client=TestClient(create_api(service)))
    views = []
    for backend in (service, remote):
        request_id, trace = backend.generate([make_scene()], "Describe the image.",
                                             options=GenerationOptions(max_new_tokens=4))
        features = backend.sae_features(request_id, "tiny", k=3)
        rows, cols = features["grid"]
        assert (rows, cols) == (trace.images[0].rows, trace.images[0].cols)
        cell = features["cells"][0][0]
        assert len(cell) <= 3 and all(e["activation"] > 0 for e in cell)
        feature = cell[0]["feature"]
        view = backend.sae_feature(request_id, "tiny", feature, top=2)
        assert np.asarray(view["map"]).shape == (rows, cols)
        assert view["map"][0][0] == pytest.approx(cell[0]["activation"], rel=1e-4)
        assert len(view["top_cells"]) == 2 and view["top_cells"][0]["patch"].startswith("data:image/png;base64,")
        assert view["top_cells"][0]["value"] >= view["top_cells"][1]["value"]
        kept = backend.sae_steer(request_id, "tiny", {feature: 1.0})
        assert kept["answer"] == kept["answer_before"] == trace.answer and not kept["answer_changed"]
        np.testing.assert_allclose(kept["maps"]["attention"]["after"], kept["maps"]["attention"]["before"], atol=1e-5)
        # the feature switched on hard everywhere: the steered request's captured maps are not the clean ones
        steered = backend.sae_steer(request_id, "tiny", values={feature: 200.0}, token_index=1)
        assert steered["answer_before"] == trace.answer and steered["token_index"] == 1
        for method in ("attention", "tam"):
            before, after = (np.asarray(steered["maps"][method][when]) for when in ("before", "after"))
            assert before.shape == after.shape == (rows, cols)
            np.testing.assert_allclose(before, backend.explain(request_id, method, 1).maps[0], rtol=1e-5, atol=1e-7)
            assert not np.allclose(before, after)
        if backend is service:  # the steered request is a request like any other: every method explains it
            np.testing.assert_allclose(steered["maps"]["tam"]["after"], service.explain(
                steered["request_id"], "tam", steered["steered_token_index"]).maps[0], rtol=1e-5, atol=1e-7)
        else:  # its id is the backend's
            body = remote._call("POST", "/v1/explain", json={"request_id": steered["request_id"], "method": "tam",
                                                             "token_index": steered["steered_token_index"]})
            np.testing.assert_allclose(steered["maps"]["tam"]["after"], body["maps"]["tam"][0], rtol=1e-5, atol=1e-7)
        with pytest.raises(UserInputError, match="unknown SAE 'nope': this service offers demo, demo-steer, tiny"):
            backend.sae_features(request_id, "nope")
        with pytest.raises(UserInputError, match="feature 9999 is out of range"):
            backend.sae_feature(request_id, "tiny", 9999)
        views.append((features, view["map"]))
    assert views[0] == views[1]


def test_cli_train_then_encode(tmp_path):
    image = tmp_path / "scene.png"
    make_scene().save(image)
    out = tmp_path / "sae"
    assert main(["sae", "train", "--model", "random:qwen2_vl", "--hook", "vision.blocks.0.hook_resid_post",
                 "--expansion", "2", "--k", "3", "--dataset", "shapes", "--n", "3", "--max-steps", "6",
                 "--batch-size", "32", "--eval-scenes", "1", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["architecture"] == "topk"
    encoded = tmp_path / "encoded"
    assert main(["sae", "encode", "--sae", str(out), "--image", str(image), "--top-k", "2", "--out",
                 str(encoded)]) == 0
    activations = np.load(encoded / "features.npz")["activations"]
    result = json.loads((encoded / "result.json").read_text())
    assert result["model"] == "random:qwen2_vl" and result["grid"] == list(activations.shape[:2])
    assert activations.shape[2] == metrics["d_sae"] and activations.dtype == np.float32
    top = result["cells"][0][0]
    assert [e["feature"] for e in top] == list(np.argsort(-activations[0, 0], kind="stable")[:len(top)])


@pytest.mark.parametrize("args,message", [
    (["train", "--hook", "lm.blocks.0.attn.hook_pattern"], "an SAE reads token activations"),
    (["train", "--hook", "lm.blocks.99.hook_resid_post"], "layer 99 is out of range"),
    (["train", "--hook", "lm.blocks.0.hook_resid_post", "--k", "0"], "--k must be at least 1"),
    (["train", "--hook", "lm.blocks.0.hook_resid_post", "--images", "x", "--n", "3"],
     "either --dataset shapes --n N or --images DIR"),
    (["train", "--hook", "lm.blocks.0.hook_resid_post", "--images", "no-such-folder"], "is not a folder"),
    (["train", "--hook", "lm.blocks.0.hook_resid_post", "--n", "1"], "--n must be at least 2"),
    (["encode", "--sae", "no-such-folder", "--image", "IMAGE"], "no such folder"),
    (["encode", "--sae", "EMPTY", "--image", "IMAGE"], "the folder has no cfg.json"),
    (["auroc", "--sae", "EMPTY", "--n-eval", "0"], "--n-select and --n-eval must be at least 1"),
])
def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys, args, message):
    image = tmp_path / "scene.png"
    make_scene().save(image)
    (tmp_path / "empty").mkdir()
    args = [{"IMAGE": str(image), "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in args]
    model = ["--model", "random:llava"] if args[0] == "train" else []
    assert main(["sae", *args, *model, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not (tmp_path / "out" / "cfg.json").exists()


def test_an_sae_of_another_width_or_architecture_gets_one_message(tmp_path, trained):
    loaded, folder = trained("qwen2_vl")
    other = save_sae(SparseAutoencoder(7, 14, "topk", k=2), tmp_path / "narrow",
                     {"model_name": "random:qwen2_vl", "hook_name": HOOKS["qwen2_vl"]})
    with pytest.raises(UserInputError, match="reads 7-wide activations but lm.blocks.1.hook_resid_post"):
        encode_image(loaded, load_sae_for(loaded, other), make_scene())
    config = json.loads((other / "cfg.json").read_text())
    (other / "cfg.json").write_text(json.dumps({**config, "architecture": "gated"}))
    with pytest.raises(UserInputError, match="gated SAEs are not supported"):
        load_sae(other)


def test_pre_6_config_loads(tmp_path):
    sae = SparseAutoencoder(6, 12, "topk", k=3)
    sae.initialise(torch.Generator().manual_seed(0))
    folder = save_sae(sae, tmp_path / "old", {"model_name": "m", "hook_name": "lm.blocks.0.hook_resid_post"})
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": 6, "d_sae": 12, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": True, "normalize_activations": "none", "model_name": "m",
        "hook_name": "lm.blocks.0.hook_resid_post"}))
    loaded_sae, config = load_sae(folder)
    assert loaded_sae.architecture == "topk" and loaded_sae.k == 3
    assert config["metadata"]["hook_name"] == "lm.blocks.0.hook_resid_post"
    x = torch.randn(3, 6)
    torch.testing.assert_close(loaded_sae(x), sae(x))


def test_features_tab_follows_the_request_and_shows_the_librarys_results(trained):
    from app import build_app
    from components import sae_panel
    from lvlm_interpret import ExplainService

    loaded, folder = trained("llava")
    service = ExplainService(default_model="random:llava", device="cpu")
    service.saes["tiny"] = folder
    image = make_scene()
    request_id, trace = service.generate([image], "Describe the image.")
    state = {"request_id": request_id, "image": image, "token": 0}
    assert sae_panel.cleared(state) == (image, None, None, sae_panel.WAITING, [], "", [])
    layout = trace.images[0]
    x0, y0, x1, y1 = layout.box
    x, y = x0 + 0.5 * (x1 - x0) / layout.cols, y0 + 0.5 * (y1 - y0) / layout.rows  # cell (0, 0)
    rows, summary, first = sae_panel.cell_features(service, state, "tiny", x, y)
    grid = encode_image(loaded, load_sae_for(loaded, folder), image, "Describe the image.")
    assert [row[0] for row in rows] == [f for f, _ in grid.top_features(0, 0, sae_panel.TOP_FEATURES)]
    assert first == rows[0][0] and summary.startswith("Cell (0, 0) at `vision.blocks.0.hook_resid_post`")
    picture, summary, tiles = sae_panel.feature_view(service, state, "tiny", first)
    assert picture.size == image.size and f"Feature **{first}**" in summary and 1 <= len(tiles) <= 8
    assert [float(caption) for _, caption in tiles] == sorted((float(c) for _, c in tiles), reverse=True)
    text, tiles = sae_panel.steer(service, state, "tiny", first, 1.0)
    assert "unchanged" in text and [caption.split(":")[0] for _, caption in tiles] == [
        "attention before", "attention after", "tam before", "tam after"]
    assert all(picture.size == image.size for picture, _ in tiles)
    with pytest.raises(UserInputError, match="outside the part of the image"):
        sae_panel.cell_features(service, state, "tiny", -5, -5)
    with pytest.raises(UserInputError, match="generate an answer first"):
        sae_panel.feature_view(service, {}, "tiny", 1)
    demo = build_app(service)
    assert any(getattr(block, "elem_id", None) == "sae-image" for block in demo.blocks.values())


@pytest.mark.parametrize("name,hook", [("demo", "lm.blocks.2.hook_resid_post"),
                                       ("demo-steer", "lm.blocks.0.hook_resid_post")])
def test_the_shipped_demo_sae_reads_the_shipped_demo_model(name, hook):
    """`--sae demo` and `--sae demo-steer`: small together, documented, and still SAEs of this demo model (a
    retrained demo model fails here)."""
    from lvlm_interpret import load_model
    from lvlm_interpret.demo.scenes import HELD_OUT_SEED_START, draw_scene
    from lvlm_interpret.sae.format import SAE_NAMES

    assert sum(p.stat().st_size for folder in SAE_NAMES.values() for p in folder.iterdir()) <= 10 * 2 ** 20
    assert {"cfg.json", "sae_weights.safetensors", "metrics.json", "top_cells.npz", "auroc.json", "README.md"} <= \
        {p.name for p in SAE_NAMES[name].iterdir()}
    loaded = load_model("demo", device="cpu")
    bundle = load_sae_for(loaded, name)
    assert bundle.model_name == "demo" and bundle.hook_name == hook
    rows = torch.cat([image_activations(loaded, bundle.hook_name, draw_scene(HELD_OUT_SEED_START + i).image)[0]
                      for i in range(3)])
    assert explained_variance(rows, bundle.sae(rows)) > 0.95


def test_steering_the_demo_steer_sae_turns_a_red_answer_blue():
    """What assets/demo-sae-steer/steering.json measures, through the service a user meets: on a held-out scene,
    the red feature zeroed and the blue one clamped on the red object's cells turn the colour answer blue, and the
    steered answer word's maps are not the clean ones."""
    from lvlm_interpret import ExplainService, GenerationOptions
    from lvlm_interpret.demo.scenes import color_prompt
    from lvlm_interpret.sae.format import SAE_NAMES
    from lvlm_interpret.sae.steering import study_questions

    study = json.loads((SAE_NAMES["demo-steer"] / "steering.json").read_text())
    red, blue = study["features"]["red"], study["features"]["blue"]
    factor = STEERING_FACTOR
    scene, index = next((scene, index) for scene, index in study_questions(study["n_scenes"])
                        if scene.objects[index].colour == "red")
    service = ExplainService(default_model="demo", device="cpu")
    prompt = color_prompt(scene.objects[index].shape)
    request_id, trace = service.generate([scene.image], prompt, options=GenerationOptions(max_new_tokens=4))
    assert trace.answer == "red"
    cells = np.argwhere(cell_mask_overlap(trace.images[0], scene.masks[index]) > 0).tolist()
    steered = service.sae_steer(request_id, "demo-steer", {red: 0.0},
                                {blue: factor * study["typical_activation"]["blue"]}, cells)
    assert steered["answer"] == "blue" and steered["token"] == "blue" and steered["token_before"] == "red"
    for method in ("attention", "tam"):
        assert not np.allclose(steered["maps"][method]["before"], steered["maps"][method]["after"])
    kept = service.sae_steer(request_id, "demo-steer", {red: 0.0}, cells=cells)  # zeroing alone: still red
    assert kept["answer"] == "red"
