import json

import numpy as np

from lvlm_interpret.cli import main
from lvlm_interpret.demo.scenes import describe, draw_scene
from lvlm_interpret.evaluation.shapes import object_words
from lvlm_interpret.evaluation.words import Word


def _scene_with(n):
    seed = 0
    while len(draw_scene(seed, 96).objects) != n:
        seed += 1
    return draw_scene(seed, 96)


def _words(texts):
    return [Word(text, (i,)) for i, text in enumerate(texts) if text not in ",."]


def test_object_words_follow_left_to_right_order():
    scene = _scene_with(3)
    texts = describe(scene).replace(",", " ,").replace(".", " .").split()
    found = object_words(_words(texts), scene)
    order = scene.left_to_right()
    assert [(obj, kind) for _, obj, kind in found] == [(o, k) for o in order for k in ("colour", "shape")]
    for word, obj, kind in found:
        expected = scene.objects[obj].colour if kind == "colour" else scene.objects[obj].shape
        assert texts[word.tokens[0]] == expected


def test_wrongly_named_objects_are_skipped():
    scene = _scene_with(2)
    first, second = (scene.objects[i] for i in scene.left_to_right())
    wrong_colour = next(c for c in ("red", "green", "blue", "yellow") if c != first.colour)
    texts = ["a", wrong_colour, first.shape, "and", "a", second.colour, second.shape, "."]
    found = object_words(_words(texts), scene)
    assert [(word.tokens, kind) for word, _, kind in found] == [((5,), "colour"), ((6,), "shape")]


def test_evaluate_command_writes_json_and_csv(tmp_path, capsys):
    assert main(["evaluate", "--n", "2", "--size", "96", "--model", "random:llava", "--methods", "attention",
                 "--no-progress", "--faithfulness", "--min-blur-effect", "0.2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["n_samples"] == 2 and result["seed_start"] >= 10 ** 9 and result["processes"] == 1
    assert result["min_blur_effect"] == 0.2  # every object word's curves, to re-score at another bound
    assert all({"key", "word", "map", "p_original", "p_blurred", "deletion_auc"} <= set(curve)
               for curve in result["word_curves"])
    assert len(result["answers"]) == 2
    header = (tmp_path / "evaluation.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "method"
    assert {"pointing_game", "pointing_instance", "pointing_unique", "obj_iou", "obj_iou_instance", "func_iou",
            "f1_iou", "deletion_auc", "insertion_auc"} <= set(header)
    assert "answer accuracy" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.csv", "evaluation.json"]


def test_a_shared_colour_word_has_the_class_mask_and_its_instance_mask():
    from lvlm_interpret.evaluation.shapes import shapes_sample

    index = next(i for i in range(200) if len({o.colour for o in draw_scene(10 ** 9 + i, 96).objects})
                 < len(draw_scene(10 ** 9 + i, 96).objects))
    scene, sample = draw_scene(10 ** 9 + index, 96), shapes_sample(index, 96)
    texts = describe(scene).replace(",", " ,").replace(".", " .").split()
    targets = sample.targets(_words(texts))
    order = scene.left_to_right()
    for k, target in enumerate(targets):
        obj = scene.objects[order[k // 2]]
        value = obj.colour if k % 2 == 0 else obj.shape
        sharing = [i for i, o in enumerate(scene.objects) if (o.colour if k % 2 == 0 else o.shape) == value]
        assert (target.instance_mask == scene.masks[order[k // 2]]).all()
        assert target.unique == (len(sharing) == 1)
        assert (target.mask == np.logical_or.reduce([scene.masks[i] for i in sharing])).all()
    assert not all(t.unique for t in targets)


def test_faithfulness_leaves_out_words_the_blur_does_not_change(llava, scene, monkeypatch):
    from lvlm_interpret.evaluation import benchmark
    from lvlm_interpret.evaluation.benchmark import Sample, WordTarget, evaluate_sample

    def curves(loaded, trace, token_index, grid_map):  # the blur matters for the first word, a little for the second
        p_blurred = 0.2 if token_index == first_word_token[0] else 0.6
        return {"p_original": 0.9, "p_blurred": p_blurred, "deletion_auc": 0.1, "insertion_auc": 0.8}

    first_word_token = []

    def targets(words):
        first_word_token.append(words[0].tokens[0])
        mask = np.ones((scene.height, scene.width), dtype=bool)
        return [WordTarget(word, mask, unique=True) for word in words[:2]]

    monkeypatch.setattr(benchmark, "deletion_insertion", curves)
    result = evaluate_sample(llava, Sample("s", scene, "Describe the image.", targets), ["attention"],
                             faithfulness=True, max_new_tokens=6)
    rows = benchmark.aggregate([result])["methods"]["attention"]
    assert rows["n_words"] == 2 and rows["n_faithfulness_words"] == 1
    assert rows["deletion_auc"] == 0.1 and rows["insertion_auc"] == 0.8
    # every word's curves are kept, scored or not; a lower bound scores the second word too
    assert [(c["map"], c["p_blurred"]) for c in result["curves"]] == [("attention", 0.2), ("attention", 0.6)]
    result = evaluate_sample(llava, Sample("s", scene, "Describe the image.", targets), ["attention"],
                             faithfulness=True, max_new_tokens=6, min_blur_effect=0.3)
    assert benchmark.aggregate([result])["methods"]["attention"]["n_faithfulness_words"] == 2


def test_a_map_on_another_object_of_the_class_points_at_the_class_not_the_instance(llava, scene, monkeypatch):
    """A word is scored against its class (the pointing game's and TAM's protocol) and, where the phrase's object is
    known, against that instance on its own columns."""
    from lvlm_interpret.evaluation import benchmark
    from lvlm_interpret.evaluation.benchmark import Sample, WordTarget, evaluate_sample
    from lvlm_interpret.methods.base import Explanation

    width, height = scene.size
    instance = np.zeros((height, width), dtype=bool)
    instance[:, : width // 4] = True  # the described object: the left quarter
    other = np.zeros_like(instance)
    other[:, -width // 4:] = True  # another object of the same class: the right quarter

    class RightmostCell:  # a map whose top cell is on the other object
        def explain_many(self, trace, tokens, model=None):
            layout = trace.images[0]
            grid = np.zeros((layout.rows, layout.cols), dtype=np.float32)
            grid[layout.rows // 2, -1] = 1.0
            return [Explanation("rightmost", t, [grid]) for t in tokens]

    monkeypatch.setattr(benchmark, "get_method", lambda name: RightmostCell())

    def targets(words):
        return [WordTarget(words[0], instance | other, unique=False, instance_mask=instance),
                WordTarget(words[1], other, unique=True)]

    result = evaluate_sample(llava, Sample("s", scene, "Describe the image.", targets), ["rightmost"],
                             max_new_tokens=6)
    row = benchmark.aggregate([result])["methods"]["rightmost"]
    assert row["n_words"] == 2 and row["pointing_game"] == 1.0  # both words' classes are hit
    assert row["pointing_instance"] == 0.0  # the only word with a known instance misses it
    assert row["pointing_unique"] == 1.0  # only the unambiguous word counts here
    assert row["obj_iou_instance"] < row["obj_iou"]
