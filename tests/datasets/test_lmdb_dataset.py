"""LMDBDataset: random access, several instances per process, fork and spawn, pickling, memory and fds."""
import os
import pickle

import numpy as np
import pytest
import torch

from datasets import LMDBDataset, make_loader
from tests.datasets.conftest import CLASSES, N


def test_random_access(coded_split):
    root, originals, sources = coded_split
    ds = LMDBDataset(root)
    assert len(ds) == N and ds.meta["num_records"] == N and ds.classes == ["0", "1", "2"]
    for i in (0, 31, 89, -1):
        image, label = ds[i]
        src = sources[i]
        assert image.dtype == np.uint8 and np.array_equal(image, originals[src]) and label == src % CLASSES
    with pytest.raises(IndexError, match="record 90 out of range"):
        ds[N]
    batch = ds.__getitems__([5, 70, 1])  # spans shards
    assert [lab for _, lab in batch] == [sources[i] % CLASSES for i in (5, 70, 1)]


def test_several_datasets_and_loaders_in_one_process(coded_split):
    root = coded_split[0]
    a, b = LMDBDataset(root), LMDBDataset(root)
    assert np.array_equal(a[3][0], b[3][0])
    loaders = [make_loader(root, batch_size=10, train=False, workers=2, crop=8) for _ in range(2)]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(*loaders))


def test_pickles_as_its_root(coded_split):
    ds = LMDBDataset(coded_split[0])
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 500 and np.array_equal(clone[7][0], ds[7][0])


def as_list(batch):
    return batch


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_dataloader_workers_after_the_parent_opened_it(coded_split, context):
    """The parent reads first (environments open), then worker processes read the same split."""
    root, originals, sources = coded_split
    ds = LMDBDataset(root)
    ds[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context=context,
                                         collate_fn=as_list)
    seen = [int(img[0, 0, 0]) for batch in loader for img, _ in batch]
    assert seen == sources.tolist()
    assert np.array_equal(ds[1][0], originals[sources[1]])  # the parent still reads after its children


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_memory_and_file_descriptors_are_steady(tmp_path_factory):
    """RSS grows under 5% from epoch 2 to epoch 10 over a (small) demo split; no descriptors leak."""
    from preprocess.build_lmdb import build
    from preprocess.make_demo import make_demo
    d = tmp_path_factory.mktemp("demo")
    make_demo(str(d / "images"), train_per_class=20, val_per_class=0, quiet=True)
    build(str(d / "images" / "train"), str(d / "train"), size=80, workers=2, quiet=True)
    loader = make_loader(d / "train", batch_size=32, train=True, workers=2, crop=64)
    rss, fds = {}, {}
    for epoch in range(1, 11):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        rss[epoch], fds[epoch] = _rss_bytes(), len(os.listdir("/proc/self/fd"))
    assert rss[10] < rss[2] * 1.05, {k: v / 2**20 for k, v in rss.items()}
    assert fds[10] == fds[2]
