"""Each source kind, read against the files written here, and each malformed input's error."""
import os

import h5py
import numpy as np
import pytest

from preprocess.sources import SourceError, detect, open_source
from tests.conftest import encode, random_rgb


def test_image_folder_follows_torchvision_rules(tmp_path, rng):
    for rel in ["b/x2.JPG", "b/sub/deeper/x1.png", "a/z.jpeg", "a/y.Webp", "c/ünïcode name.jpg"]:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        (tmp_path / rel).write_bytes(encode(random_rgb(rng, 8, 8)))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "stray.jpg").write_bytes(b"top-level files are not a class")
    src = open_source(str(tmp_path))
    assert detect(str(tmp_path)) == "imagefolder"
    assert src.classes == ["a", "b", "c"]
    names = [src.name(i) for i in range(len(src))]
    assert names == ["a/y.Webp", "a/z.jpeg", "b/x2.JPG", "b/sub/deeper/x1.png", "c/ünïcode name.jpg"]  # walk order
    assert [src.label(i) for i in range(len(src))] == [0, 0, 1, 1, 2]


def test_image_folder_errors(tmp_path, rng):
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="no class folders"):
        open_source(str(tmp_path))
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "d.jpg").write_bytes(encode(random_rgb(rng, 8, 8)))
    with pytest.raises(SourceError, match=r"cat: class folder holds no image files"):
        open_source(str(tmp_path))
    (tmp_path / "cat" / "c.jpg").write_bytes(encode(random_rgb(rng, 8, 8)))
    src = open_source(str(tmp_path), classes=["ant", "cat", "dog"])
    assert src.classes == ["ant", "cat", "dog"] and [src.label(0), src.label(1)] == [1, 2]
    with pytest.raises(SourceError, match="class 'dog' is not among"):
        open_source(str(tmp_path), classes=["cat"])


def test_list_file(tmp_path, rng):
    (tmp_path / "imgs").mkdir()
    for name in ["a b.jpg", "c.jpg"]:
        (tmp_path / "imgs" / name).write_bytes(encode(random_rgb(rng, 8, 8)))
    lst = tmp_path / "train.txt"
    lst.write_text("a b.jpg 2\n\nc.jpg 0\r\n")
    src = open_source(str(lst), root=str(tmp_path / "imgs"))
    assert detect(str(lst)) == "list"
    assert src.classes == ["0", "1", "2"]
    assert [(src.name(i), src.label(i)) for i in range(2)] == [("a b.jpg", 2), ("c.jpg", 0)]
    assert next(src.load([1])) == (tmp_path / "imgs" / "c.jpg").read_bytes()
    lst.write_text("a b.jpg 2\nc.jpg\n")
    with pytest.raises(SourceError, match=r"train.txt:2: expected 'relative/path label'"):
        open_source(str(lst))
    lst.write_text("a b.jpg 2\nc.jpg 5\n")
    with pytest.raises(SourceError, match=r"train.txt:2: label 5 is out of range \[0, 3\)"):
        open_source(str(lst), classes=["x", "y", "z"])
    lst.write_text("a b.jpg -1\n")
    with pytest.raises(SourceError, match=r"train.txt:1: label -1"):
        open_source(str(lst))


def test_hdf5_source(tmp_path, rng):
    images = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["pix"] = images
        f["y"] = np.array([1, 0, 1, 2, 0])
        f["wrong"] = images[..., 0]
    assert detect(str(path)) == "hdf5"
    with pytest.raises(SourceError, match="no dataset 'images'.*pix"):
        open_source(str(path))
    src = open_source(str(path), h5_images="pix", h5_labels="y")
    assert len(src) == 5 and src.classes == ["0", "1", "2"] and src.label(3) == 2
    got = list(src.load([4, 1, 3]))
    for i, im in zip([4, 1, 3], got):
        assert np.array_equal(im, images[i])
    with pytest.raises(SourceError, match=r"dataset 'wrong' is uint8 \[5, 6, 7\]"):
        open_source(str(path), h5_images="wrong", h5_labels="y")
    with pytest.raises(SourceError, match="label 2 at input 3 is out of range for 2 classes"):
        open_source(str(path), h5_images="pix", h5_labels="y", classes=["a", "b"])


def write_cifar10(d, rng, per_batch=3):
    """The CIFAR-10 binary layout: a label byte, then 1024 R, 1024 G, 1024 B bytes, row-major."""
    os.makedirs(d, exist_ok=True)
    images, labels = [], []
    for name in [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]:
        rows = []
        for _ in range(per_batch):
            im = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            lab = int(rng.integers(0, 10))
            rows.append(bytes([lab]) + im[..., 0].tobytes() + im[..., 1].tobytes() + im[..., 2].tobytes())
            if name != "test_batch.bin":
                images.append(im)
                labels.append(lab)
        (d / name).write_bytes(b"".join(rows))
    (d / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n\n")
    return images, labels


def test_cifar10_binary(tmp_path, rng):
    images, labels = write_cifar10(tmp_path, rng)
    src = open_source(str(tmp_path))
    assert detect(str(tmp_path)) == "cifar"
    assert len(src) == 15 and src.classes[3] == "class3"
    assert [src.label(i) for i in range(15)] == labels
    for i, im in zip([0, 7, 14], src.load([0, 7, 14])):
        assert np.array_equal(im, images[i])
    assert len(open_source(str(tmp_path), split="test")) == 3
    (tmp_path / "data_batch_2.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(SourceError, match="data_batch_2.bin: 3000 bytes is not a whole number of 3073-byte"):
        open_source(str(tmp_path))


def test_cifar100_binary_uses_fine_labels(tmp_path, rng):
    im = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    row = bytes([3, 42]) + im.transpose(2, 0, 1).tobytes()
    (tmp_path / "train.bin").write_bytes(row * 2)
    (tmp_path / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)))
    src = open_source(str(tmp_path))
    assert [src.label(0), src.label(1)] == [42, 42] and len(src.classes) == 100
    assert np.array_equal(next(iter(src.load([1]))), im)
