"""Analyses (Neo et al.): hook points, mean / zero ablation, attention knockout, logit lens, their CLI."""

import json

import numpy as np
import pytest
import torch

from lvlm_interpret import UserInputError, load_model
from lvlm_interpret.analysis.ablation import (
    ablate, load_mean_embedding, mean_visual_embedding, replace_embeddings, save_mean_embedding,
)
from lvlm_interpret.analysis.hooks import hook_point_names, hooked, run_with_cache, run_with_hooks
from lvlm_interpret.analysis.knockout import knockout, knockout_hooks, window_layers
from lvlm_interpret.analysis.logit_lens import logit_lens
from lvlm_interpret.analysis.token_sets import (
    box_mask, grow, image_embedding_norms, object_tokens, positions_to_cells, random_tokens, register_tokens,
    select_tokens,
)
from lvlm_interpret.capture import replay_inputs
from lvlm_interpret.cli import main
from tests.conftest import make_scene


@pytest.fixture(params=["llava", "qwen"])
def model_and_trace(request, llava, llava_trace, qwen2_vl, qwen_trace):
    return (llava, llava_trace) if request.param == "llava" else (qwen2_vl, qwen_trace)


def test_cache_equals_the_models_own_hidden_states(model_and_trace):
    loaded, trace = model_and_trace
    output, cache = run_with_cache(loaded, trace)
    reference = loaded.model(**replay_inputs(trace), output_hidden_states=True, use_cache=False)
    n_layers = len(loaded.family.language_layers(loaded.model))
    torch.testing.assert_close(cache["lm.hook_embed"], reference.hidden_states[0])
    for layer in range(n_layers - 1):  # hidden_states[L + 1] is layer L's output; the last one is normalised
        torch.testing.assert_close(cache[f"lm.blocks.{layer}.hook_resid_post"], reference.hidden_states[layer + 1])
        torch.testing.assert_close(cache[f"lm.blocks.{layer + 1}.hook_resid_pre"], reference.hidden_states[layer + 1])
    torch.testing.assert_close(cache["lm.ln_final.hook_normalized"], reference.hidden_states[-1])
    torch.testing.assert_close(cache["lm.hook_logits"], reference.logits)
    torch.testing.assert_close(output.logits, reference.logits)
    assert any(name.startswith("vision.blocks.") for name in cache)


def test_zeroing_a_hook_point_changes_the_output(model_and_trace):
    loaded, trace = model_and_trace
    plain = run_with_hooks(loaded, trace, []).logits
    for name in ("lm.blocks.0.hook_attn_out", "vision.blocks.0.hook_resid_post"):
        zeroed = run_with_hooks(loaded, trace, [(name, lambda value, _: torch.zeros_like(value))]).logits
        assert (zeroed - plain).abs().max() > 1e-4, name
    # a hook that returns None leaves the forward as it was
    torch.testing.assert_close(run_with_hooks(loaded, trace, [("lm.blocks.0.hook_mlp_out", lambda v, n: None)]).logits,
                               plain)


def test_bad_hook_names_and_read_only_patterns(llava):
    assert "lm.blocks.1.attn.hook_pattern" in hook_point_names(llava)
    for name in ("lm.blocks.99.hook_resid_post", "lm.blocks.0.hook_nothing", "resid"):
        with pytest.raises(UserInputError):
            with hooked(llava, [(name, lambda v, n: None)]):
                pass
    with pytest.raises(UserInputError, match="read-only"):
        with hooked(llava, [("lm.blocks.0.attn.hook_pattern", lambda v, n: None)]):
            pass


def _blocked(trace):
    layout = trace.images[0]
    return trace.source_position(0), layout.positions[:2].ravel().tolist()


def test_knocked_out_cells_get_zero_attention_with_bool_masks(model_and_trace):
    loaded, trace = model_and_trace
    query, keys = _blocked(trace)
    names = [f"lm.blocks.{layer}.attn.hook_pattern" for layer in range(3)]
    _, plain = run_with_cache(loaded, trace, names)
    _, cache = run_with_cache(loaded, trace, names, hooks=knockout_hooks([1], [query], keys))
    assert cache[names[1]][0][:, query, keys].abs().max() == 0  # blocked in the window
    assert plain[names[1]][0][:, query, keys].abs().max() > 0
    torch.testing.assert_close(cache[names[1]][0][:, query].sum(-1), torch.ones(trace.n_heads))  # still rows
    torch.testing.assert_close(cache[names[0]], plain[names[0]])  # before the window: untouched
    torch.testing.assert_close(cache[names[1]][0][:, query - 1], plain[names[1]][0][:, query - 1])  # other query


def test_knocked_out_cells_get_zero_attention_with_additive_float_masks(llava_trace):
    eager = load_model("random:llava", device="cpu")  # the same seeded weights as the trace's model
    eager.model.set_attn_implementation("eager")  # transformers' eager path: additive float masks
    trace = llava_trace
    query, keys = _blocked(trace)
    _, cache = run_with_cache(eager, trace, ["lm.blocks.1.attn.hook_mask"], hooks=knockout_hooks([1], [query], keys))
    mask = cache["lm.blocks.1.attn.hook_mask"]
    assert mask.dtype.is_floating_point and (mask[0, 0, query, keys] == torch.finfo(mask.dtype).min).all()
    with hooked(eager, knockout_hooks([1], [query], keys)):
        weights = eager.model(**replay_inputs(trace), output_attentions=True, use_cache=False).attentions
    assert weights[1][0][:, query, keys].abs().max() == 0
    assert weights[0][0][:, query, keys].abs().max() > 0


def test_knockout_windows_and_result(llava, llava_trace):
    assert [window_layers(w, 32) for w in ("early", "middle", "late")] == \
        [list(range(0, 10)), list(range(10, 20)), list(range(20, 32))]
    assert window_layers("1-2", 3) == [1, 2]
    with pytest.raises(UserInputError):
        window_layers("2-7", 3)
    _, keys = _blocked(llava_trace)
    result = knockout(llava, llava_trace, keys, windows=["early", "0-2"])
    assert [w.layers for w in result.windows] == [[0], [0, 1, 2]]
    assert abs(result.prob_before - float(np.exp(llava_trace.answer_logprobs[0]))) < 1e-4
    assert len(result.drops()) == 2 and result.to_json()["relative_drop"]


def test_ablation_replaces_exactly_the_chosen_embeddings(model_and_trace):
    loaded, trace = model_and_trace
    positions = trace.images[0].positions.ravel()[[0, 3, 5]].tolist()
    value = torch.arange(loaded.model.config.get_text_config().hidden_size, dtype=torch.float32)
    _, plain = run_with_cache(loaded, trace, ["lm.hook_embed"])
    _, cache = run_with_cache(loaded, trace, ["lm.hook_embed"], hooks=[("lm.hook_embed",
                                                                       replace_embeddings(positions, value))])
    before, after = plain["lm.hook_embed"][0], cache["lm.hook_embed"][0]
    others = [p for p in range(before.shape[0]) if p not in positions]
    assert (after[positions] == value).all()
    assert torch.equal(after[others], before[others])
    zero = ablate(loaded, trace, positions, "zero", regenerate=False)
    assert zero.positions == positions and zero.prob_after != zero.prob_before


def test_ablation_regenerates_and_checks_its_inputs(llava, llava_trace):
    mean, count = mean_visual_embedding(llava, [make_scene(), make_scene(90, 120)])
    assert count == 2 * 64 and mean.shape == (64,)
    every = llava_trace.images[0].positions.ravel().tolist()
    result = ablate(llava, llava_trace, every, "mean", mean)
    assert result.answer_before == llava_trace.answer and isinstance(result.answer_after, str)
    with pytest.raises(UserInputError):
        ablate(llava, llava_trace, every, "mean", None)
    with pytest.raises(UserInputError):
        ablate(llava, llava_trace, [0], "zero")  # not an image token


@pytest.mark.parametrize("replacement", ["zero", "mean"])
def test_ablating_qwen3_vl_image_tokens_also_replaces_their_deepstack_features(models, monkeypatch, replacement):
    from lvlm_interpret import GenerationOptions, generate_with_capture

    loaded = models("qwen3_vl")
    trace = generate_with_capture(loaded, [make_scene(200, 90)], "Describe the image.",
                                  GenerationOptions(max_new_tokens=2, min_new_tokens=2))
    decoder = loaded.family.language_model(loaded.model)
    seen, original = [], decoder._deepstack_process

    def record(hidden_states, visual_pos_masks, visual_embeds):
        seen.append(visual_embeds.detach().clone())
        return original(hidden_states, visual_pos_masks, visual_embeds)

    monkeypatch.setattr(decoder, "_deepstack_process", record)
    cells = trace.images[0].cell_positions.tolist()
    mean = torch.zeros(loaded.model.config.get_text_config().hidden_size)
    result = ablate(loaded, trace, [cells[1], cells[4]], replacement, mean, regenerate=True)
    plain, ablated, regenerated = seen[0], seen[1], seen[2]  # before, after, the regeneration's prompt forward
    expected = torch.zeros(2, plain.shape[1]) if replacement == "zero" else plain.mean(0).expand(2, -1)
    for features in (ablated, regenerated):
        torch.testing.assert_close(features[[1, 4]], expected)
        kept = [r for r in range(plain.shape[0]) if r not in (1, 4)]
        torch.testing.assert_close(features[kept], plain[kept])
    assert result.prob_after != result.prob_before


def test_mean_embedding_file_round_trip(tmp_path, llava):
    path = tmp_path / "mean.safetensors"
    save_mean_embedding(path, torch.ones(64), {"model": "random:llava"})
    assert torch.equal(load_mean_embedding(path, llava), torch.ones(64))
    save_mean_embedding(path, torch.ones(7), {})
    with pytest.raises(UserInputError, match="hidden size"):
        load_mean_embedding(path, llava)


def test_patch_buffer_grows_a_region():
    cells = np.zeros((6, 6), dtype=bool)
    cells[2, 3] = True
    assert grow(cells, 0).sum() == 1
    assert grow(cells, 1).sum() == 9 and grow(cells, 1)[1:4, 2:5].all()
    assert grow(cells, 2).sum() == 25 and grow(cells, 2)[0:5, 1:6].all()
    edge = np.zeros((6, 6), dtype=bool)
    edge[2, 5] = True
    assert grow(edge, 2).sum() == 5 * 3  # clipped at the right edge
    corner = np.zeros((4, 4), dtype=bool)
    corner[0, 0] = True
    assert grow(corner, 1).sum() == 4


def test_object_tokens_from_a_box_and_token_sets(llava, llava_trace):
    layout = llava_trace.images[0]  # 8x8 grid over x 32..128, y 0..96 of a 160x96 image (12 px cells)
    mask = box_mask(layout.image_size, (32, 0, 44, 12))  # exactly cell (0, 0)
    assert positions_to_cells(llava_trace, object_tokens(llava_trace, mask)).sum() == 1
    assert positions_to_cells(llava_trace, object_tokens(llava_trace, mask, buffer=1)).sum() == 4
    assert positions_to_cells(llava_trace, object_tokens(llava_trace, mask, buffer=2)).sum() == 9
    assert select_tokens(llava, llava_trace, "object", box=(32, 0, 44, 12)) == [int(layout.positions[0, 0])]
    chosen = random_tokens(llava_trace, 5, seed=3)
    assert chosen == random_tokens(llava_trace, 5, seed=3) and len(set(chosen)) == 5
    assert not set(random_tokens(llava_trace, 5, seed=3, exclude=chosen)) & set(chosen)
    top = select_tokens(llava, llava_trace, "top", method="tam", k=4)
    assert len(top) == 4 and set(top) <= set(layout.positions.ravel().tolist())
    with pytest.raises(UserInputError):
        box_mask(layout.image_size, (200, 0, 300, 10))
    with pytest.raises(UserInputError):
        select_tokens(llava, llava_trace, "random", k=0)


def test_logit_lens_at_the_last_layer_is_the_models_own_distribution(model_and_trace):
    loaded, trace = model_and_trace
    n_layers = len(loaded.family.language_layers(loaded.model))
    lens = logit_lens(loaded, trace, k=3)
    layout = trace.images[0]
    assert lens.token_ids.shape == (n_layers, layout.n_cells, 3)
    logits = loaded.model(**replay_inputs(trace), use_cache=False).logits[0, layout.positions.ravel()]
    top = torch.softmax(logits.float(), -1).topk(3, dim=-1)
    assert np.array_equal(lens.token_ids[-1], top.indices.numpy())
    np.testing.assert_allclose(lens.probs[-1], top.values.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert lens.cell(0, 0, 0)[0][0] == lens.texts[0][0][0]
    with pytest.raises(UserInputError):
        logit_lens(loaded, trace, layers=[n_layers])


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("analysis") / "scene.png"
    make_scene().save(path)
    return path


def _cli(*args):
    return main([*args])


def test_cli_writes_json(tmp_path, scene_file):
    base = ["--image", str(scene_file), "--prompt", "Describe the image.", "--model", "random:llava",
            "--max-new-tokens", "3"]
    assert _cli("knockout", *base, "--set", "random", "--k", "4", "--windows", "early,1-2",
                "--out", str(tmp_path / "ko")) == 0
    record = json.loads((tmp_path / "ko" / "knockout.json").read_text())
    assert len(record["token_set"]["positions"]) == 4 and len(record["knockout"]["windows"]) == 2
    assert (tmp_path / "ko" / "knockout.html").stat().st_size > 0
    assert _cli("ablate", *base, "--set", "object", "--box", "10,10,50,50", "--buffer", "1", "--replacement",
                "zero", "--out", str(tmp_path / "ab")) == 0
    ablation = json.loads((tmp_path / "ab" / "ablation.json").read_text())["ablation"]
    assert ablation["replacement"] == "zero" and ablation["n_tokens"] > 0
    assert _cli("logit-lens", *base, "--top-k", "2", "--layers", "1-2", "--out", str(tmp_path / "ll")) == 0
    lens = json.loads((tmp_path / "ll" / "logit_lens.json").read_text())["logit_lens"]
    assert lens["layers"] == [1, 2] and len(lens["top_k"][0][0]) == 2


@pytest.mark.parametrize("args", [
    ["ablate", "--set", "object", "--box", "1,2,3", "--replacement", "zero"],
    ["ablate", "--set", "object", "--replacement", "zero"],
    ["ablate", "--set", "random", "--k", "3"],  # mean without --mean
    ["ablate", "--set", "random", "--k", "3", "--mean", "/nonexistent.safetensors"],
    ["ablate", "--set", "random", "--k", "999", "--replacement", "zero"],
    ["knockout", "--set", "random", "--k", "3", "--windows", "late,9-12"],
    ["knockout", "--set", "top", "--k", "3"],
    ["knockout", "--set", "random", "--k", "3", "--token", "50"],
    ["logit-lens", "--layers", "7"],
    ["logit-lens", "--top-k", "0"],
])
def test_cli_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, scene_file, capsys, args):
    out = tmp_path / "out"
    code = _cli(args[0], "--image", str(scene_file), "--prompt", "Describe the image.", "--model", "random:llava",
                "--max-new-tokens", "3", *args[1:], "--out", str(out))
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("error: ") and "\n" not in error
    assert not out.exists() or not any(out.iterdir())


def test_cli_bad_mean_embedding_and_study_options(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli("mean-embedding", "--images", str(empty), "--model", "random:llava", "--out",
                str(tmp_path / "m.safetensors")) == 2
    assert _cli("ablation-study", "--n", "0", "--out", str(tmp_path / "s")) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "s").exists()


def test_cli_mean_embedding_then_mean_ablation(tmp_path, scene_file):
    folder = tmp_path / "images"
    folder.mkdir()
    make_scene().save(folder / "a.png")
    make_scene(90, 120).save(folder / "b.jpg")
    mean_file = tmp_path / "mean.safetensors"
    assert _cli("mean-embedding", "--images", str(folder), "--model", "random:llava", "--out", str(mean_file)) == 0
    assert _cli("ablate", "--image", str(scene_file), "--prompt", "Describe the image.", "--model", "random:llava",
                "--max-new-tokens", "3", "--set", "random", "--k", "5", "--mean", str(mean_file), "--out",
                str(tmp_path / "ab")) == 0
    ablation = json.loads((tmp_path / "ab" / "ablation.json").read_text())["ablation"]
    assert ablation["replacement"] == "mean" and ablation["n_tokens"] == 5


def test_register_tokens_stand_out_by_norm(llava, llava_trace):
    norms = image_embedding_norms(llava, llava_trace)
    chosen = positions_to_cells(llava_trace, register_tokens(llava, llava_trace))
    threshold = norms.mean() + 2 * norms.std()
    assert (norms[chosen] > threshold).all() and (norms[~chosen] <= threshold).all()


def test_analysis_panel_shows_the_librarys_results(scene):
    from components import analysis_panel
    from lvlm_interpret import ExplainService

    service = ExplainService(default_model="random:llava", device="cpu")
    request_id, trace = service.generate([scene], "Describe the image.")
    state = {"request_id": request_id, "image": scene, "token": 0}
    slider, figure, picture = analysis_panel.on_new_request(service, state)
    assert picture is scene
    assert analysis_panel.box_click("", 50, 20) == "50,20"
    assert analysis_panel.box_click("50,20", 10, 60) == "10,20,50,60"
    assert analysis_panel.box_click("10,20,50,60", 5, 5) == "5,5"
    # drawing: the image while one corner is set, the box's cells once both are
    assert analysis_panel.drawn_box_picture(service, state, "5,5", 0) is scene
    drawn = analysis_panel.drawn_box_picture(service, state, "10,20,50,60", 1)
    expected_cells = analysis_panel.choose_tokens(service, state, analysis_panel.BOX_SET, "10,20,50,60", 1, None, 0,
                                                  None)[1]
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(expected_cells))
    lens = service.logit_lens(request_id, analysis_panel.LENS_TOP_K)
    last = trace.n_layers - 1
    from lvlm_interpret.rendering import token_word

    assert slider.maximum == last and figure.data[0].text[0][0] == token_word(lens.texts[last][0][0])
    assert figure.data[0].hovertext[0][0].startswith(token_word(lens.texts[last][0][0]))
    np.testing.assert_allclose(figure.data[0].z, lens.probs[last, :, 0].reshape(lens.rows, lens.cols))
    selection = ("random k", "", 0, 4, 1, "tam")
    picture, summary, bars = analysis_panel.run_knockout(service, state, ["early", "late"], *selection)
    expected = knockout(service.model("random:llava"), trace, random_tokens(trace, 4, seed=1),
                        windows=["early", "late"])
    np.testing.assert_allclose(bars.data[0].y, [100 * d for d in expected.drops()], rtol=1e-5, atol=1e-6)
    assert picture.size == scene.size and "**Knockout** of 4 image tokens" in summary
    _, summary = analysis_panel.run_ablation(service, state, "zero", *selection)
    assert summary.startswith("**Zero ablation of 4 image tokens**")
    with pytest.raises(UserInputError, match="box"):
        analysis_panel.run_ablation(service, state, "zero", "object (box)", " ", 0, 4, 1, "tam")
    with pytest.raises(UserInputError, match="generate"):
        analysis_panel.lens_figure(service, {}, 0)


def test_studies_on_held_out_scenes(llava):
    from lvlm_interpret.analysis.study import ablation_study, lens_word_share, study_questions
    from lvlm_interpret.demo.scenes import HELD_OUT_SEED_START, draw_scene

    scene = draw_scene(HELD_OUT_SEED_START + 2)  # one red triangle
    assert study_questions(scene) == [("What color is the triangle?", "red", 0), ("Is there a red triangle?", "yes", 0)]
    result = ablation_study(llava, 1, torch.zeros(64), buffer=1, size=96)
    row = result["rows"][0]
    assert result["n_questions"] == len(study_questions(draw_scene(HELD_OUT_SEED_START, 96))) == len(result["rows"])
    assert {"object (mean)", "random (mean)", "object (zero)"} <= row.keys() and row["n_tokens"] > 0
    lens = lens_word_share(llava, 1, size=96)
    assert len(lens["colour_share"]) == 3 and all(0 <= v <= 1 for v in lens["colour_share"] + lens["shape_share"])


def test_knockout_study_on_the_demo_model():
    from lvlm_interpret.analysis.knockout import WINDOWS
    from lvlm_interpret.analysis.study import knockout_study, knockout_table

    result = knockout_study(load_model("demo", device="cpu"), 3)
    assert result["n_questions"] >= 2 and list(result["summary"]) == list(WINDOWS)
    late = result["summary"]["late"]
    assert late["object_drop"] > late["random_drop"] + 0.2  # the object's tokens carry the answer
    assert len(knockout_table(result).splitlines()) == 2 + len(WINDOWS)
