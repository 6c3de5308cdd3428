"""make_loader: geometry against hand-sliced pixels, epochs, ranks, resume, backends, faults and memory."""
import os
import signal

import numpy as np
import pytest
import torch

from datasets import LMDBDataset, format as fmt, make_loader
from tests.datasets.conftest import CLASSES, N, SIZE


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def source_of(images):
    """Input index of each image in a batch: the R channel."""
    return images[:, 0, 0, 0].long()


def test_train_crops_and_flips_are_slices_of_the_originals(coded_split):
    root, originals, _ = coded_split
    loader = make_loader(root, batch_size=16, train=True, workers=2, crop=24, seed=3)
    assert len(loader) == N // 16
    flips, tops = [], []
    for images, labels in loader:
        assert images.shape == (16, 3, 24, 24) and images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.is_contiguous(memory_format=torch.channels_last)
        for img, label in zip(images.numpy(), labels.tolist()):
            src = int(img[0, 0, 0])
            top = int(img[1, 0, 0])
            flipped = img[2, 0, 0] > img[2, 0, -1]
            left = int(img[2, 0, -1] if flipped else img[2, 0, 0])
            expected = originals[src, top:top + 24, left:left + 24]
            if flipped:
                expected = expected[:, ::-1]
            assert np.array_equal(img.transpose(1, 2, 0), expected)
            assert label == src % CLASSES
            flips.append(flipped)
            tops.append(top)
    assert 0.3 < np.mean(flips) < 0.7
    assert min(tops) >= 0 and max(tops) <= SIZE - 24 and len(set(tops)) > 5


def test_eval_is_centre_crop_in_record_order_each_once(coded_split):
    root, originals, sources = coded_split
    loader = make_loader(root, batch_size=32, train=False, workers=2, crop=24)
    batches = collect(loader)
    assert [len(y) for _, y in batches] == [32, 32, 26]
    images = torch.cat([x for x, _ in batches]).numpy()
    assert source_of(torch.from_numpy(images)).tolist() == sources.tolist()
    for img, src in zip(images, sources):
        assert np.array_equal(img.transpose(1, 2, 0), originals[src, 8:32, 8:32])
    assert [x.shape for x, _ in collect(loader)] == [x.shape for x, _ in batches]  # iterates again, whole


def test_default_crop_is_size_minus_32(coded_split):
    x, _ = next(iter(make_loader(coded_split[0], batch_size=4, train=True, workers=0)))
    assert x.shape[-1] == SIZE - 32


def test_epochs_reshuffle_deterministically(coded_split):
    root = coded_split[0]
    a = make_loader(root, batch_size=10, train=True, workers=2, crop=16, seed=1)
    b = make_loader(root, batch_size=10, train=True, workers=0, crop=16, seed=1)
    e0 = torch.cat([source_of(x) for x, _ in a])
    assert len(set(e0.tolist())) == len(e0) == 90
    assert torch.equal(e0, torch.cat([source_of(x) for x, _ in b]))
    a.set_epoch(1)
    e1 = torch.cat([source_of(x) for x, _ in a])
    assert not torch.equal(e0, e1) and sorted(e1.tolist()) == sorted(e0.tolist())


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_complete_equal_shares(coded_split, world_size):
    root, _, sources = coded_split
    train = [torch.cat([source_of(x) for x, _ in make_loader(root, batch_size=7, train=True, workers=1, crop=8,
                                                              rank=r, world_size=world_size)])
             for r in range(world_size)]
    assert len({len(t) for t in train}) == 1
    seen = torch.cat(train).tolist()
    assert len(seen) == len(set(seen)) == (N // (7 * world_size)) * 7 * world_size
    evals = [collect(make_loader(root, batch_size=7, train=False, workers=1, crop=8, rank=r, world_size=world_size))
             for r in range(world_size)]
    assert len({len(e) for e in evals}) == 1, "same number of batches on every rank"
    seen = torch.cat([source_of(x) for e in evals for x, _ in e]).tolist()
    assert sorted(seen) == sorted(sources.tolist()) and len(seen) == N


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_resume_mid_epoch_gives_the_same_remaining_batches(coded_split, backend):
    root = coded_split[0]
    full = make_loader(root, batch_size=8, train=True, workers=2, crop=16, seed=5, backend=backend)
    full.set_epoch(2)
    expected = collect(full)
    first = make_loader(root, batch_size=8, train=True, workers=2, crop=16, seed=5, backend=backend)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    assert state["epoch"] == 2 and state["position"] == 4
    resumed = make_loader(root, batch_size=8, train=True, workers=2, crop=16, seed=5, backend=backend)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    rest = collect(resumed)
    assert len(rest) == len(expected) - 4
    for (x, y), (ex, ey) in zip(rest, expected[4:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    other = make_loader(root, batch_size=9, train=True, workers=0, crop=16, seed=5)
    with pytest.raises(ValueError, match="global batch was 8"):
        other.load_state_dict(state)


def test_backends_agree(coded_split):
    root = coded_split[0]
    threads = collect(make_loader(root, batch_size=8, train=True, workers=2, crop=16, backend="threads"))
    procs = collect(make_loader(root, batch_size=8, train=True, workers=2, crop=16, backend="processes"))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(threads, procs)) and len(threads) == len(procs)


def test_sequential_order_is_local_and_complete(coded_split):
    root, _, _ = coded_split
    loader = make_loader(root, batch_size=5, train=True, workers=1, crop=8, order="sequential")
    plan = loader.plan()
    flat = np.concatenate(plan)
    assert len(set(flat.tolist())) == len(flat) == 90
    assert loader.dataset.readahead


@pytest.mark.parametrize("straight_to_rgb", [True, False])
def test_jpeg_split_decodes_like_the_reference(jpeg_split, monkeypatch, straight_to_rgb):
    """Also with an OpenCV older than 4.10 (no IMREAD_COLOR_RGB: decoded BGR, then converted)."""
    if not straight_to_rgb:
        from datasets import loader as loader_module
        monkeypatch.setattr(loader_module, "_IMREAD_RGB", None)
    ds = LMDBDataset(jpeg_split)
    x, y = next(iter(make_loader(jpeg_split, batch_size=24, train=False, workers=2, crop=48)))
    for img, label, i in zip(x.numpy(), y.tolist(), range(24)):
        ref, ref_label = ds[i]
        assert np.array_equal(img.transpose(1, 2, 0), ref) and label == ref_label


def _corrupt_one_record(root, shard="shard-00001"):
    import lmdb
    import msgpack
    env = lmdb.open(str(root / shard), readonly=True, lock=False)
    with env.begin() as txn:
        key, value = next(iter(txn.cursor()))
    env.close()
    rec = msgpack.unpackb(value)
    data = (root / shard / "data.mdb").read_bytes()
    at = data.index(rec["image"]) + 100
    (root / shard / "data.mdb").write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    return int.from_bytes(key, "big"), rec["source"]


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_corrupt_record_raises_naming_it(coded_split, tmp_path, backend):
    import shutil
    root = tmp_path / "split"
    shutil.copytree(coded_split[0], root)
    index, source = _corrupt_one_record(root)
    loader = make_loader(root, batch_size=10, train=False, workers=2, crop=8, backend=backend)
    with pytest.raises(Exception, match=rf"shard-00001 record {index} \(source {source}\): crc32 mismatch"):
        collect(loader)


def test_missing_shard_and_wrong_version(coded_split, tmp_path):
    import json
    import shutil
    root = tmp_path / "split"
    shutil.copytree(coded_split[0], root)
    shutil.rmtree(root / "shard-00002")
    with pytest.raises(fmt.FormatError, match="shard-00002: shard directory is missing"):
        make_loader(root, batch_size=4, train=True, workers=0)
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "version": 9}))
    with pytest.raises(fmt.FormatError, match="version 9"):
        LMDBDataset(root)


class _DyingDataset(LMDBDataset):
    """Kills the worker process that reads it (not the test process)."""

    parent = os.getpid()

    def visit(self, *args, **kwargs):
        if os.getpid() != self.parent:
            os._exit(3)
        return super().visit(*args, **kwargs)


def test_a_dead_worker_is_an_error_not_a_hang(coded_split):
    loader = make_loader(_DyingDataset(coded_split[0]), batch_size=4, train=True, workers=2, crop=8,
                         backend="processes")
    signal.alarm(120)  # a hang fails the test instead of the suite
    try:
        with pytest.raises(RuntimeError, match="exited unexpectedly"):
            collect(loader)
    finally:
        signal.alarm(0)


def test_record_that_does_not_decode_raises_naming_it(jpeg_split, tmp_path):
    """A record whose bytes are intact (crc32 holds) but are not a JPEG: an error, never a zero image."""
    import shutil

    import lmdb
    import msgpack
    from zlib_ng.zlib_ng import crc32
    root = tmp_path / "split"
    shutil.copytree(jpeg_split, root)
    env = lmdb.open(str(root / "shard-00000"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        rec = msgpack.unpackb(txn.get((5).to_bytes(8, "big")))
        rec["image"] = b"\xff\xd8 not really a jpeg"
        rec["crc32"] = crc32(rec["image"])
        txn.put((5).to_bytes(8, "big"), msgpack.packb(rec))
    env.close()
    with pytest.raises(fmt.FormatError, match=rf"record 5 \(source {rec['source']}\): the jpeg image does not decode"):
        collect(make_loader(root, batch_size=8, train=False, workers=2, crop=32))
    with pytest.raises(fmt.FormatError, match="record 5"):
        LMDBDataset(root)[5]


def test_ranks_see_the_single_process_batches_with_the_same_crops(coded_split):
    """Global batch k on 2 ranks is batch k of a 1-rank run with the global batch size, crops included."""
    root = coded_split[0]
    single = collect(make_loader(root, batch_size=16, train=True, workers=0, crop=16, seed=4))
    ranks = [collect(make_loader(root, batch_size=8, train=True, workers=0, crop=16, seed=4, rank=r,
                                 world_size=2)) for r in range(2)]
    for k, (x, y) in enumerate(single):
        assert torch.equal(x, torch.cat([ranks[0][k][0], ranks[1][k][0]]))
        assert torch.equal(y, torch.cat([ranks[0][k][1], ranks[1][k][1]]))


def test_a_position_resumes_on_another_number_of_ranks_with_the_same_global_batches(coded_split):
    """A run preempted on 2 processes and requeued on 1 (or the other way round) goes on with the global
    batches, crops included, that the original number of ranks would have seen."""
    root = coded_split[0]
    ranks = [collect(make_loader(root, batch_size=8, train=True, workers=0, crop=16, seed=4, rank=r,
                                 world_size=2)) for r in range(2)]
    two = make_loader(root, batch_size=8, train=True, workers=0, crop=16, seed=4, rank=1, world_size=2)
    it = iter(two)
    for _ in range(3):
        next(it)
    one = make_loader(root, batch_size=16, train=True, workers=0, crop=16, seed=4)
    one.load_state_dict(two.state_dict())
    rest = collect(one)
    assert len(rest) == len(ranks[0]) - 3
    for k, (x, y) in enumerate(rest, 3):
        assert torch.equal(x, torch.cat([ranks[0][k][0], ranks[1][k][0]]))
        assert torch.equal(y, torch.cat([ranks[0][k][1], ranks[1][k][1]]))
    back = make_loader(root, batch_size=8, train=True, workers=0, crop=16, seed=4, rank=1, world_size=2)
    back.load_state_dict(one.state_dict() | {"position": 4})
    assert all(torch.equal(a[0], b[0]) for a, b in zip(collect(back), ranks[1][4:]))

    with pytest.raises(ValueError, match=r"global batch was 16 \(8 × 2 ranks\), is now 12"):
        make_loader(root, batch_size=12, train=True, workers=0, crop=16, seed=4).load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match="seed was 4, is now 5"):
        make_loader(root, batch_size=16, train=True, workers=0, crop=16, seed=5).load_state_dict(two.state_dict())
    seq = make_loader(root, batch_size=8, train=True, workers=0, crop=16, seed=4, rank=0, world_size=2,
                      order="sequential")
    state = seq.state_dict() | {"position": 2}
    with pytest.raises(ValueError, match="by 2 process.*data.order=sequential.*resume on 2"):
        make_loader(root, batch_size=16, train=True, workers=0, crop=16, seed=4, order="sequential").load_state_dict(state)
    with pytest.raises(ValueError, match="with data.order=sequential, is now random"):
        make_loader(root, batch_size=8, train=True, workers=0, crop=16, seed=4, world_size=2).load_state_dict(state)
    for position in (0, len(seq)):  # an epoch's start or end: any number of ranks, any order
        for order in ("sequential", "random"):
            make_loader(root, batch_size=16, train=True, workers=0, crop=16, seed=4,
                        order=order).load_state_dict(state | {"position": position})


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_a_pass_over_an_evaluation_loader_is_always_whole(coded_split, backend):
    """A partial pass (next(iter(val))) leaves no position behind: the next pass sees every record once."""
    root, _, sources = coded_split
    val = make_loader(root, batch_size=8, train=False, workers=2, backend=backend)
    next(iter(val))
    labels = torch.cat([y for _, y in val])
    assert len(labels) == len(sources)
    assert len(torch.cat([y for _, y in val])) == len(sources)


# threads: a fork while a loader thread is inside an LMDB read hangs the child in lmdb_dataset's at-fork close
# (py-lmdb's close waits for that read, which never ends in the child): a known defect, not yet fixed
@pytest.mark.parametrize("backend", ["processes"])
def test_a_forked_child_cannot_use_its_parents_loader_and_the_parent_goes_on(coded_split, backend):
    """The child gets one clear error (not the parent's results, nor a wait for ever); closing its copy of the
    loader (as its finaliser does at exit) stops nothing of the parent's; the parent's iteration goes on whole.
    In a process of its own: pytest's threads would make any fork of it fragile."""
    import subprocess
    import sys
    import textwrap

    from tests.conftest import ROOT
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        import torch
        from datasets import make_loader
        loader = make_loader({str(coded_split[0])!r}, batch_size=8, train=True, workers=2, backend={backend!r})
        expected = [y.clone() for _, y in make_loader({str(coded_split[0])!r}, batch_size=8, train=True, workers=0)]
        it = iter(loader)
        got = [next(it)[1].clone()]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own iteration, then the parent's iteration in progress, then its close
            import faulthandler
            faulthandler.dump_traceback_later(60, exit=True)  # never outlives the test, whatever hangs
            said = []
            for attempt in (lambda: next(iter(loader)), lambda: next(it)):
                try:
                    attempt()
                    said.append("no error")
                except RuntimeError as exc:
                    said.append(str(exc))
            loader.close()
            os.write(w, "\\n".join(said).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            said = f.read().split("\\n")
        os.waitpid(pid, 0)
        got += [y.clone() for _, y in it]
        print(len(said), all("forked child" in s and "create a new loader in this process" in s for s in said),
              len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "True", "True"], proc.stdout + proc.stderr[-2000:]
