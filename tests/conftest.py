"""Shared helpers: small image files written with Pillow, and the project's commands run as a user runs them."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# Bit-identical comparisons of training runs need the same arithmetic in every process: a fixed thread count, and
# MKL kept from choosing its own thread count or code path per call (its results may otherwise vary run to run).
DETERMINISTIC = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MKL_DYNAMIC": "FALSE", "MKL_CBWR": "COMPATIBLE"}


def run_cli(*args, check=True, timeout=300):
    """Run ``python -m MODULE ARGS`` from the repository root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def random_rgb(rng, h, w, cell=8):
    """A smooth random RGB image (random colours every ``cell`` pixels, bilinear between): compresses like
    a photo, differs from every other one."""
    small = rng.integers(0, 256, (max(2, h // cell), max(2, w // cell), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def encode(rgb, kind="JPEG", **kw):
    b = io.BytesIO()
    Image.fromarray(rgb).save(b, kind, **({"quality": 95} if kind == "JPEG" else {}) | kw)
    return b.getvalue()


def write_image_folder(root, classes, per_class, rng, size=(96, 72)):
    """root/CLASS/img_K.jpg with distinct content; returns {relative path: rgb array}."""
    written = {}
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for k in range(per_class):
            rgb = random_rgb(rng, size[1], size[0])
            rel = os.path.join(c, f"img_{k}.jpg")
            with open(os.path.join(root, rel), "wb") as f:
                f.write(encode(rgb))
            written[rel] = rgb
    return written


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A shrunken demo: 10 classes, 30 training and 6 validation images each, packed at 72×72."""
    from preprocess.build_lmdb import build
    from preprocess.make_demo import make_demo
    d = tmp_path_factory.mktemp("tiny")
    make_demo(str(d / "images"), seed=1, train_per_class=30, val_per_class=6, quiet=True)
    build(str(d / "images" / "train"), str(d / "train"), size=72, workers=2, quiet=True)
    build(str(d / "images" / "val"), str(d / "val"), size=72, workers=2, quiet=True, classes_from=str(d / "train"))
    return d


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory):
    """Two checkpoints of a short run on the tiny demo split (best.pt after epoch 0, last.pt after epoch 1)."""
    out = tmp_path_factory.mktemp("run")
    args = [sys.executable, "train.py", "configs/demo.yaml", f"data.train={tiny / 'train'}",
            f"data.val={tiny / 'val'}", f"out_dir={out}", "train.epochs=2", "train.batch_size=64"]
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture
def small_disk(tmp_path):
    """mount(size): a tmpfs of that size under tmp_path, where the test may mount one (root, Linux); the test is
    skipped elsewhere. Unmounted at the end."""
    mounted = []

    def mount(size):
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a small filesystem here")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
