"""Where images come from: an ImageFolder tree, a Caffe-style list file, an HDF5 file, or CIFAR binaries.

Every source has ``classes`` (names; index = label), ``len()``, ``label(i)``, ``name(i)`` (the record's
``source`` field: a relative path, or an input index for array sources), ``digest()`` (changes when the
input list does) and ``load(indices)``, which yields, per index, the file's bytes or an RGB uint8 array.
Sources are plain picklable objects; files are opened lazily in the process that reads them.
"""
import hashlib
import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff",
                    ".webp", ".gif")
FORMATS = ("imagefolder", "list", "hdf5", "cifar")


class SourceError(ValueError):
    """Input that cannot be packed at all; the message names the file, line or dataset."""


class MissingFile(OSError):
    """A listed image file that cannot be read; the builder skips it like an undecodable image."""


def _digest(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()


class FileSource:
    """Image files under ``root`` with integer labels (ImageFolder and list files)."""

    def __init__(self, root, paths, labels, classes):
        self.root, self.paths, self.labels, self.classes = root, paths, labels, classes

    def __len__(self):
        return len(self.paths)

    def label(self, i):
        return self.labels[i]

    def name(self, i):
        return self.paths[i]

    def digest(self):
        return _digest(self.paths, self.labels, self.classes)

    def load(self, indices):
        for i in indices:
            try:
                with open(os.path.join(self.root, self.paths[i]), "rb") as f:
                    yield f.read()
            except OSError as exc:
                yield MissingFile(f"cannot read: {exc.strerror or exc}")


def image_folder(src, class_map=None):
    """torchvision's ImageFolder rules: classes are the sorted first-level folders, files found recursively
    (any case of a common image extension), sorted. ``class_map`` maps names to another split's labels."""
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise SourceError(f"{src}: no class folders; an ImageFolder tree is SRC/CLASS/IMAGE")
    paths, labels = [], []
    for own_label, c in enumerate(classes):
        found = []
        for dirpath, _, files in sorted(os.walk(os.path.join(src, c), followlinks=True)):
            found += [os.path.relpath(os.path.join(dirpath, f), src) for f in sorted(files)
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise SourceError(f"{os.path.join(src, c)}: class folder holds no image files "
                              f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images")
        if class_map is not None and c not in class_map:
            raise SourceError(f"{os.path.join(src, c)}: class {c!r} is not among the --classes-from split's "
                              f"{len(class_map)} classes")
        paths += found
        labels += [class_map[c] if class_map is not None else own_label] * len(found)
    if class_map is not None:
        classes = sorted(class_map, key=class_map.get)
    return FileSource(src, paths, labels, classes)


def _check_labels(labels, classes, where):
    """Integer labels must index ``classes`` (or, without a class list, be >= 0: classes become '0'..'K-1')."""
    if len(labels) == 0:
        raise SourceError(f"{where}: no images")
    lo, hi = int(np.min(labels)), int(np.max(labels))
    if lo < 0:
        raise SourceError(f"{where}: negative label {lo} at input {int(np.argmin(labels))}")
    if classes is None:
        return [str(i) for i in range(hi + 1)]
    if hi >= len(classes):
        raise SourceError(f"{where}: label {hi} at input {int(np.argmax(labels))} is out of range for "
                          f"{len(classes)} classes")
    return list(classes)


def list_file(path, root=None, classes=None):
    """Caffe ``convert_imageset`` lists: ``relative/path label`` per line (the path may hold spaces)."""
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise SourceError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
            label = int(parts[1])
            if label < 0 or (classes is not None and label >= len(classes)):
                raise SourceError(f"{path}:{n}: label {label} is out of range "
                                  f"[0, {len(classes) if classes is not None else 'inf'})")
            paths.append(parts[0].strip())
            labels.append(label)
    classes = _check_labels(labels, classes, path)
    return FileSource(root, paths, labels, classes)


class HDF5Source:
    """``images`` (N×H×W×3 uint8 RGB) and ``labels`` (N) datasets, read a chunk at a time."""

    def __init__(self, path, images="images", labels="labels", classes=None):
        import h5py
        self.path, self.images_key = path, images
        self._file = None
        with h5py.File(path, "r") as f:
            for key in (images, labels):
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    raise SourceError(f"{path}: no dataset {key!r} (datasets: {', '.join(sorted(f.keys()))}); "
                                      "name it with --h5-images / --h5-labels")
            ds = f[images]
            if ds.ndim != 4 or ds.shape[3] != 3 or ds.dtype != np.uint8:
                raise SourceError(f"{path}: dataset {images!r} is {ds.dtype} {list(ds.shape)}, "
                                  "expected uint8 N×H×W×3 (RGB)")
            lab = f[labels]
            if lab.ndim != 1 or lab.shape[0] != ds.shape[0] or lab.dtype.kind not in "iu":
                raise SourceError(f"{path}: dataset {labels!r} is {lab.dtype} {list(lab.shape)}, "
                                  f"expected {ds.shape[0]} integer labels")
            self.labels = lab[()].astype(np.int64)
            if classes is None and "classes" in f:
                classes = [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
        self.classes = _check_labels(self.labels, classes, f"{path}:{labels}")

    def __len__(self):
        return len(self.labels)

    def label(self, i):
        return int(self.labels[i])

    def name(self, i):
        return int(i)

    def digest(self):
        return _digest(os.path.abspath(self.path), len(self), self.labels.tobytes(), self.classes)

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    def load(self, indices):
        import h5py
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        order = np.argsort(indices)
        block = self._file[self.images_key][np.asarray(indices)[order]]  # h5py wants increasing indices
        out = [None] * len(indices)
        for j, k in enumerate(order):
            out[k] = block[j]
        return out


class CifarSource:
    """CIFAR-10 (``data_batch_*.bin``, ``test_batch.bin``) or CIFAR-100 (``train.bin``, ``test.bin``, fine
    labels) binary files: records of label byte(s) then 1024 R, 1024 G, 1024 B bytes."""

    def __init__(self, src, split="train", classes=None):
        if os.path.exists(os.path.join(src, "data_batch_1.bin")) or os.path.exists(os.path.join(src, "test_batch.bin")):
            files = sorted(f for f in os.listdir(src) if f.startswith("data_batch_") and f.endswith(".bin")) \
                if split == "train" else ["test_batch.bin"]
            skip, names = 0, "batches.meta.txt"
        elif os.path.exists(os.path.join(src, "train.bin")) or os.path.exists(os.path.join(src, "test.bin")):
            files, skip, names = [f"{split}.bin"], 1, "fine_label_names.txt"
        else:
            raise SourceError(f"{src}: not a CIFAR binary directory (no data_batch_*.bin, test_batch.bin, "
                              "train.bin or test.bin)")
        self.record = 3073 + skip
        self.files = [os.path.join(src, f) for f in files]
        counts = []
        for path in self.files:
            if not os.path.exists(path):
                raise SourceError(f"{path}: missing; --split {split} needs it")
            size = os.path.getsize(path)
            if size == 0 or size % self.record:
                raise SourceError(f"{path}: {size} bytes is not a whole number of {self.record}-byte records")
            counts.append(size // self.record)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.labels = np.concatenate([self._records(k)[:, skip] for k in range(len(self.files))]).astype(np.int64)
        names_path = os.path.join(src, names)
        if classes is None and os.path.exists(names_path):
            with open(names_path, encoding="utf-8") as f:
                classes = [ln.strip() for ln in f if ln.strip()]
        self.classes = _check_labels(self.labels, classes, src)

    def _records(self, k):
        return np.memmap(self.files[k], np.uint8, "r").reshape(-1, self.record)

    def __len__(self):
        return len(self.labels)

    def label(self, i):
        return int(self.labels[i])

    def name(self, i):
        return int(i)

    def digest(self):
        return _digest([os.path.abspath(f) for f in self.files], self.offsets.tolist(), self.labels.tobytes(),
                       self.classes)

    def load(self, indices):
        for i in indices:
            k = int(np.searchsorted(self.offsets, i, side="right")) - 1
            row = self._records(k)[i - self.offsets[k]]
            yield np.ascontiguousarray(row[-3072:].reshape(3, 32, 32).transpose(1, 2, 0))


def detect(src):
    """The source format of SRC: a CIFAR directory, an ImageFolder directory, an HDF5 file or a list file."""
    if os.path.isdir(src):
        names = os.listdir(src)
        if any(n.startswith("data_batch_") or n in ("test_batch.bin", "train.bin", "test.bin") for n in names):
            return "cifar"
        return "imagefolder"
    with open(src, "rb") as f:
        return "hdf5" if f.read(8) == b"\x89HDF\r\n\x1a\n" else "list"


def open_source(src, *, fmt=None, root=None, split="train", h5_images="images", h5_labels="labels",
                classes=None):
    """The source at SRC (format detected unless ``fmt``); ``classes`` fixes the label space."""
    if not os.path.exists(src):
        raise SourceError(f"{src}: no such file or directory")
    fmt = fmt or detect(src)
    if fmt == "imagefolder":
        if not os.path.isdir(src):
            raise SourceError(f"{src}: --format imagefolder needs a directory")
        return image_folder(src, None if classes is None else {c: i for i, c in enumerate(classes)})
    if fmt == "list":
        return list_file(src, root, classes)
    if fmt == "hdf5":
        return HDF5Source(src, h5_images, h5_labels, classes)
    if fmt == "cifar":
        return CifarSource(src, split, classes)
    raise SourceError(f"unknown --format {fmt!r}; one of {', '.join(FORMATS)}")
