"""Labeled data as users already hold it, read into one form for ``make eval`` and ``make variants``.

- classification: an ImageFolder tree (``<root>/<class>/<image>``, class folders named as the model's labels,
  or mapped to them with a label map), or a CSV of ``path,label`` (paths relative to the CSV; a label a name
  or an index; a header row is allowed);
- detection: a COCO instances JSON (``images``, ``annotations``, ``categories``) with its images (found
  beside the JSON, in ``images/``, or in the folder a COCO release names after the file: ``val2017/``);
- segmentation: images with index PNG masks of the same stem (``images/`` + ``masks/``, VOC's
  ``JPEGImages/`` + ``SegmentationClass/``, ADE's ``images/`` + ``annotations/``); a palette PNG is read as
  its indices, ``ignore_index`` (255) is never scored.

A problem with the whole layout (a path that does not exist, an empty folder, labels that match none of the
model's, images a COCO file names but that are not there) is a :class:`DataError`: one line saying what is
wrong and which layout was expected. A problem with one file (a mask of another size than its image, a mask
that is not an index PNG) leaves that file out, and the file and why are kept in ``Dataset.excluded`` for the
report: counted and named, never silently dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servekit.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IGNORE_INDEX = 255
SEGMENTATION_PAIRS = (("images", "masks"), ("JPEGImages", "SegmentationClass"), ("images", "annotations"))
LAYOUTS = {
    "classification": "an ImageFolder tree (<DATA>/<class>/<image>) or a CSV of path,label",
    "detection": "a COCO instances JSON (images, annotations, categories) with its image folder",
    "segmentation": "images/ and masks/ (or JPEGImages/ and SegmentationClass/) with index PNG masks of the same stem",
}


class DataError(ConfigError):
    """The data cannot be evaluated as laid out: one line saying what is wrong and what was expected."""


@dataclass(frozen=True)
class Sample:
    """One scored image: its file and its truth (a label index; a COCO image id; a mask file)."""

    path: Path
    truth: int | Path


@dataclass(frozen=True)
class Dataset:
    """The samples of one labeled set, the layout it was read as, and the files left out (with why)."""

    task: str
    layout: str
    root: Path
    samples: tuple[Sample, ...]
    labels: tuple[str, ...]  # the model's labels the truth indexes
    coco: Mapping[str, Any] | None = None  # detection: the ground truth, categories renumbered to the model's
    category_names: Mapping[int, str] = field(default_factory=dict)  # detection: category id -> its name
    unmatched: tuple[str, ...] = ()  # classes of the data the model has no label for (detection: not scored)
    excluded: tuple[tuple[str, str], ...] = ()  # (file, why it was left out)
    ignore_index: int = IGNORE_INDEX
    _digest: list[str] = field(default_factory=list, init=False, repr=False, compare=False)  # computed once

    def files(self) -> list[Path]:
        """Every file the metric depends on: the images, then the annotation files."""
        extra = [s.truth for s in self.samples if isinstance(s.truth, Path)]
        return [s.path for s in self.samples] + extra

    def digest(self) -> str:
        """sha256 over every scored file's path (relative to the root) and bytes, and the ground truth; the files
        are read once, however often the reports ask."""
        if self._digest:
            return self._digest[0]
        hasher = hashlib.sha256()
        for path in sorted(self.files()):
            hasher.update(str(_relative(path, self.root)).encode() + b"\0")
            hasher.update(hashlib.sha256(path.read_bytes()).digest())
        for sample in self.samples:
            if isinstance(sample.truth, int):
                hasher.update(f"{_relative(sample.path, self.root)}={sample.truth}\n".encode())
        if self.coco is not None:
            hasher.update(json.dumps(self.coco["annotations"], sort_keys=True).encode())
        self._digest.append(hasher.hexdigest())
        return self._digest[0]

    def subset(self, indices: Iterable[int]) -> Dataset:
        """The same set restricted to ``indices`` (a split of it)."""
        return dataclasses.replace(self, samples=tuple(self.samples[i] for i in indices))


def split(dataset: Dataset, share: float = 0.2, most: int = 300) -> tuple[Dataset, Dataset]:
    """(calibration, scored): the files whose sha256 of their path relative to the root falls in the first
    ``share`` of the hash range (at most ``most``) calibrate; the others are scored. Stable across runs
    and machines, and disjoint by construction."""

    def position(index: int) -> float:
        relative = os.path.relpath(dataset.samples[index].path, dataset.root)
        return int(hashlib.sha256(relative.encode()).hexdigest()[:12], 16) / float(1 << 48)

    order = sorted(range(len(dataset.samples)), key=position)
    calibration = [i for i in order if position(i) < share][:most]
    if not calibration and len(order) > 1:
        calibration = order[:1]
    chosen = set(calibration)
    scored = [i for i in range(len(dataset.samples)) if i not in chosen]
    return dataset.subset(sorted(calibration)), dataset.subset(scored)


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return path


def _expected(task: str) -> str:
    return f"expected {LAYOUTS[task]}"


def load_dataset(
    data: Path,
    task: str,
    labels: Sequence[str],
    *,
    label_map: Path | None = None,
    images: Path | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Dataset:
    """``data`` read as the layout its task uses, its truth indexing ``labels`` (the model's).

    Raises:
        DataError: the path is missing or empty, or its labels or images do not fit (one line).
    """
    if task not in LAYOUTS:
        raise DataError(f"no evaluation for task {task!r}; tasks: {', '.join(LAYOUTS)}")
    if not data.exists():
        raise DataError(f"DATA {data} does not exist; {_expected(task)}")
    if task == "classification":
        mapping = read_label_map(label_map) if label_map else {}
        if data.is_file():
            return classification_csv(data, labels, mapping)
        return image_folder(data, labels, mapping)
    if task == "detection":
        return coco_detection(coco_file(data), labels, images)
    return segmentation_masks(data, labels, ignore_index)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_label_map(path: Path) -> dict[str, str]:
    """A label map: a JSON object ``{"folder or CSV label": "model label"}``, or CSV lines ``name,label``."""
    if not path.is_file():
        raise DataError(f"LABEL_MAP {path} does not exist; expected a JSON object or CSV lines name,model_label")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            return {str(k): str(v) for k, v in json.loads(text).items()}
        except ValueError as exc:
            raise DataError(f"LABEL_MAP {path} is not valid JSON: {exc}") from None
    return {row[0].strip(): row[1].strip() for row in csv.reader(text.splitlines()) if len(row) >= 2}


def label_index(name: str, labels: Sequence[str], mapping: Mapping[str, str]) -> int | None:
    """The model's index for a data class name: through the map, then exactly, then ignoring case and
    ``_``/``-``/space (``golden_retriever`` is ``golden retriever``); an integer name as an index."""
    name = mapping.get(name, name)
    if name in labels:
        return list(labels).index(name)
    folded = {_fold(label): i for i, label in reversed(list(enumerate(labels)))}
    if _fold(name) in folded:
        return folded[_fold(name)]
    if name.isdigit() and int(name) < len(labels) and not any(label.isdigit() for label in labels):
        return int(name)
    return None


def _fold(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _no_match(what: str, names: Sequence[str], labels: Sequence[str]) -> DataError:
    shown = ", ".join(list(names)[:5]) + (", ..." if len(names) > 5 else "")
    known = ", ".join(list(labels)[:5]) + (", ..." if len(labels) > 5 else "")
    return DataError(
        f"{what} ({shown}) match none of the model's {len(labels)} labels ({known}); name them as the model's "
        'labels or give LABEL_MAP=<file> (JSON {"name": "label"} or CSV name,label)'
    )


def image_folder(root: Path, labels: Sequence[str], mapping: Mapping[str, str]) -> Dataset:
    """An ImageFolder tree: each class folder's images (recursively), the folder name the label."""
    if not root.is_dir():
        raise DataError(f"DATA {root} is not a folder or a CSV file; {_expected('classification')}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {folder: sorted(p for p in folder.rglob("*") if is_image(p)) for folder in folders}
    files = {folder: found for folder, found in files.items() if found}
    if not files:
        loose = sum(1 for p in root.iterdir() if is_image(p))
        hint = f" ({loose} images lie directly in it: put each in a folder named as its class)" if loose else ""
        raise DataError(f"DATA {root} holds no class folder with images{hint}; {_expected('classification')}")
    indices = {folder.name: label_index(folder.name, labels, mapping) for folder in files}
    if all(i is None for i in indices.values()):
        raise _no_match(f"the {len(indices)} class folders of {root}", sorted(indices), labels)
    unmatched = tuple(sorted(name for name, i in indices.items() if i is None))
    samples = []
    for folder, found in files.items():
        index = indices[folder.name]
        if index is not None:
            samples.extend(Sample(path, index) for path in found)
    excluded = tuple(
        (str(path), f"class folder {folder.name!r} is none of the model's labels")
        for folder, found in files.items()
        if indices[folder.name] is None
        for path in found
    )
    return Dataset("classification", "ImageFolder", root, tuple(samples), tuple(labels), None, {}, unmatched, excluded)


def classification_csv(path: Path, labels: Sequence[str], mapping: Mapping[str, str]) -> Dataset:
    """A CSV of ``path,label`` rows (a header row allowed); paths relative to the CSV's folder."""
    if path.suffix.lower() not in (".csv", ".txt", ".tsv"):
        raise DataError(f"DATA {path} is a file but not a CSV; {_expected('classification')}")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = [r for r in csv.reader(path.read_text(encoding="utf-8").splitlines(), delimiter=delimiter) if r]
    if rows and len(rows[0]) >= 2 and rows[0][1].strip().lower() in ("label", "class", "category", "target"):
        rows = rows[1:]
    if not rows:
        raise DataError(f"DATA {path} has no rows; {_expected('classification')}")
    bad = [i + 1 for i, row in enumerate(rows) if len(row) < 2]
    if bad:
        raise DataError(f"DATA {path}: row {bad[0]} has no label column; expected rows of path,label")
    names = sorted({row[1].strip() for row in rows})
    indices = {name: label_index(name, labels, mapping) for name in names}
    if all(i is None for i in indices.values()):
        raise _no_match(f"the {len(names)} labels of {path}", names, labels)
    samples, excluded = [], []
    for row in rows:
        image, name = path.parent / row[0].strip(), row[1].strip()
        if not image.is_file():
            excluded.append((str(image), "the CSV names it but there is no such file"))
        elif indices[name] is None:
            excluded.append((str(image), f"label {name!r} is none of the model's labels"))
        else:
            samples.append(Sample(image, int(indices[name])))  # type: ignore[arg-type]
    if not samples:
        raise DataError(f"DATA {path}: none of its {len(rows)} rows names an image file that exists")
    unmatched = tuple(name for name, i in indices.items() if i is None)
    return Dataset(
        "classification", "CSV", path.parent, tuple(samples), tuple(labels), None, {}, unmatched, tuple(excluded)
    )


def coco_file(data: Path) -> Path:
    """The COCO JSON ``data`` names: the file itself, or the one JSON of a folder (or of its ``annotations/``)."""
    if data.is_file():
        return data
    found = sorted(data.glob("*.json")) or sorted((data / "annotations").glob("*.json"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found[:3])})"
        raise DataError(f"DATA {data} holds {what} COCO JSON files; give the one to score, {_expected('detection')}")
    return found[0]


def image_folders(annotation: Path) -> list[Path]:
    """Where a COCO file's images may be: beside it, ``images/`` beside it or above it, and the folder named
    after it (``annotations/instances_val2017.json`` -> ``val2017/``)."""
    here, above = annotation.parent, annotation.parent.parent
    split = annotation.stem.removeprefix("instances_").removeprefix("_annotations.coco")
    candidates = [here, here / "images", above / "images", above / split, here / split]
    return [c for c in dict.fromkeys(candidates) if c.is_dir()]


def coco_detection(annotation: Path, labels: Sequence[str], images: Path | None = None) -> Dataset:
    """A COCO instances file scored against the model's labels: categories matched by name, their ids
    renumbered to the model's label index + 1; images located once, every one of them required."""
    try:
        document = json.loads(annotation.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        kind = type(exc).__name__
        raise DataError(f"DATA {annotation} is not a COCO JSON file ({kind}); {_expected('detection')}") from None
    if not isinstance(document, dict) or not all(k in document for k in ("images", "annotations", "categories")):
        raise DataError(f"DATA {annotation} lacks images, annotations or categories; {_expected('detection')}")
    if not document["images"]:
        raise DataError(f"DATA {annotation} lists no images")
    by_name = {c["id"]: c["name"] for c in document["categories"]}
    renumber = {cid: label_index(name, labels, {}) for cid, name in by_name.items()}
    if all(i is None for i in renumber.values()):
        raise _no_match(f"the {len(by_name)} categories of {annotation}", sorted(by_name.values()), labels)
    folders = [images] if images else image_folders(annotation)
    first = document["images"][0]["file_name"]
    folder = next((f for f in folders if (f / first).is_file()), None)
    if folder is None:
        looked = ", ".join(str(f) for f in folders) or str(annotation.parent)
        raise DataError(f"{annotation}: its first image {first} is in none of {looked}; give IMAGES=<folder>")
    missing = [im["file_name"] for im in document["images"] if not (folder / im["file_name"]).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(
            f"{annotation}: {len(missing)} of its {len(document['images'])} images are not in {folder} ({shown}); "
            "COCO AP needs every image it lists"
        )
    kept = {cid: i + 1 for cid, i in renumber.items() if i is not None}
    truth = {
        "images": [{k: im[k] for k in ("id", "width", "height", "file_name")} for im in document["images"]],
        "annotations": [
            _annotation(a, kept[a["category_id"]]) for a in document["annotations"] if a["category_id"] in kept
        ],
        "categories": [{"id": kept[cid], "name": labels[kept[cid] - 1]} for cid in sorted(kept)],
    }
    samples = tuple(Sample(folder / im["file_name"], int(im["id"])) for im in document["images"])
    unmatched = tuple(sorted(by_name[cid] for cid, i in renumber.items() if i is None))
    names = {kept[cid]: labels[kept[cid] - 1] for cid in kept}
    return Dataset("detection", "COCO", folder, samples, tuple(labels), truth, names, unmatched)


def _annotation(item: Mapping[str, Any], category: int) -> dict[str, Any]:
    x, y, w, h = (float(v) for v in item["bbox"])
    out = {
        "id": int(item["id"]),
        "image_id": int(item["image_id"]),
        "category_id": category,
        "bbox": [x, y, w, h],
        "area": float(item.get("area") or w * h),
        "iscrowd": int(item.get("iscrowd", 0)),
    }
    if item.get("segmentation"):
        out["segmentation"] = item["segmentation"]
    return out


def segmentation_pair(root: Path) -> tuple[Path, Path]:
    """The image and mask folders of a segmentation layout."""
    if not root.is_dir():
        raise DataError(f"DATA {root} is not a folder; {_expected('segmentation')}")
    for images, masks in SEGMENTATION_PAIRS:
        if (root / images).is_dir() and (root / masks).is_dir():
            return root / images, root / masks
    raise DataError(f"DATA {root} has no image and mask folders; {_expected('segmentation')}")


def mask_problem(image: Path, mask: Path) -> str | None:
    """Why a mask cannot score its image (another size, not an index PNG), or None."""
    from PIL import Image

    try:
        with Image.open(mask) as m, Image.open(image) as im:
            if m.mode not in ("P", "L", "I", "I;16", "1"):
                return f"mask is {m.mode}, not an index PNG (palette or grayscale, one class index per pixel)"
            if m.size != im.size:
                return f"mask is {m.size[0]}x{m.size[1]}, its image {im.size[0]}x{im.size[1]}"
    except OSError as exc:
        return f"cannot be read: {str(exc).splitlines()[0][:120]}"
    return None


def read_mask(path: Path) -> Any:
    """A mask PNG as an H x W int64 array of class indices (a palette PNG's indices, not its colours)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as mask:
        return np.asarray(mask, dtype=np.int64)


def segmentation_masks(root: Path, labels: Sequence[str], ignore_index: int = IGNORE_INDEX) -> Dataset:
    """Images paired with their index masks by stem; a mask whose values are none of the model's classes
    (other than ``ignore_index``) means the data's classes are not the model's."""
    import numpy as np

    image_dir, mask_dir = segmentation_pair(root)
    images = {p.stem: p for p in sorted(image_dir.rglob("*")) if is_image(p)}
    masks = {p.stem: p for p in sorted(mask_dir.rglob("*.png"))}
    paired = sorted(set(images) & set(masks))
    if not paired:
        raise DataError(
            f"DATA {root}: no image in {image_dir.name}/ has a mask of the same stem in {mask_dir.name}/ "
            f"({len(images)} images, {len(masks)} masks); {_expected('segmentation')}"
        )
    samples, excluded, values = [], [], set()
    for stem in paired:
        problem = mask_problem(images[stem], masks[stem])
        if problem:
            excluded.append((str(masks[stem]), problem))
            continue
        values.update(int(v) for v in np.unique(read_mask(masks[stem])))
        samples.append(Sample(images[stem], masks[stem]))
    excluded += [(str(images[s]), "no mask of the same stem") for s in sorted(set(images) - set(masks))]
    if not samples:
        raise DataError(f"DATA {root}: every mask is unusable, e.g. {excluded[0][0]}: {excluded[0][1]}")
    beyond = sorted(v for v in values if v != ignore_index and not 0 <= v < len(labels))
    if beyond:
        raise DataError(
            f"DATA {root}: masks hold class indices {beyond[:5]} but the model has {len(labels)} classes "
            f"(0..{len(labels) - 1}, {ignore_index} ignored); masks must index the model's labels"
        )
    return Dataset(
        "segmentation", "index masks", root, tuple(samples), tuple(labels), None, {}, (), tuple(excluded), ignore_index
    )
