"""The same benchmark on a local COCO-format dataset (no download): images in a folder, instance masks
(polygons or RLE) in an annotations file. A word of the answer names a category when it equals the category's
name, its plural or one of its `synonyms`; it is scored against the union of that category's masks in the image."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

from ..errors import UserInputError
from ..images import load_image
from .benchmark import Sample, WordTarget
from .words import Word

DEFAULT_PROMPT = "Describe the image."


def _plurals(name: str) -> set[str]:
    forms = {name, name + "s", name + "es"}
    if name.endswith("y"):
        forms.add(name[:-1] + "ies")
    return forms


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """One annotation's segmentation (polygons, uncompressed or compressed RLE) as a bool [height, width] mask."""
    if isinstance(segmentation, list):  # polygons
        rles = coco_mask.frPyObjects(segmentation, height, width)
        rle = coco_mask.merge(rles) if rles else None
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
    else:
        raise ValueError("segmentation is neither polygons nor RLE")
    if rle is None:
        return np.zeros((height, width), dtype=bool)
    return coco_mask.decode(rle).astype(bool)


class CocoDataset:
    def __init__(self, images_dir: str | Path, annotations_file: str | Path, prompt: str = DEFAULT_PROMPT):
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise UserInputError(f"--images {images_dir} is not a folder")
        try:
            data = json.loads(Path(annotations_file).read_text())
            self.images = sorted(data["images"], key=lambda image: image["id"])
            categories = {c["id"]: c for c in data["categories"]}
            annotations = data["annotations"]
        except FileNotFoundError:
            raise UserInputError(f"--annotations {annotations_file} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserInputError(f"--annotations {annotations_file} is not a JSON file") from None
        except (KeyError, TypeError):
            raise UserInputError(f"--annotations {annotations_file} is not COCO format: it needs 'images' (with 'id', "
                                 f"'file_name'), 'annotations' and 'categories' (with 'id', 'name')") from None
        if not self.images:
            raise UserInputError(f"--annotations {annotations_file} lists no images")
        self.by_image = defaultdict(list)
        for annotation in annotations:
            if annotation.get("category_id") not in categories or "segmentation" not in annotation:
                raise UserInputError(f"annotation {annotation.get('id')} in {annotations_file} needs a known "
                                     f"'category_id' and a 'segmentation'")
            self.by_image[annotation["image_id"]].append(annotation)
        self.names = {}  # lower-case word sequence -> category id
        for category_id, category in categories.items():
            for name in [category["name"], *category.get("synonyms", [])]:
                words = name.lower().replace("_", " ").split()
                for last in _plurals(words[-1]):
                    self.names[tuple(words[:-1] + [last])] = category_id
        self.longest_name = max(len(name) for name in self.names)
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.images)

    def check(self, n: int) -> None:
        """Fail before any work when the first n images are not all there."""
        if n > len(self.images):
            raise UserInputError(f"--n {n} is more than the {len(self.images)} images of the annotations file")
        for image in self.images[:n]:
            if not (self.images_dir / image["file_name"]).is_file():
                raise UserInputError(f"image {image['file_name']} (id {image['id']}) is not in {self.images_dir}")

    def category_masks(self, image_info: dict, size: tuple[int, int]) -> dict[int, list[np.ndarray]]:
        width, height = size
        if (image_info.get("width", width), image_info.get("height", height)) != (width, height):
            raise UserInputError(f"image {image_info['file_name']} is {width}x{height} pixels but the annotations say "
                                 f"{image_info.get('width')}x{image_info.get('height')}")
        masks = defaultdict(list)
        for annotation in self.by_image[image_info["id"]]:
            masks[annotation["category_id"]].append(decode_segmentation(annotation["segmentation"], height, width))
        return masks

    def sample(self, index: int) -> Sample:
        info = self.images[index]
        image = load_image(self.images_dir / info["file_name"])
        masks = self.category_masks(info, image.size)

        def targets(words: list[Word]) -> list[WordTarget]:
            found, i = [], 0
            while i < len(words):
                for length in range(min(self.longest_name, len(words) - i), 0, -1):
                    category = self.names.get(tuple(w.text for w in words[i:i + length]))
                    if category is not None:
                        break
                if category is None or category not in masks:
                    i += 1
                    continue
                tokens = tuple(t for w in words[i:i + length] for t in w.tokens)
                union = np.logical_or.reduce(masks[category])
                found.append(WordTarget(Word(" ".join(w.text for w in words[i:i + length]), tokens), union,
                                        unique=len(masks[category]) == 1))
                i += length
            return found

        return Sample(key=str(info["id"]), image=image, prompt=self.prompt, targets=targets)
