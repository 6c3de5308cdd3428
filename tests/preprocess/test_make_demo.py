"""The demo data: layout, odd files, and the two properties the issue asks of its content."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from preprocess import make_demo
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_cli("preprocess.make_demo", out, "--train-per-class", 3, "--val-per-class", 1, "--quiet")
    return out


def test_layout_and_determinism(demo, tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        assert sorted(os.listdir(demo / split)) == sorted(make_demo.CLASSES)
        for c in make_demo.CLASSES:
            assert len(os.listdir(demo / split / c)) == n
    make_demo.make_demo(str(tmp_path), train_per_class=3, val_per_class=1, quiet=True)
    a = (demo / "val" / "star" / "val_star_0000.jpg").read_bytes()
    assert a == (tmp_path / "val" / "star" / "val_star_0000.jpg").read_bytes()


def test_odd_files_are_there(demo):
    firsts = {}
    for c in make_demo.CLASSES:
        name = sorted(os.listdir(demo / "train" / c))[0]
        firsts[c] = (name, (demo / "train" / c / name).read_bytes())
    kinds = []
    for name, data in firsts.values():
        try:
            im = Image.open(io.BytesIO(data))
            im.load()
            kinds.append((os.path.splitext(name)[1], im.format, im.mode))
        except OSError:
            kinds.append((os.path.splitext(name)[1], "corrupt", None))
    assert (".jpg", "JPEG", "L") in kinds
    assert (".jpg", "JPEG", "CMYK") in kinds
    assert (".png", "PNG", "RGBA") in kinds
    assert any(data[:8] == b"\x89PNG\r\n\x1a\n" and data[24] == 16 for _, data in firsts.values()), "16-bit PNG"
    assert (".JPEG", "PNG", "RGB") in kinds
    assert (".jpg", "corrupt", None) in kinds


@pytest.mark.parametrize("cls", make_demo.CLASSES)
def test_shapes_are_mirror_symmetric(cls):
    """Class identity survives a horizontal flip: each shape, centred, equals its mirror image."""
    mask = make_demo.shape_mask(cls, 101, 101, 50, 50, 30, np.random.default_rng(0))
    mirrored = mask[:, ::-1]
    overlap = np.minimum(mask, mirrored).sum() / max(mask.sum(), 1)
    assert overlap > 0.97


def test_mean_colour_does_not_give_the_class_away():
    """Nearest-centroid on each image's mean colour, scored on held-out images, stays near chance (10%)."""
    rng = np.random.default_rng(5)
    feats, labels = [], []
    for ci, cls in enumerate(make_demo.CLASSES):
        for _ in range(24):
            img = make_demo.draw_image(rng, cls, 64, 48, canvas=48)
            feats.append(img.reshape(-1, 3).mean(0))
            labels.append(ci)
    feats, labels = np.array(feats), np.array(labels)
    train = np.arange(len(labels)) % 2 == 0
    centroids = np.stack([feats[train & (labels == c)].mean(0) for c in range(10)])
    pred = np.argmin(((feats[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == labels[~train]).mean() < 0.3
