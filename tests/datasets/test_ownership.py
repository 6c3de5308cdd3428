"""A batch the caller holds is never written again: every backend, 1 to 16 workers, held whole or as views, abandoned
iterations that overlap, and copies to a device that are still in flight (through the event seam)."""
import gc
import threading

import pytest
import torch

from datasets import make_loader
from datasets.device import Copier, to_device
from datasets.worker_pool import ProcessPool

CROP = 16


def reference(root, epoch, *, batch_size=8, train=True):
    """The batches of ``epoch`` built in the calling thread (workers=0), cloned."""
    loader = make_loader(root, batch_size=batch_size, train=train, workers=0, crop=CROP, seed=7)
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same(got, expected):
    assert len(got) == len(expected)
    bad = [k for k, ((x, y), (ex, ey)) in enumerate(zip(got, expected)) if not (torch.equal(x, ex) and torch.equal(y, ey))]
    assert not bad, f"batches {bad} of {len(expected)} differ from the workers=0 batches"


# (workers, prefetch, batch size): an epoch of more batches than the pool has slots (workers × prefetch + 2, + 4 with
# a device stage), so that slots are reused within it; 16 workers run on 2 cores here
@pytest.mark.parametrize("backend", ["processes", "threads"])
@pytest.mark.parametrize("workers,prefetch,batch_size", [(1, 1, 8), (2, 1, 8), (2, 2, 8), (3, 4, 4), (16, 2, 2)])
def test_holding_every_batch_keeps_every_batch(coded_split, backend, workers, prefetch, batch_size):
    root = coded_split[0]
    loader = make_loader(root, batch_size=batch_size, train=True, workers=workers, prefetch=prefetch, crop=CROP,
                         seed=7, backend=backend)
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert_same(list(loader), reference(root, epoch, batch_size=batch_size))


def test_holding_only_views_keeps_the_batch(coded_split):
    """The caller keeps a slice of each batch and drops the batch: the slice still pins the memory."""
    root = coded_split[0]
    loader = make_loader(root, batch_size=8, train=True, workers=2, prefetch=1, crop=CROP, seed=7)
    views = [(x[2:5, :, 1:], y) for x, y in loader]
    gc.collect()
    views.append(None)  # and the loader runs another epoch while they are held
    loader.set_epoch(1)
    again = list(loader)
    expected = reference(root, 0)
    for (v, y), (ex, ey) in zip(views[:-1], expected):
        assert torch.equal(v, ex[2:5, :, 1:]) and torch.equal(y, ey)
    assert_same(again, reference(root, 1))


@pytest.mark.parametrize("backend", ["processes", "threads"])
@pytest.mark.parametrize("workers,batch_size", [(2, 8), (16, 2)])
def test_abandoned_iterations_never_corrupt_later_ones(coded_split, backend, workers, batch_size):
    root = coded_split[0]
    loader = make_loader(root, batch_size=batch_size, train=True, workers=workers, prefetch=2, crop=CROP, seed=7,
                         backend=backend)
    expected = reference(root, 0, batch_size=batch_size)
    for _ in range(12):
        it = iter(loader)
        first = [next(it), next(it)]
        del it  # a `break` after two batches: its tasks are still being built
        loader.position = 0
        whole = list(loader)
        assert_same(first, expected[:2])
        assert_same(whole, expected)


def test_next_iter_repeatedly_then_a_whole_epoch(coded_split):
    root = coded_split[0]
    loader = make_loader(root, batch_size=8, train=True, workers=3, prefetch=2, crop=CROP, seed=7)
    expected = reference(root, 0)
    firsts = [next(iter(loader)) for _ in range(10)]  # each new training iteration goes on where the last stopped
    loader.position = 0
    assert_same(firsts, expected[:10])
    assert_same(list(loader), expected)


def test_an_overtaken_iteration_says_so(coded_split):
    loader = make_loader(coded_split[0], batch_size=8, train=True, workers=2, crop=CROP, seed=7)
    old = iter(loader)
    next(old)
    new = iter(loader)
    next(new)
    with pytest.raises(RuntimeError, match="a newer iteration of this loader"):
        next(old)
    assert_same(list(new), reference(coded_split[0], 0)[2:])


class HeldEvent:
    """An event-like object that completes only when the test (or ``synchronize``) says so. Completing it runs the
    "DMA": the copy reads the host batch then, as a real asynchronous copy would."""

    def __init__(self, run):
        self.run, self.done = run, False

    def query(self):
        return self.done

    def synchronize(self):
        if not self.done:
            self.run()
            self.run, self.done = None, True  # a finished copy refers to its host memory no more


class DeferredCopier(Copier):
    """Copies to "a device" that reads the host memory only when the copy's event completes."""

    def __init__(self, hold_first=0):
        self.events, self.hold_first = [], hold_first
        self.lock = threading.Lock()

    def copy(self, images, labels):
        out_x, out_y = torch.empty_like(images), torch.empty_like(labels)

        def run():
            out_x.copy_(images)
            out_y.copy_(labels)

        event = HeldEvent(run)
        self.events.append(event)
        return out_x, out_y, event

    def wait(self, event, *device_tensors):
        pass  # the consumer's stream would wait; the test reads the outputs only after completing every event


def complete_all(copier):
    for e in copier.events:
        e.synchronize()


@pytest.mark.parametrize("backend", ["processes", "threads"])
@pytest.mark.parametrize("workers,batch_size", [(2, 8), (16, 2)])
def test_a_copy_in_flight_keeps_its_host_buffer(coded_split, backend, workers, batch_size):
    root = coded_split[0]
    copier = DeferredCopier()
    loader = make_loader(root, batch_size=batch_size, train=True, workers=workers, prefetch=1, crop=CROP, seed=7,
                         backend=backend, copier=copier)
    got = []
    for x, y in loader:
        got.append((x, y))  # "device" tensors; the host batches behind them were dropped long ago
    complete_all(copier)
    assert_same(got, reference(root, 0, batch_size=batch_size))


class _Numbered:
    def fill(self, k, images, labels):
        images[:] = k
        labels[:] = k
        return len(labels), []


def test_the_slot_comes_back_when_the_event_completes():
    pool = ProcessPool(lambda epoch: _Numbered(), workers=1, slots=6, batch_shape=(2, 4, 4, 3))
    copier = DeferredCopier()
    host = ((torch.from_numpy(x), torch.from_numpy(y)) for x, y, _ in pool.run(0, 0, 3))
    device = to_device(host, copier, ahead=2, in_flight=2)
    next(device)  # batches 0-2 read from the pool, 0 handed over, no copy complete
    gc.collect()
    assert pool.free_slots() == 3
    next(device)
    gc.collect()
    assert pool.free_slots() == 3, "a slot came back while its copy was in flight"
    copier.events[0].synchronize()
    next(device)  # the stage looks at its copies before each hand-over
    gc.collect()
    assert pool.free_slots() == 4, "the slot of the completed copy is free again"
    for e in copier.events:
        e.synchronize()
    assert list(device) == []
    gc.collect()
    assert pool.free_slots() == 6
    pool.close()


def test_copies_left_in_flight_by_an_abandoned_iteration_are_waited_for(coded_split):
    root = coded_split[0]
    copier = DeferredCopier()
    loader = make_loader(root, batch_size=8, train=True, workers=2, prefetch=1, crop=CROP, seed=7, copier=copier)
    expected = reference(root, 0)
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    it.close()  # a break: whatever was copied ahead is finished before its host memory goes back
    assert all(e.done for e in copier.events)
    loader.position = 0
    rest = list(loader)
    complete_all(copier)
    assert_same(first, expected[:2])
    assert_same(rest, expected)


def test_a_device_that_is_not_there_is_refused(coded_split):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ValueError, match="no CUDA device is present"):
        make_loader(coded_split[0], batch_size=8, train=True, workers=0, device="cuda")
    with pytest.raises(ValueError, match="None, 'cpu' or a CUDA device"):
        make_loader(coded_split[0], batch_size=8, train=True, workers=0, device="meta")


def test_the_position_counts_batches_handed_over_not_batches_read_ahead(coded_split):
    root = coded_split[0]
    copier = DeferredCopier()
    loader = make_loader(root, batch_size=8, train=True, workers=2, crop=CROP, seed=7, copier=copier)
    loader.set_epoch(1)
    it = iter(loader)
    head = [next(it) for _ in range(4)]
    state = loader.state_dict()
    assert state["position"] == 4, "the device stage reads ahead; the checkpoint must not skip those batches"
    it.close()
    resumed = make_loader(root, batch_size=8, train=True, workers=2, crop=CROP, seed=7, copier=copier)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = list(resumed)
    complete_all(copier)
    assert_same(head + rest, reference(root, 1))


class AddressCopier(DeferredCopier):
    """A "DMA" that keeps only the host address, as cudaMemcpyAsync does, and checks at completion that the slot
    it reads is neither free for a worker to refill nor unregistered."""

    def __init__(self, loader):
        super().__init__()
        self.loader, self.violations = loader, []

    def copy(self, images, labels):
        ptr, out_x = images.data_ptr(), torch.empty_like(images)

        def run():
            pool = self.loader._pool
            slot = next(s for s, a in enumerate(pool.images) if a.ctypes.data == ptr)
            if slot in pool._free:
                self.violations.append(f"slot {slot} was free while its copy ran")
            if pool._registrar is not None and slot not in pool._registered:
                self.violations.append(f"slot {slot} was unregistered while its copy ran")

        event = HeldEvent(run)
        self.events.append(event)
        return out_x, labels.clone(), event


def test_a_slot_goes_back_only_after_the_wait_for_its_copy_returns(coded_split):
    loader = make_loader(coded_split[0], batch_size=8, train=True, workers=2, prefetch=1, crop=CROP, seed=7)
    loader.copier = copier = AddressCopier(loader)
    for _ in range(2):
        for _ in loader:
            gc.collect()
    assert not copier.violations, copier.violations[:3]


def test_close_mid_iteration_waits_for_the_copies_before_unregistering(coded_split, monkeypatch):
    import datasets.loader as loader_module
    from tests.datasets.test_worker_pool import _Registrar as Registrar

    monkeypatch.setattr(loader_module, "CudaRegistrar", Registrar)
    loader = make_loader(coded_split[0], batch_size=8, train=True, workers=2, crop=CROP, seed=7, device="cuda:0",
                         copier=DeferredCopier())
    loader.copier = copier = AddressCopier(loader)
    it = iter(loader)
    next(it)
    next(it)
    pool = loader._pool
    loader.close()
    assert not copier.violations, copier.violations
    assert all(e.done for e in copier.events)
    assert not pool._registrar.registered - {pool.images[s].ctypes.data for s in pool._leased}
    with pytest.raises(RuntimeError, match="closed during this iteration"):
        next(it)
