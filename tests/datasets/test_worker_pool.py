"""Worker processes: they die with their parent (even with tasks queued), never finalise the parent's objects, close()
cleans up once and only once, their errors carry their traceback and the record, page-locking is undone when it
fails, and CUDA stays untouched for a CPU loader."""
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from datasets import LMDBDataset, make_loader
from datasets.worker_pool import ProcessPool
from tests.conftest import ROOT


def alive(pid):
    """A process that exists and is not a zombie (an orphan may wait a moment for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids, seconds):
    """The pids still alive after ``seconds`` (killed then, so that a failing test leaves no orphan)."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


def _kill_owner(script, *, workers, within):
    """Run ``script`` (it prints its workers' pids, then waits), SIGKILL it: the workers still alive ``within``
    seconds later."""
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == workers and all(alive(p) for p in pids)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        return _wait_gone(pids, within)
    finally:
        owner.kill()


def test_kill_9_of_the_owner_leaves_no_worker(coded_split):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from datasets import make_loader
        loader = make_loader({str(coded_split[0])!r}, batch_size=8, train=True, workers=2, crop=8)
        it = iter(loader)
        next(it)
        print(*[p.pid for p in loader._pool.procs], flush=True)
        time.sleep(600)
    """)
    left = _kill_owner(script, workers=2, within=10)
    assert not left, f"workers {left} outlived their owner by 10 s"


def test_kill_9_of_the_owner_with_tasks_queued_leaves_no_worker():
    """150 tasks of 0.2 s queued for 3 workers (10 s of work): an orphan stops at its next task, not its last."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from datasets.worker_pool import ProcessPool

        class Slow:
            def fill(self, k, images, labels):
                time.sleep(0.2)
                return len(labels), []

        pool = ProcessPool(lambda epoch: Slow(), workers=3, slots=152, batch_shape=(1, 1, 1, 3))
        run = pool.run(0, 0, 150)
        next(run)  # every task is queued once the first batch is back
        print(*[p.pid for p in pool.procs], flush=True)
        time.sleep(600)
    """)
    left = _kill_owner(script, workers=3, within=5)
    assert not left, f"workers {left} outlived their owner by 5 s, building its queued batches"


class _Collecting:
    """Batches whose building runs a full garbage collection in the worker, as any library call may."""

    def fill(self, k, images, labels):
        gc.collect()
        return len(labels), []


def test_a_collection_in_a_worker_never_finalises_the_parents_objects(tmp_path):
    """Garbage the parent has not collected yet when the workers fork (a CUDA object, a batch's lease in a cycle)
    is finalised once, by the parent: a worker's collection must not run its finaliser too."""
    log = tmp_path / "finalised-by"

    class Cyclic:
        def __del__(self):
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")

    gc.collect()
    gc.disable()  # so that the cycle is still uncollected garbage at the fork, whatever the allocations before it
    try:
        cycle = Cyclic()
        cycle.me = cycle
        del cycle
        pool = ProcessPool(lambda epoch: _Collecting(), workers=1, slots=3, batch_shape=(1, 1, 1, 3))
        pids = [p.pid for p in pool.procs]
    finally:
        gc.enable()
    assert len(list(pool.run(0, 0, 3))) == 3  # the worker has collected, three times
    pool.close()
    gc.collect()
    finalised_by = [int(p) for p in log.read_text().split()] if log.exists() else []
    assert finalised_by == [os.getpid()], f"finalised by {finalised_by}; parent {os.getpid()}, worker {pids}"


def test_starting_a_pool_leaves_the_applications_gc_state_as_it_was():
    """An application that froze its objects (gc.freeze, as servers do before forking) keeps them frozen, and a
    collector it turned off stays off."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        pool = ProcessPool(lambda epoch: _Collecting(), workers=1, slots=3, batch_shape=(1, 1, 1, 3))
        assert gc.get_freeze_count() >= frozen and gc.isenabled()
        pool.close()
        gc.disable()
        pool = ProcessPool(lambda epoch: _Collecting(), workers=1, slots=3, batch_shape=(1, 1, 1, 3))
        assert not gc.isenabled()
        pool.close()
    finally:
        gc.enable()
        gc.unfreeze()


class _Labelled:
    """Batch k: labels k."""

    def fill(self, k, images, labels):
        labels[:] = k
        return len(labels), []


def test_every_task_the_pool_can_queue_fits_in_its_pipe():
    """The trainer writes its tasks into the pipe itself, so a full pipe would block it: with 4,000 slots (4,000
    tasks of 29 bytes at once, beyond a pipe's default 64 KiB) and the worker stopped, queueing them still returns."""
    slots = 4000
    pool = ProcessPool(lambda epoch: _Labelled(), workers=1, slots=slots, batch_shape=(1, 1, 1, 3))
    worker = pool.procs[0].pid
    os.kill(worker, signal.SIGSTOP)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(int(y[0]) for _, y, _ in pool.run(0, 0, slots - 2)))
    try:
        consumer.start()
        deadline = time.monotonic() + 5
        while len(pool._in_flight) < slots - 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = len(pool._in_flight)
    finally:
        os.kill(worker, signal.SIGCONT)
    consumer.join(60)
    pool.close()
    assert queued == slots - 2, f"the trainer blocked after queueing {queued} of {slots - 2} tasks"
    assert got == list(range(slots - 2))


def test_close_twice_and_batches_held_across_close(coded_split):
    loader = make_loader(coded_split[0], batch_size=8, train=False, workers=2, crop=8)
    x, y = next(iter(loader))
    kept = x.clone()
    pool = loader._pool
    pids = [p.pid for p in pool.procs]
    loader.close()
    loader.close()
    pool.close()
    assert not any(alive(p) for p in pids)
    assert torch.equal(x, kept), "a batch held across close() keeps its memory"
    del x
    again = [b.clone() for b, _ in make_loader(coded_split[0], batch_size=8, train=False, workers=0, crop=8)]
    assert torch.equal(again[0], kept)
    assert [b.shape for b, _ in loader] == [b.shape for b in again], "a closed loader starts new workers (and an " \
        "evaluation pass is whole)"
    loader.close()


class _FailingDataset(LMDBDataset):
    """Fails on record 7 inside the per-record work, as a bug in a decoder would."""

    def visit(self, indices, fn, **kwargs):
        def checked(pos, i, rec):
            if i == 7:
                decoder_bug_on_purpose(i)
            fn(pos, i, rec)
        return super().visit(indices, checked, **kwargs)


def decoder_bug_on_purpose(i):
    return 1 // (i - 7)


@pytest.mark.parametrize("backend", ["processes", "threads"])
def test_a_worker_error_names_the_record_and_keeps_its_traceback(coded_split, backend):
    loader = make_loader(_FailingDataset(coded_split[0]), batch_size=8, train=False, workers=2, crop=8,
                         backend=backend)
    with pytest.raises(ZeroDivisionError) as info:
        list(loader)
    text = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert "record 7" in text and "shard-0000" in text
    chain = "".join(str(e) for e in (info.value, info.value.__cause__) if e is not None)
    import traceback
    chain += "".join(traceback.format_exception(info.value))
    assert "decoder_bug_on_purpose" in chain, "the worker's traceback reaches the caller"


def test_a_cpu_loader_never_touches_cuda(coded_split, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("CUDA was queried or initialised for a CPU loader")

    monkeypatch.setattr(torch.cuda, "is_available", forbidden)
    monkeypatch.setattr(torch.cuda, "cudart", forbidden)
    monkeypatch.setattr(torch.cuda, "init", forbidden)
    for backend in ("processes", "threads"):
        loader = make_loader(coded_split[0], batch_size=8, train=True, workers=2, crop=8, backend=backend)
        assert len(list(loader)) == 11
        loader.close()


class _Registrar:
    """Stands in for cudaHostRegister/cudaHostUnregister: fails on the ``fail_at``-th registration."""

    def __init__(self, fail_at=None):
        self.fail_at, self.registered, self.calls, self.cleared = fail_at, set(), 0, 0

    def register(self, ptr, nbytes):
        self.calls += 1
        if self.calls == self.fail_at:
            return 1  # an error code, left pending as CUDA would
        assert ptr not in self.registered
        self.registered.add(ptr)
        return 0

    def unregister(self, ptr):
        self.registered.remove(ptr)
        return 0

    def clear_error(self):
        self.cleared += 1


def _pool(registrar):
    class Batches:
        def fill(self, k, images, labels):
            images[:] = k
            labels[:] = k
            return len(labels), []
    return ProcessPool(lambda epoch: Batches(), workers=1, slots=4, batch_shape=(2, 4, 4, 3), registrar=registrar)


def test_page_locking_registers_every_slot_and_close_unregisters_them():
    reg = _Registrar()
    pool = _pool(reg)
    assert pool.pinned and len(reg.registered) == 4
    assert [int(x[0, 0, 0, 0]) for x, *_ in pool.run(0, 0, 3)] == [0, 1, 2]
    pool.close()
    pool.close()
    assert not reg.registered


def test_a_failed_page_lock_leaves_nothing_registered_and_no_error_pending():
    reg = _Registrar(fail_at=3)
    with pytest.warns(RuntimeWarning, match="page-lock"):
        pool = _pool(reg)
    assert not pool.pinned and not reg.registered and reg.cleared == 1
    assert [int(x[0, 0, 0, 0]) for x, *_ in pool.run(0, 0, 3)] == [0, 1, 2]
    pool.close()


def test_sequential_order_opens_the_shards_with_readahead(tmp_path, tiny):
    """train.py with data.order=sequential: the training split's environments really read ahead."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from alexnet import config, run
        from datasets import lmdb_dataset
        cfg = config.load("configs/demo.yaml", ["data.train={tiny / 'train'}", "data.val={tiny / 'train'}",
                                                "data.order=sequential", "data.workers=0"])
        train, val, _ = run.data(cfg, 0, 1)
        next(iter(train))
        print(train.dataset.readahead, sorted({{env.flags()["readahead"] for env in lmdb_dataset._envs.values()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "[True]"]


def _flip_record(split, tmp_path, index):
    import shutil

    import lmdb
    import msgpack
    root = tmp_path / "split"
    shutil.copytree(split, root)
    meta = __import__("json").loads((root / "meta.json").read_text())
    offset = 0
    for shard in meta["shards"]:
        if index < offset + shard["num_records"]:
            env = lmdb.open(str(root / shard["path"]), map_size=1 << 26)
            with env.begin(write=True) as txn:
                key = index.to_bytes(8, "big")
                rec = msgpack.unpackb(txn.get(key))
                rec["crc32"] ^= 1
                txn.put(key, msgpack.packb(rec))
            env.close()
            return root
        offset += shard["num_records"]


@pytest.mark.parametrize("device_stage", [False, True])
def test_an_error_comes_after_the_batches_before_it(coded_split, tmp_path, device_stage):
    """Batch 5 holds a corrupt record: batches 0-4 arrive first, on every backend, with or without the device
    stage (which reads ahead), and the position says 5."""
    from tests.datasets.test_ownership import DeferredCopier
    from datasets import format as fmt
    root = _flip_record(coded_split[0], tmp_path, 42)
    for run in range(4):
        for backend, workers in (("processes", 3), ("threads", 3), ("processes", 0)):
            loader = make_loader(root, batch_size=8, train=False, workers=workers, crop=8, backend=backend,
                                 copier=DeferredCopier() if device_stage else None)
            got = []
            with pytest.raises(fmt.FormatError, match="record 42"):
                for batch in loader:
                    got.append(batch)
            assert len(got) == 5 and loader.position == 5, (backend, workers, run, len(got))
            loader.close()


def test_the_loader_recovers_after_its_workers_die(coded_split):
    loader = make_loader(coded_split[0], batch_size=8, train=False, workers=2, crop=8)
    it = iter(loader)
    next(it)
    for p in loader._pool.procs:
        os.kill(p.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(it)
    assert time.monotonic() - t0 < 4, "a dead worker is reported without waiting on the others"
    loader.position = 0
    assert sum(len(y) for _, y in loader) == 90
    loader.close()


class _BusErrorDataset(LMDBDataset):
    parent = os.getpid()

    def visit(self, *args, **kwargs):
        if os.getpid() != self.parent:
            os.kill(os.getpid(), signal.SIGBUS)
        return super().visit(*args, **kwargs)


def test_a_worker_killed_by_sigbus_says_what_to_check(coded_split):
    loader = make_loader(_BusErrorDataset(coded_split[0]), batch_size=8, train=True, workers=2, crop=8)
    with pytest.raises(RuntimeError, match=r"signal SIGBUS; a shard file is damaged .*preprocess.verify"):
        list(loader)
