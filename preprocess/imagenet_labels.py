"""Labels of a flat set of images as ImageNet ships them, and human-readable class names.

``--labels FILE`` is either Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the WNID first in
the prediction string) or the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (line i: the ILSVRC2012_ID of
``ILSVRC2012_val_{i:08d}``), read with the devkit's ``meta.mat`` beside it. Those IDs are *not* in sorted-WNID
order (ID 1 is n02119789, kit fox; sorted, it is class 278), so they are mapped to WNIDs through ``meta.mat``
and then, like every class name, through ``--classes-from``. Class names (the devkit's ``words``, Kaggle's
``LOC_synset_mapping.txt``) come from ``meta.mat``, from ``LOC_synset_mapping.txt`` beside the csv, or from
``--class-names FILE``.
"""
import csv
import os
import re

import numpy as np

from preprocess.sources import SourceError

META_MAT = "meta.mat"
SYNSET_MAPPING = "LOC_synset_mapping.txt"


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def read_meta_mat(path):
    """ILSVRC2012_ID -> WNID and WNID -> words of the devkit's ``meta.mat`` (its leaf synsets, IDs 1..1000)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise SourceError(f"{path}: reading the devkit's meta.mat needs SciPy: pip install scipy (or "
                          "pip install 'alexnet-lmdb[imagenet]'); or use Kaggle's LOC_val_solution.csv") from None
    try:
        synsets = np.atleast_1d(loadmat(path, squeeze_me=True)["synsets"])
        rows = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]), int(s["num_children"])) for s in synsets]
    except Exception as exc:  # scipy raises many kinds for a file that is not a MAT file
        raise SourceError(f"{path}: not the devkit's meta.mat (a 'synsets' struct with ILSVRC2012_ID, WNID, words "
                          f"and num_children): {exc}") from None
    ids = {i: w for i, w, _, children in rows if children == 0}
    return ids, {w: words for _, w, words, _ in rows}


def read_class_names(path):
    """WNID -> human-readable name, from ``LOC_synset_mapping.txt`` lines (``n01440764 tench, Tinca tinca``)
    or a devkit ``meta.mat``; the file's classes in its order."""
    if path.endswith(".mat"):
        ids, words = read_meta_mat(path)
        return {w: words[w] for w in sorted(ids.values())}
    names = {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split(None, 1)
                if parts[0] in names:
                    raise SourceError(f"{path}:{n}: class {parts[0]} named twice")
                names[parts[0]] = parts[1].strip() if len(parts) > 1 else parts[0]
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read class names ({exc})") from None
    if not names:
        raise SourceError(f"{path}: no class names ('WNID words' per line)")
    return names


class ImageLabels:
    """Image name (file name without extension) -> class name, with where each came from."""

    def __init__(self, path, by_image, all_classes=None, names=None):
        self.path, self.by_image, self.all_classes = path, by_image, all_classes
        self.names = names or {}
        self.used = set()

    def class_of(self, image, where):
        entry = self.by_image.get(_stem(image))
        if entry is None:
            raise SourceError(f"{where}: {image} has no label in {self.path}; is it the labels file of these "
                              "images? (remove the image, or give the right --labels)")
        self.used.add(_stem(image))
        return entry[0]

    def classes(self, class_map):
        """The split's class list: ``--classes-from``'s (every label must be one of them), else the
        devkit's or Kaggle's full list where known, else the sorted classes the file names."""
        if class_map is not None:
            for stem in sorted(self.used):
                wnid, line = self.by_image[stem]
                if wnid not in class_map:
                    raise SourceError(f"{self.path}:{line}: class {wnid!r} is not among the --classes-from split's "
                                      f"{len(class_map)} classes")
            return sorted(class_map, key=class_map.get)
        return list(self.all_classes) if self.all_classes else sorted({w for w, _ in self.by_image.values()})

    def unused(self):
        return sorted(set(self.by_image) - self.used)


def read_labels(path):
    """The labels file named by ``--labels``: Kaggle's csv or the devkit's ground truth (with meta.mat)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (spreadsheet exports) is no content
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read the labels file ({exc})") from None
    first = text.split("\n", 1)[0].strip()
    if first.replace(" ", "").startswith("ImageId,PredictionString"):
        return _kaggle(path, text)
    if re.fullmatch(r"[0-9]+", first):
        return _devkit(path, text)
    raise SourceError(f"{path}: neither Kaggle's LOC_val_solution.csv (header 'ImageId,PredictionString') nor the "
                      f"devkit's ILSVRC2012_validation_ground_truth.txt (one class ID per line); first line: "
                      f"{first[:80]!r}")


def _kaggle(path, text):
    by_image = {}
    rows = csv.reader(text.splitlines())
    next(rows)
    for n, row in enumerate(rows, 2):
        if not row:
            continue
        if len(row) != 2 or not row[1].split():
            raise SourceError(f"{path}:{n}: expected 'ImageId,PredictionString' with a WNID first, "
                              f"got {','.join(row)[:120]!r}")
        image, wnid = row[0].strip(), row[1].split()[0]
        if image in by_image:
            raise SourceError(f"{path}:{n}: image {image} already labelled on line {by_image[image][1]}")
        by_image[image] = (wnid, n)
    mapping = os.path.join(os.path.dirname(os.path.abspath(path)), SYNSET_MAPPING)
    names = read_class_names(mapping) if os.path.exists(mapping) else None
    for image, (wnid, n) in by_image.items() if names else ():
        if wnid not in names:
            raise SourceError(f"{path}:{n}: class {wnid!r} of {image} is not among the {len(names)} classes of "
                              f"{mapping} beside it; use the csv and the mapping file of one download")
    return ImageLabels(path, by_image, list(names) if names else None, names)


def _devkit(path, text):
    mat = os.path.join(os.path.dirname(os.path.abspath(path)), META_MAT)
    if not os.path.exists(mat):
        raise SourceError(f"{path}: the devkit's ground truth holds ILSVRC2012_IDs, which only its meta.mat maps to "
                          f"classes, and {mat} is missing; put meta.mat beside it (the devkit's data/ folder)")
    ids, words = read_meta_mat(mat)
    by_image = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not re.fullmatch(r"\s*[0-9]+\s*", line):
            raise SourceError(f"{path}:{n}: expected one ILSVRC2012_ID, got {line[:80]!r}")
        wnid = ids.get(int(line))
        if wnid is None:
            raise SourceError(f"{path}:{n}: ILSVRC2012_ID {int(line)} is not a class of {mat} "
                              f"(its {len(ids)} classes have IDs {min(ids)}..{max(ids)})")
        by_image[f"ILSVRC2012_val_{n:08d}"] = (wnid, n)
    classes = sorted(ids.values())
    return ImageLabels(path, by_image, classes, {w: words[w] for w in classes})
