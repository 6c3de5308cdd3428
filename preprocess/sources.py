"""Where images come from: an ImageFolder tree, a flat folder with a labels file, a Caffe-style list file,
an HDF5 file, CIFAR binaries, or a tar archive of any of the image kinds (``preprocess/tar_source.py``).

Every source has ``classes`` (names; index = label), ``len()``, ``label(i)``, ``name(i)`` (the record's
``source`` field: a relative path, or an input index for array sources), ``digest()`` (changes when the
input list does) and ``load(indices)``, which yields, per index, the file's bytes or an RGB uint8 array.
``skipped`` lists inputs left out while listing (symlink loops), ``warnings`` what the user should know
(a list naming one file twice). Sources are plain picklable objects; files are opened lazily in the process
that reads them.
"""
import hashlib
import os
import re
import stat

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff",
                    ".webp", ".gif")
FORMATS = ("imagefolder", "list", "hdf5", "cifar", "tar")


class SourceError(ValueError):
    """Input that cannot be packed at all; the message names the file, line or dataset."""


class MissingFile(OSError):
    """A listed image file that cannot be read, as (reason, detail); the builder skips it like an undecodable
    image."""


MAX_CLASSES_WITHOUT_LIST = 100_000  # labels without a class list name classes '0'..'K-1'; beyond this, a typo


def _label_limit(n):
    """The largest number of classes that ``n`` inputs without a class list may imply."""
    return max(MAX_CLASSES_WITHOUT_LIST, 2 * n)


def printable(name):
    """``name`` as text that JSON and msgpack can hold: a file name that is not UTF-8 (read by Python with
    surrogate escapes) gets ``\\xNN`` escapes for its odd bytes."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _digest(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()


class FileSource:
    """Image files under ``root`` with integer labels (ImageFolder and list files)."""

    def __init__(self, root, paths, labels, classes, skipped=(), warnings=()):
        self.root, self.paths, self.labels, self.classes = root, paths, labels, classes
        self.skipped, self.warnings = list(skipped), list(warnings)

    def __len__(self):
        return len(self.paths)

    def label(self, i):
        return self.labels[i]

    def name(self, i):
        return printable(self.paths[i])

    def digest(self):
        return _digest([printable(p) for p in self.paths], self.labels, self.classes)

    def load(self, indices):
        for i in indices:
            path = os.path.join(self.root, self.paths[i])
            try:
                mode = os.stat(path).st_mode
                if not stat.S_ISREG(mode):  # opening a FIFO would wait forever for a writer
                    yield MissingFile("not a regular file", _kind(mode))
                    continue
                with open(path, "rb") as f:
                    yield f.read()
            except OSError as exc:
                yield MissingFile("missing file", f"cannot read: {exc.strerror or exc}")


def _kind(mode):
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _walk_links(top, rel_top, real_src, seen, skipped):
    """Image files under ``top``, torchvision's order. Links are followed only out of SRC, and each real folder
    is read once: a link into SRC (its target is read where it is), to a folder holding SRC (a loop), or to a
    folder already read is reported in ``skipped`` and not followed, so no image is packed twice or under
    another class's label."""
    found, stack = [], [(top, rel_top)]
    while stack:
        path, rel = stack.pop()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            skipped.append({"source": rel, "reason": f"cannot list: {exc.strerror or exc}"})
            continue
        subdirs = []
        for e in entries:
            child = os.path.join(rel, e.name)
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if e.is_symlink():
                why = _link_problem(e.path, real_src, seen)
                if why:
                    skipped.append({"source": child, "reason": f"symlink {why}; not followed"})
                    continue
            if is_dir:
                st = os.stat(e.path)
                seen[(st.st_dev, st.st_ino)] = child
                subdirs.append((e.path, child))
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((rel, e.name))
        stack.extend(reversed(subdirs))
    return [os.path.join(d, f) for d, f in sorted(found)]


def inside(path, folder):
    """``path`` is ``folder`` or below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_problem(path, real_src, seen):
    """Why the link at ``path`` must not be followed, or None."""
    target = os.path.realpath(path)
    if inside(real_src, target):
        return f"to {target}, which holds SRC (a loop)"
    if inside(target, real_src):
        return f"to {os.path.relpath(target, real_src)} inside SRC, read where it is"
    try:
        st = os.stat(path)
    except OSError:
        return None  # a dangling link: skipped later as a missing file
    if (st.st_dev, st.st_ino) in seen:
        return f"to {target}, already read as {seen[(st.st_dev, st.st_ino)]}"
    return None


def image_folder(src, class_map=None):
    """torchvision's ImageFolder rules: classes are the sorted first-level folders, files found recursively
    (any case of a common image extension), sorted; links leading out of SRC are followed, each real folder
    read once, so a loop or a link to another class packs nothing twice (``_walk_links``).
    ``class_map`` maps names to another split's labels."""
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise SourceError(f"{src}: no class folders; an ImageFolder tree is SRC/CLASS/IMAGE")
    real_src = os.path.realpath(src)
    for c in classes:
        target = os.path.realpath(os.path.join(src, c))
        if os.path.islink(os.path.join(src, c)) and (inside(target, real_src) or inside(real_src, target)):
            raise SourceError(f"{os.path.join(src, c)}: class folder is a link to {target}, inside SRC or holding "
                              "it: its images would be packed twice or under two labels; remove the link")
    seen, paths, labels, skipped = {}, [], [], []
    for own_label, c in enumerate(classes):
        st = os.stat(os.path.join(src, c))
        seen[(st.st_dev, st.st_ino)] = c
        found = _walk_links(os.path.join(src, c), c, real_src, seen, skipped)
        if not found:
            raise SourceError(f"{os.path.join(src, c)}: class folder holds no image files "
                              f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images")
        if class_map is not None and printable(c) not in class_map:
            raise SourceError(f"{printable(os.path.join(src, c))}: class {printable(c)!r} is not among the "
                              f"--classes-from split's {len(class_map)} classes")
        paths += found
        labels += [class_map[printable(c)] if class_map is not None else own_label] * len(found)
    if class_map is not None:
        classes = sorted(class_map, key=class_map.get)
    return FileSource(src, paths, labels, [printable(c) for c in classes], skipped=skipped)


def labelled_folder(src, labels, class_map=None):
    """Images anywhere under ``src`` (ImageFolder's walk), each labelled by its file name through ``labels``
    (``preprocess.imagenet_labels.ImageLabels``): ImageNet's flat validation folder."""
    skipped = []
    paths = _walk_links(src, "", os.path.realpath(src), {}, skipped)
    if not paths:
        raise SourceError(f"{src}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    names = [labels.class_of(p, src) for p in paths]
    classes = labels.classes(class_map)
    index = {c: i for i, c in enumerate(classes)}
    return FileSource(src, paths, [index[c] for c in names], classes, skipped=skipped)


def _check_labels(labels, classes, where, line_of=None):
    """Integer labels must index ``classes`` (or, without a class list, be >= 0 and few enough to name classes
    '0'..'K-1': a label of 99999999999 is a typo, not 10^11 classes). ``line_of(i)`` names input i's line."""
    if len(labels) == 0:
        raise SourceError(f"{where}: no images")

    def bad(i, what):
        return SourceError(f"{line_of(i)}: label {labels[i]} {what}" if line_of else
                           f"{where}: label {labels[i]} at input {i} {what}")

    lo, hi = int(np.min(labels)), int(np.max(labels))
    if lo < 0:
        raise bad(int(np.argmin(labels)), "is negative")
    if classes is None:
        limit = _label_limit(len(labels))
        if hi >= limit:
            raise bad(int(np.argmax(labels)), f"is beyond what {len(labels)} inputs can use (at most {limit} "
                                              "classes without a class list); fix it, or give the class list "
                                              "with --classes-from")
        return [str(i) for i in range(hi + 1)]
    if hi >= len(classes):
        raise bad(int(np.argmax(labels)), f"is out of range for {len(classes)} classes")
    return list(classes)


def list_file(path, root=None, classes=None, allow_outside_root=False):
    """Caffe ``convert_imageset`` lists: ``relative/path label`` per line (the path may hold spaces). A path
    that leaves ``root`` is refused unless ``allow_outside_root``; a path listed twice is a warning."""
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    real_root = os.path.realpath(root)
    paths, labels, lines, first = [], [], [], {}
    warnings = []
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not a text list file ({_what_binary(path)}); SRC is an ImageFolder directory, "
                          "a list file of 'relative/path label' lines, an HDF5 file or a CIFAR binary directory"
                          ) from None
    lines_in_file = text.count("\n") + 1
    limit = len(classes) if classes is not None else _label_limit(lines_in_file)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not _INTEGER.fullmatch(parts[1]):
            raise SourceError(f"{path}:{n}: expected 'relative/path label', got {line[:200]!r}")
        label, rel = int(parts[1]), parts[0].strip()
        if "\0" in rel:
            raise SourceError(f"{path}:{n}: the path holds a NUL byte")
        if label < 0 or label >= limit:
            raise SourceError(f"{path}:{n}: label {label} is out of range [0, {limit})" + (
                "" if classes is not None else f": more than {lines_in_file} inputs can use without a class list; "
                                               "fix it, or give the class list with --classes-from"))
        real = os.path.realpath(os.path.join(root, rel))
        if not allow_outside_root and os.path.commonpath([real, real_root]) != real_root:
            raise SourceError(f"{path}:{n}: {rel!r} is outside --root {root}; fix the path, or pass "
                              "--allow-outside-root if you mean it")
        if real in first:  # the same file, however it is spelled (a/./x.jpg, ./a/x.jpg, through a link)
            k = first[real]
            warnings.append({"source": rel, "reason": f"listed twice, lines {lines[k]} and {n}, with labels "
                                                      f"{labels[k]} and {label}; both are packed"})
        else:
            first[real] = len(paths)
        paths.append(rel)
        labels.append(label)
        lines.append(n)
    classes = _check_labels(labels, classes, path, line_of=lambda i: f"{path}:{lines[i]}")
    return FileSource(root, paths, labels, classes, warnings=warnings)


_INTEGER = re.compile(r"-?[0-9]+")


def _what_binary(path):
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:3] == b"\xff\xd8\xff":
        return "a JPEG image"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "a PNG image"
    if head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        return "a tar or gzip archive: pass --format tar"
    return "binary data"


class HDF5Source:
    """``images`` (N×H×W×3 uint8 RGB) and ``labels`` (N) datasets, read a chunk at a time."""

    def __init__(self, path, images="images", labels="labels", classes=None):
        import h5py
        self.path, self.images_key = path, images
        self._file = None
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise SourceError(f"{path}: cannot be read as HDF5 ({exc}); is the file complete?") from None
        with f:
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
            raw = lab[()]
            if raw.dtype == np.uint64 and len(raw) and raw.max() > np.iinfo(np.int64).max:
                raise SourceError(f"{path}:{labels}: label {int(raw.max())} at input {int(raw.argmax())} is beyond "
                                  "any class list; fix the labels")
            self.labels = raw.astype(np.int64)
            if 0 in ds.shape[1:3]:
                raise SourceError(f"{path}: dataset {images!r} is {list(ds.shape)}: images of size zero")
            if classes is None and "classes" in f:
                try:
                    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in f["classes"][()]]
                except UnicodeDecodeError:
                    raise SourceError(f"{path}: dataset 'classes' holds names that are not UTF-8 text") from None
        self.classes = _check_labels(self.labels, classes, f"{path}:{labels}")
        self.skipped, self.warnings = [], []

    def __len__(self):
        return len(self.labels)

    def label(self, i):
        return int(self.labels[i])

    def name(self, i):
        return int(i)

    def digest(self):
        return _digest(os.path.basename(self.path), len(self), self.labels.tobytes(), self.classes)

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
            if not files:
                raise SourceError(f"{src}: no data_batch_*.bin for --split train; use --split test, or add them")
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
            try:
                with open(names_path, encoding="utf-8") as f:
                    classes = [ln.strip() for ln in f if ln.strip()]
            except UnicodeDecodeError:
                raise SourceError(f"{names_path}: not UTF-8 text; fix or remove it") from None
        self.classes = _check_labels(self.labels, classes, src)
        self.skipped, self.warnings = [], []

    def _records(self, k):
        return np.memmap(self.files[k], np.uint8, "r").reshape(-1, self.record)

    def __len__(self):
        return len(self.labels)

    def label(self, i):
        return int(self.labels[i])

    def name(self, i):
        return int(i)

    def digest(self):
        return _digest([os.path.basename(f) for f in self.files], self.offsets.tolist(), self.labels.tobytes(),
                       self.classes)

    def load(self, indices):
        for i in indices:
            k = int(np.searchsorted(self.offsets, i, side="right")) - 1
            row = self._records(k)[i - self.offsets[k]]
            yield np.ascontiguousarray(row[-3072:].reshape(3, 32, 32).transpose(1, 2, 0))


class Part:
    """The ``index``-th of ``count`` shares of a source: positions ``[index·N // count, (index+1)·N // count)``
    of the whole build's record order ``order`` (its seeded permutation of the N inputs), kept in that order.
    The rule needs nothing but N and the seed, so parts built anywhere are disjoint, cover every input, and
    laid end to end give the single build's records in its order. What listing found (skipped links,
    warnings) belongs to part 0, so the parts' union is the whole."""

    def __init__(self, source, index, count, order):
        n = len(source)
        self.source, self.index, self.count, self.total = source, index, count, n
        self.start, self.stop = index * n // count, (index + 1) * n // count
        self.inputs = [int(i) for i in order[self.start:self.stop]]
        self.classes = source.classes
        self.class_names = getattr(source, "class_names", None)
        self.skipped = source.skipped if index == 0 else []
        self.warnings = source.warnings if index == 0 else []

    def __len__(self):
        return self.stop - self.start

    def label(self, i):
        return self.source.label(self.inputs[i])

    def name(self, i):
        return self.source.name(self.inputs[i])

    def digest(self):
        return _digest(self.source.digest(), self.index, self.count, self.inputs)

    def load(self, indices):
        return self.source.load([self.inputs[i] for i in indices])

    def describe(self):
        """The ``part`` field of the part's meta.json."""
        return {"index": self.index, "count": self.count, "inputs": [self.start, self.stop], "of": self.total,
                "digest": self.source.digest()}


def detect(src):
    """The source format of SRC: a CIFAR directory, an ImageFolder directory, an HDF5 file, a tar (plain or
    gzip-compressed) or a list file."""
    if os.path.isdir(src):
        names = os.listdir(src)
        if any(n.startswith("data_batch_") or n in ("test_batch.bin", "train.bin", "test.bin") for n in names):
            return "cifar"
        return "imagefolder"
    with open(src, "rb") as f:
        head = f.read(512)
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "hdf5"
    from preprocess.tar_source import looks_like_tar  # it imports this module
    if head[:2] == b"\x1f\x8b" or looks_like_tar(head):
        return "tar"
    return "list"


def open_source(src, *, fmt=None, root=None, split="train", h5_images="images", h5_labels="labels",
                classes=None, allow_outside_root=False, labels=None, workers=1, quiet=True, shown=None):
    """The source at SRC (format detected unless ``fmt``); ``classes`` fixes the label space; ``labels`` (a
    path) labels a flat folder or tar of images by file name; ``workers`` list a tar's inner tars (with a
    progress bar unless ``quiet``); messages name SRC ``shown`` (a decompressed tar's original)."""
    if not os.path.exists(src):
        raise SourceError(f"{src}: no such file or directory")
    if not (os.path.isdir(src) or os.path.isfile(src)):  # a FIFO would block the first read forever
        raise SourceError(f"{src}: neither a folder nor a regular file; SRC is an ImageFolder directory, a list file, "
                          "an HDF5 file, a CIFAR binary directory or a tar archive")
    fmt = fmt or detect(src)
    class_map = None if classes is None else {c: i for i, c in enumerate(classes)}
    if labels is not None:
        if fmt not in ("imagefolder", "tar"):
            raise SourceError(f"--labels {labels}: only for a flat folder or tar of images, not a {fmt} source")
        from preprocess.imagenet_labels import read_labels
        labels = read_labels(labels)
    if fmt == "tar":
        from preprocess.tar_source import list_tar
        source = list_tar(src, root=root, labels=labels, class_map=class_map, workers=workers, quiet=quiet,
                          shown=shown)
    elif fmt == "imagefolder" and labels is not None:
        if not os.path.isdir(src):
            raise SourceError(f"{src}: --format imagefolder needs a directory")
        source = labelled_folder(src, labels, class_map)
    else:
        source = None
    if source is not None:
        if labels is not None:
            source.class_names = labels.names
            unused = labels.unused()
            if unused:
                source.warnings.append({"source": labels.path, "reason": f"{len(unused)} labelled image(s) are not "
                                                                         f"in {src} (e.g. {unused[0]})"})
        return source
    if fmt == "imagefolder":
        if not os.path.isdir(src):
            raise SourceError(f"{src}: --format imagefolder needs a directory")
        return image_folder(src, class_map)
    if fmt == "list":
        return list_file(src, root, classes, allow_outside_root)
    if fmt == "hdf5":
        return HDF5Source(src, h5_images, h5_labels, classes)
    if fmt == "cifar":
        return CifarSource(src, split, classes)
    raise SourceError(f"unknown --format {fmt!r}; one of {', '.join(FORMATS)}")
