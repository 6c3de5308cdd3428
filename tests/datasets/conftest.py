"""Splits whose pixels say where they came from: R = input index, G = row, B = column (size 40, raw)."""
import h5py
import numpy as np
import pytest

from preprocess.build_lmdb import build

SIZE, N, CLASSES = 40, 90, 3


def coded_images(n=N, size=SIZE):
    y, x = np.mgrid[:size, :size]
    images = np.empty((n, size, size, 3), np.uint8)
    images[..., 0] = np.arange(n)[:, None, None]
    images[..., 1] = y
    images[..., 2] = x
    return images


@pytest.fixture(scope="session")
def coded_split(tmp_path_factory):
    """(root, original images, record -> input index) of a raw split with 3 shards, shuffled records."""
    d = tmp_path_factory.mktemp("coded")
    images = coded_images()
    with h5py.File(d / "src.h5", "w") as f:
        f["images"] = images
        f["labels"] = np.arange(N) % CLASSES
    build(str(d / "src.h5"), str(d / "split"), size=SIZE, encoding="raw", shards=3, workers=1, quiet=True)
    import lmdb, msgpack, json  # the record order, read plainly
    meta = json.load(open(d / "split" / "meta.json"))
    sources = []
    for s in meta["shards"]:
        env = lmdb.open(str(d / "split" / s["path"]), readonly=True, lock=False)
        with env.begin() as txn:
            sources += [msgpack.unpackb(v)["source"] for _, v in txn.cursor()]
        env.close()
    return d / "split", images, np.array(sources)


@pytest.fixture(scope="session")
def jpeg_split(tmp_path_factory):
    d = tmp_path_factory.mktemp("jpeg")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8).repeat(6, axis=1).repeat(6, axis=2)
    with h5py.File(d / "src.h5", "w") as f:
        f["images"] = images
        f["labels"] = np.arange(24) % 4
    build(str(d / "src.h5"), str(d / "split"), size=48, encoding="jpeg", quality=95, workers=1, quiet=True,
          mean_image=True)
    return d / "split"
