"""Streaming a packed split to the trainer as uint8 batches: ``make_loader(root, batch_size=…, train=…, workers=…)``.

Pipeline, one batch at a time: plan (which records, per epoch, per rank) -> read (one LMDB transaction
per shard touched) -> decode (JPEG/PNG; raw records need none) -> crop and flip straight into the batch
buffer. Images stay uint8 and channels-last until they reach the model's device, where
``datasets.Normalize`` casts, colour-shifts and normalises them in one batched operation.

Where the work runs (``backend``), measured in ``docs/BENCHMARKS.md``:
- ``"processes"`` (default where ``fork`` exists): ``workers`` forked processes (one decoder each) build
  whole batches into shared memory mapped once (``datasets/worker_pool.py``): no per-batch hand-over
  cost, and no GIL shared with the trainer. A batch's memory is never written again while the caller
  holds any tensor or view of it.
- ``"threads"``: ``workers`` threads in this process, each building whole batches into fresh memory
  (pinned for a CUDA device). OpenCV's decoder releases the GIL, so JPEG decoding scales as well as with
  processes; raw records do not (their per-image work is short, and the GIL hand-offs dominate).

Where batches end up (``device``): the host by default; with a CUDA device, the loader copies each batch on a
side stream ahead of the consumer and gives its host memory back only once that copy has completed
(``datasets/device.py``), so the trainer never calls ``.to(device)`` on loader output itself.

The augmentation of a batch is a pure function of (seed, epoch, rank, batch number), so results do not
depend on thread timing, and ``state_dict()`` / ``load_state_dict()`` resume mid-epoch exactly.
"""
import collections
import functools
import multiprocessing
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

from datasets import format as fmt
from datasets.device import CudaCopier, to_device
from datasets.lmdb_dataset import LMDBDataset
from datasets.worker_pool import CudaRegistrar, ProcessPool, check_owner

ORDERS = ("random", "sequential")
BACKENDS = ("threads", "processes")


def epoch_plan(dataset, *, batch_size, train, epoch, seed, rank=0, world_size=1, order="random",
               window=None):
    """This rank's batches of record indices for one epoch (a list of int64 arrays).

    train: every rank gets the same number of full batches, disjoint shares of one global order, the
    last partial global batch dropped (it changes each epoch). ``order="random"`` is a full shuffle;
    ``"sequential"`` visits shards in a random order and shuffles records only within consecutive
    windows of ``window`` records (default 64 batches), so reads stay local: for splits larger than RAM
    or on network filesystems.
    eval: record order, every record exactly once; ranks get contiguous shares of sizes differing by at
    most one, and the same number of batches (a rank's last batch may be smaller, even empty).
    """
    n = len(dataset)
    if not train:
        bounds = np.linspace(0, n, world_size + 1).round().astype(np.int64)
        mine = np.arange(bounds[rank], bounds[rank + 1])
        longest = int(np.max(np.diff(bounds)))
        return [mine[a:a + batch_size] for a in range(0, max(longest, 1), batch_size)]
    rng = np.random.default_rng([seed, epoch])
    if order == "random":
        idx = rng.permutation(n)
    elif order == "sequential":
        window = window or 64 * batch_size
        offsets = dataset.offsets
        idx = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in rng.permutation(len(offsets) - 1)])
        idx = np.concatenate([rng.permutation(idx[a:a + window]) for a in range(0, n, window)])
    else:
        raise ValueError(f"order={order!r}: one of {', '.join(ORDERS)}")
    global_batch = batch_size * world_size
    steps = n // global_batch
    if steps == 0:
        raise ValueError(f"{dataset.root}: {n} records make no full global batch of {global_batch} "
                         f"({batch_size} × {world_size} ranks); lower the batch size")
    return list(idx[:steps * global_batch].reshape(steps, world_size, batch_size)[:, rank])


def augmentation(seed, epoch, rank, batch, count, size, crop, train, world_size=1):
    """(tops, lefts, flips) of each image: random crop and horizontal flip (paper Sec. 4.1), or the centre.

    Drawn for the whole global batch and sliced for this rank, so an image gets the same crop whatever
    the number of ranks: a run on N processes sees exactly the data of a run on one."""
    if not train:
        c = (size - crop) // 2
        return np.full(count, c), np.full(count, c), np.zeros(count, bool)
    rng = np.random.default_rng([seed, epoch, batch])
    total = count * world_size
    tops, lefts = rng.integers(0, size - crop + 1, total), rng.integers(0, size - crop + 1, total)
    flips = rng.random(total) < 0.5
    mine = slice(rank * count, (rank + 1) * count)
    return tops[mine], lefts[mine], flips[mine]


_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10: decoded straight to RGB, no second pass


def decode_rgb(data):
    """An encoded image as RGB uint8 H×W×3 (None if it does not decode); older OpenCV builds decode BGR and
    convert, so a machine with its own OpenCV still loads."""
    if _IMREAD_RGB is not None:
        return cv2.imdecode(data, _IMREAD_RGB)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def fill_batch(dataset, indices, out, tops, lefts, flips, skip_corrupt=False):
    """Decode records ``indices`` and write their crops (flipped where asked) into ``out`` [B, crop, crop, 3];
    returns (labels, skipped). Images are read in place from the memory-mapped shards: no copy but the crop.
    A corrupt record raises, naming it; with ``skip_corrupt`` it is replaced by another record of the batch
    (image and label) and described in ``skipped``."""
    crop = out.shape[1]
    raw = dataset.encoding == "raw"
    labels = np.empty(len(indices), np.int64)
    shape = [dataset.meta["size"], dataset.meta["size"], 3]
    num_classes = len(dataset.classes)

    def put(b, i, rec):
        if rec["shape"] != shape or not 0 <= rec["label"] < num_classes:
            dataset.check_record(rec, i)  # raises, naming the record
        if raw:
            image = np.frombuffer(rec["image"], np.uint8)
            if image.size != int(np.prod(rec["shape"])):
                fmt.decode_image(rec, "raw", where=dataset.where(i))  # raises, naming the record
            image = image.reshape(rec["shape"])
        else:
            image = decode_rgb(np.frombuffer(rec["image"], np.uint8))
            if image is None or list(image.shape) != rec["shape"]:
                fmt.decode_image(rec, dataset.encoding, where=dataset.where(i))  # raises, naming the record
        patch = image[tops[b]:tops[b] + crop, lefts[b]:lefts[b] + crop]
        if flips[b]:
            cv2.flip(patch, 1, dst=out[b])
        else:
            out[b] = patch
        labels[b] = rec["label"]

    bad = {}
    dataset.visit(indices, put, on_error=(lambda b, i, exc: bad.__setitem__(b, str(exc))) if skip_corrupt else None)
    if bad:
        good = [b for b in range(len(indices)) if b not in bad]
        if not good:
            raise fmt.FormatError(f"every record of a batch is corrupt, e.g. {next(iter(bad.values()))}")
        for j, b in enumerate(bad):
            out[b], labels[b] = out[good[j % len(good)]], labels[good[j % len(good)]]
    return labels, list(bad.values())


class _Batches:
    """Batch k of a plan as (uint8 images [B, 3, crop, crop] channels-last, int64 labels [B]).
    A map-style dataset, so the processes backend can hand it to a DataLoader."""

    def __init__(self, dataset, plan, *, crop, train, seed, epoch, rank, world_size, pin, skip_corrupt=False):
        self.dataset, self.plan, self.crop, self.train = dataset, plan, crop, train
        self.seed, self.epoch, self.rank, self.world_size, self.pin = seed, epoch, rank, world_size, pin
        self.skip_corrupt = skip_corrupt

    def __len__(self):
        return len(self.plan)

    def fill(self, k, images, labels):
        """Write batch k into ``images`` [>= B, crop, crop, 3] and ``labels``; returns (its size B, the corrupt
        records skipped)."""
        indices = self.plan[k]
        n = len(indices)
        tops, lefts, flips = augmentation(self.seed, self.epoch, self.rank, k, n, self.dataset.meta["size"],
                                          self.crop, self.train, self.world_size)
        labels[:n], skipped = fill_batch(self.dataset, indices, images[:n], tops, lefts, flips, self.skip_corrupt)
        return n, skipped

    def __getitem__(self, k):
        shape = (len(self.plan[k]), self.crop, self.crop, 3)
        # numpy's allocator asks for huge pages: fewer page faults on a fresh 19 MB batch than torch.empty
        images = torch.empty(shape, dtype=torch.uint8, pin_memory=True) if self.pin else \
            torch.from_numpy(np.empty(shape, np.uint8))
        labels = np.empty(shape[0], np.int64)
        _, skipped = self.fill(k, images.numpy(), labels)
        return images.permute(0, 3, 1, 2), torch.from_numpy(labels), skipped


def _epoch_batches(dataset, plan_args, crop, skip_corrupt, epoch):
    """An epoch's batches, rebuilt inside a worker process (never pinned: no CUDA in a worker)."""
    plan = epoch_plan(dataset, epoch=epoch, **plan_args)
    return _Batches(dataset, plan, crop=crop, train=plan_args["train"], seed=plan_args["seed"], epoch=epoch,
                    rank=plan_args["rank"], world_size=plan_args["world_size"], pin=False, skip_corrupt=skip_corrupt)


class Loader:
    """Iterable of (images, labels) batches for one rank; see ``make_loader``."""

    def __init__(self, dataset, *, batch_size, train, workers, seed, crop, rank, world_size, order, backend,
                 prefetch, device=None, copier=None, skip_corrupt=False):
        size = dataset.meta["size"]
        if not 0 < crop <= size:
            raise ValueError(f"crop {crop} must be in 1..{size} (the split's size)")
        for name, value, least in (("batch_size", batch_size, 1), ("workers", workers, 0), ("prefetch", prefetch, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r}: must be an integer >= {least}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: one of {', '.join(BACKENDS)}")
        if order not in ORDERS:
            raise ValueError(f"order={order!r}: one of {', '.join(ORDERS)}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if copier is None and self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={device!r}, but no CUDA device is present; use device=None for host batches")
            copier = CudaCopier(self.device)
        elif copier is None and self.device.type != "cpu":
            raise ValueError(f"device={device!r}: None, 'cpu' or a CUDA device")
        self.copier = copier
        self.skip_corrupt, self.skipped = skip_corrupt, []  # descriptions of the corrupt records replaced
        self.dataset, self.batch_size, self.train, self.workers = dataset, batch_size, train, workers
        self.seed, self.crop, self.rank, self.world_size = seed, crop, rank, world_size
        self.order, self.backend, self.prefetch = order, backend, prefetch
        self.pin = self.device.type == "cuda"  # page-locked host memory only where a GPU copies from it
        self.epoch, self.position = 0, 0
        self._plan_epoch, self._plan = None, None
        self._pool = None
        self._sources, self._closes = weakref.WeakSet(), 0  # live iterations, for close()
        self._owner = os.getpid()  # its workers and buffers are this process's: a forked child must not use them

    @property
    def meta(self):
        return self.dataset.meta

    def plan(self):
        if self._plan_epoch != self.epoch:
            self._plan = epoch_plan(self.dataset, batch_size=self.batch_size, train=self.train, epoch=self.epoch,
                                    seed=self.seed, rank=self.rank, world_size=self.world_size, order=self.order)
            self._plan_epoch = self.epoch
        return self._plan

    def __len__(self):
        return len(self.plan())

    def set_epoch(self, epoch):
        """Reshuffle for ``epoch`` (a no-op when resuming inside that same epoch)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self):
        """Where the next batch comes from: enough to resume mid-epoch with exactly the same batches."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "order": self.order,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_records": len(self.dataset)}

    def load_state_dict(self, state):
        """Resume at ``state``'s position. Another number of ranks is fine when the global batch is the same:
        the random order and the crops are planned per global batch, so the run goes on with the batches it
        would have seen (``order="sequential"`` plans per rank: only at an epoch's start or end)."""
        for key, what in (("seed", "seed"), ("num_records", "number of records")):
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"loader state: {what} was {state[key]}, is now {self.state_dict()[key]}; the "
                                 "position of a different data order cannot be resumed")
        was, now = state["batch_size"] * state["world_size"], self.batch_size * self.world_size
        if was != now:
            raise ValueError(f"loader state: global batch was {was} ({state['batch_size']} × {state['world_size']} "
                             f"ranks), is now {now} ({self.batch_size} × {self.world_size}); the position of a "
                             "different data order cannot be resumed")
        mid_epoch = 0 < state["position"] < state["num_records"] // was
        order = state.get("order", self.order)  # states written before the order was kept: the same order
        if mid_epoch and order != self.order:
            raise ValueError(f"loader state: written mid-epoch with data.order={order}, is now {self.order}; "
                             f"resume with data.order={order} (another order can start at the next epoch)")
        if mid_epoch and state["world_size"] != self.world_size and self.order != "random":
            raise ValueError(f"loader state: written mid-epoch by {state['world_size']} process(es) with "
                             f"data.order={self.order}, whose order depends on the number of processes, and this run "
                             f"has {self.world_size}; resume on {state['world_size']} (another number can start "
                             "at the next epoch)")
        self.epoch, self.position = state["epoch"], state["position"]

    def _batches(self):
        return _Batches(self.dataset, self.plan(), crop=self.crop, train=self.train, seed=self.seed,
                        epoch=self.epoch, rank=self.rank, world_size=self.world_size, pin=self.pin,
                        skip_corrupt=self.skip_corrupt)

    def __iter__(self):
        check_owner(self._owner)
        batches = self._batches()
        start = self.position if self.train else 0  # a pass over an evaluation loader is always whole
        source = self._threads(batches, start) if self.backend == "threads" else self._processes(len(batches), start)
        if self.copier is not None:
            source = to_device(source, self.copier)
        self._sources.add(source)
        closes = self._closes
        try:
            for k, batch in enumerate(source, start):
                self.position = k + 1  # batches handed to the caller, whatever was read ahead
                yield batch
        finally:
            source.close()
        if closes != self._closes:
            raise RuntimeError("the loader was closed during this iteration")
        self.position = 0  # a finished epoch iterates again from its start

    def close(self):
        """End any iteration in progress (its copies in flight are waited for), stop the workers and give back
        their memory; iterating again starts new ones. Safe to repeat."""
        self._closes += 1
        if os.getpid() != self._owner:  # a forked child's copy: the workers, threads and buffers are the parent's
            self._pool = None
            return
        for source in list(self._sources):
            source.close()
        if isinstance(self._pool, ProcessPool):
            self._pool.close()
        elif self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        self._pool = None

    def _threads(self, batches, start):
        if self.workers == 0:
            yield from (self._noted(*batches[k]) for k in range(start, len(batches)))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lmdb-loader")
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        pending = collections.deque()
        ahead = self.prefetch * self.workers
        nxt = start
        try:
            while nxt < len(batches) or pending:
                # before touching the pool: in a forked child its threads are gone, and a lock one of them
                # held at the fork is held for ever
                check_owner(self._owner)
                while nxt < len(batches) and len(pending) < ahead:
                    pending.append(self._pool.submit(batches.__getitem__, nxt))
                    nxt += 1
                yield self._noted(*pending.popleft().result())
        finally:
            if os.getpid() == self._owner:  # (cancel takes a future's lock: not in a forked child)
                for f in pending:
                    f.cancel()

    def _processes(self, num_batches, start):
        if self.workers == 0:
            yield from self._threads(self._batches(), start)
            return
        if self._pool is None or self._pool.closed:  # none yet, or closed by a worker's death
            # what workers need, without a reference to this loader (so it can be freed)
            make_batches = functools.partial(
                _epoch_batches, self.dataset, dict(batch_size=self.batch_size, train=self.train, seed=self.seed,
                                                   rank=self.rank, world_size=self.world_size, order=self.order),
                self.crop, self.skip_corrupt)
            # slots: those being built ahead, the caller's current and previous batch, and the device stage's
            slots = self.workers * self.prefetch + 2 + (4 if self.copier is not None else 0)
            self._pool = ProcessPool(make_batches, workers=self.workers, slots=slots,
                                     batch_shape=(self.batch_size, self.crop, self.crop, 3),
                                     registrar=CudaRegistrar() if self.pin else None)
            weakref.finalize(self, self._pool.close)
        run = self._pool.run(self.epoch, start, num_batches)
        try:
            for _ in range(start, num_batches):
                yield self._noted(*_as_tensors(*next(run)))  # no local keeps the batch (and its slot) once dropped
        finally:
            run.close()

    def _noted(self, images, labels, skipped):
        self.skipped += skipped
        return images, labels


def _as_tensors(images, labels, skipped):
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels), skipped


DEFAULT_BACKEND = "processes" if "fork" in multiprocessing.get_all_start_methods() else "threads"


def make_loader(root, *, batch_size, train, workers, seed=0, crop=None, rank=0, world_size=1, order="random",
                backend=DEFAULT_BACKEND, prefetch=2, device=None, copier=None, skip_corrupt=False):
    """An iterable of ``(images, labels)``: ``images`` uint8 [B, 3, crop, crop] (RGB, channels-last memory),
    ``labels`` int64 [B], on ``device`` (None or "cpu": the host; a CUDA device: copied there ahead of use).

    ``train=True``: a random ``crop`` (default: the split's size − 32, i.e. 224 of 256) and a random
    horizontal flip per image, reshuffled each epoch (``loader.set_epoch(e)``). ``train=False``: the centre
    crop, in record order, every record exactly once. ``rank``/``world_size`` give each rank a disjoint
    share of every epoch, with the same number of batches. ``workers`` processes (or threads, with
    ``backend="threads"``; 0: the calling thread) build batches, ``prefetch`` each ahead. ``copier`` replaces
    the CUDA copy (``datasets.device.Copier``: how tests hold a copy in flight). ``skip_corrupt``: a corrupt
    record is replaced by another of its batch and described in ``loader.skipped``, instead of raising.
    """
    dataset = root if isinstance(root, LMDBDataset) else LMDBDataset(root, readahead=order == "sequential")
    size = dataset.meta["size"]
    crop = crop or (size - 32 if size > 32 else size)
    return Loader(dataset, batch_size=batch_size, train=train, workers=workers, seed=seed, crop=crop, rank=rank,
                  world_size=world_size, order=order, backend=backend, prefetch=prefetch, device=device, copier=copier,
                  skip_corrupt=skip_corrupt)
