"""Evaluation on a local COCO-format dataset, word grouping over sub-tokens, and data-parallel runs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lvlm_interpret.cli import main
from lvlm_interpret.demo.scenes import SHAPES, draw_scene
from lvlm_interpret.evaluation.coco import CocoDataset, decode_segmentation
from lvlm_interpret.evaluation.words import Word, answer_words

REPO = Path(__file__).resolve().parents[1]


def write_coco(folder: Path, seeds: list[int], size=(192, 160)) -> Path:
    """Demo scenes written as a COCO instances file: squares and triangles as polygons, circles as compressed RLE."""
    images, annotations = [], []
    categories = [{"id": i + 1, "name": shape} for i, shape in enumerate(SHAPES)]
    (folder / "images").mkdir(parents=True)
    for image_id, seed in enumerate(seeds, start=1):
        scene = draw_scene(seed, size)
        scene.image.save(folder / "images" / f"{seed}.png")
        images.append({"id": image_id, "file_name": f"{seed}.png", "width": size[0], "height": size[1]})
        for obj, mask in zip(scene.objects, scene.masks):
            x0, y0, x1, y1 = obj.bbox
            if obj.shape == "circle":
                rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode()}
            elif obj.shape == "square":
                segmentation = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            else:
                segmentation = [[(x0 + x1) / 2, y0, x1, y1, x0, y1]]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                "category_id": SHAPES.index(obj.shape) + 1, "segmentation": segmentation,
                                "bbox": [x0, y0, x1 - x0, y1 - y0]})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def test_segmentations_decode_to_the_objects_masks():
    scene = draw_scene(10 ** 9 + 3, (120, 90))
    height, width = 90, 120
    for obj, mask in zip(scene.objects, scene.masks):
        compressed = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        as_text = {"size": compressed["size"], "counts": compressed["counts"].decode()}
        np.testing.assert_array_equal(decode_segmentation(as_text, height, width), mask)
        # uncompressed RLE: column-major run lengths starting with a background run
        flat = mask.flatten(order="F").astype(np.int8)
        changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        counts = np.diff(np.concatenate([[0], changes])).tolist()
        np.testing.assert_array_equal(decode_segmentation({"size": [height, width], "counts": counts}, height,
                                                          width), mask)
        x0, y0, x1, y1 = obj.bbox
        polygon = decode_segmentation([[x0, y0, x1, y0, x1, y1, x0, y1]], height, width)
        box = np.zeros_like(mask)
        box[y0:y1, x0:x1] = True
        assert _iou(polygon, box) > 0.9


def test_category_words_match_names_plurals_synonyms_and_several_words(tmp_path):
    (tmp_path / "images").mkdir()
    draw_scene(1, 64).image.save(tmp_path / "images" / "a.png")
    square = [[0, 0, 20, 0, 20, 20, 0, 20]]
    data = {"images": [{"id": 7, "file_name": "a.png", "width": 64, "height": 64}],
            "categories": [{"id": 1, "name": "traffic light"}, {"id": 2, "name": "bus", "synonyms": ["coach"]},
                           {"id": 3, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": square},
                            {"id": 2, "image_id": 7, "category_id": 2, "segmentation": square},
                            {"id": 3, "image_id": 7, "category_id": 2, "segmentation": [[30, 30, 50, 30, 50, 50]]}]}
    (tmp_path / "instances.json").write_text(json.dumps(data))
    sample = CocoDataset(tmp_path / "images", tmp_path / "instances.json").sample(0)
    texts = ["a", "traffic", "light", "near", "two", "buses", "and", "a", "coach", "but", "no", "dog"]
    targets = sample.targets([Word(t, (i,)) for i, t in enumerate(texts)])
    assert [(t.word.text, t.word.tokens, t.unique) for t in targets] == [
        ("traffic light", (1, 2), True), ("buses", (5,), False), ("coach", (8,), False)]  # no dog in this image
    assert targets[1].mask.sum() > targets[0].mask.sum()  # a category's word covers all its instances


def test_sub_tokens_of_a_word_are_grouped():
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["a red circle and a blue square"] * 20,
                                trainers.BpeTrainer(vocab_size=280, special_tokens=["</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    ids = tokenizer("a giraffe, the zebras.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    words = answer_words(tokenizer, ids)
    assert [w.text for w in words] == ["a", "giraffe", "the", "zebras"]
    assert len(words[1].tokens) > 1  # unseen words come in several sub-tokens
    assert "".join(tokenizer.decode([ids[t]]) for t in words[1].tokens).strip() == "giraffe"
    assert [w.is_function_word for w in words] == [True, False, True, False]


def test_coco_evaluation_on_scenes_written_in_coco_format(tmp_path, capsys):
    annotations = write_coco(tmp_path, [10 ** 9 + k for k in range(4)])
    out = tmp_path / "out"
    assert main(["evaluate", "--dataset", "coco", "--images", str(tmp_path / "images"), "--annotations",
                 str(annotations), "--methods", "tam", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["dataset"] == "coco" and result["n_samples"] == 4 and result["answer_accuracy"] is None
    shape_words = sum(word in SHAPES for a in result["answers"] for word in a["answer"].replace(",", " ").replace(
        ".", " ").split())
    assert result["methods"]["tam_raw"]["n_words"] == shape_words > 0
    # TAM reads the class's logit at every patch: on class-level masks it points at the class
    assert result["methods"]["tam_raw"]["pointing_game"] >= 0.9
    assert "coco: 4 samples" in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--dataset", "coco"], "--dataset coco needs --images FOLDER and --annotations FILE"),
    (["--dataset", "coco", "--images", "{images}", "--annotations", "{broken}"], "is not a JSON file"),
    (["--dataset", "coco", "--images", "{images}", "--annotations", "{missing_image}"], "is not in"),
    (["--dataset", "coco", "--images", "{images}", "--annotations", "{good}", "--n", "9"], "more than the 1 images"),
    (["--dataset", "coco", "--images", "{images}", "--annotations", "{good}", "--prompt", " "], "--prompt is empty"),
    (["--images", "{images}"], "are for --dataset coco"),
    (["--faithfulness", "--min-blur-effect", "5"], "--min-blur-effect must be a probability change in (0, 1], got 5"),
])
def test_bad_dataset_arguments_get_one_line_and_write_nothing(tmp_path, capsys, arguments, message):
    good = write_coco(tmp_path, [10 ** 9])
    (tmp_path / "broken.json").write_text("{not json")
    missing = json.loads(good.read_text())
    missing["images"][0]["file_name"] = "absent.png"
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    paths = {"images": tmp_path / "images", "broken": tmp_path / "broken.json", "good": good,
             "missing_image": tmp_path / "missing.json"}
    out = tmp_path / "out"
    assert main(["evaluate", *[a.format(**paths) for a in arguments], "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not out.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_equals_the_single_process_run(tmp_path):
    common = ["evaluate", "--n", "3", "--methods", "attention,tam", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "single")]) == 0
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         str(_free_port()), "-m", "lvlm_interpret", *common, "--out", str(tmp_path / "parallel")],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    single = json.loads((tmp_path / "single" / "evaluation.json").read_text())
    parallel = json.loads((tmp_path / "parallel" / "evaluation.json").read_text())
    assert (single["processes"], parallel["processes"]) == (1, 2)
    for key in ("methods", "answers", "answer_accuracy", "n_samples"):
        assert parallel[key] == single[key]
