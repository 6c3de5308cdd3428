"""Worker processes that build whole batches straight into shared memory: the ``processes`` backend.

A DataLoader hands every batch from a worker to the trainer through fresh shared memory, which costs page
faults and pickling per batch (near 10,000 small images/s here, whatever the workers can do). Here the
batch buffers ("slots") are mapped once, before the workers fork, and shared by all processes: a worker
writes batch k into a free slot and sends back only (k, slot, count); the trainer receives a zero-copy
view of the slot.

Ownership: a slot is free, in flight (a worker is writing it), ready (written, not yet yielded) or leased
(yielded). A lease is a fresh numpy view of the slot with a finalizer; ``torch.from_numpy`` keeps that view
alive for as long as any tensor, view or ``.numpy()`` of the batch exists, so the slot is free again only
when the caller holds nothing of it (a device stage holds it until its copy's event completes, see
``datasets/device.py``). A slot in flight stays in flight until its worker reports back, whichever iteration
sent it, so an abandoned iteration cannot hand a slot still being written to a later one. When the caller
holds every slot, the batch is copied out instead of stalling.

When the loader's device is CUDA the slots are page-locked (``cudaHostRegister``) after the fork, so copies
to the GPU can be asynchronous, as from pinned memory; they are unregistered on ``close()``.
"""
import collections
import ctypes
import fcntl
import gc
import mmap
import multiprocessing
import os
import queue
import select
import signal
import threading
import traceback
import warnings
import weakref

import cv2
import numpy as np

from datasets import format as fmt

POLL_S = 0.5  # how often an idle worker checks that its parent is alive (a busy one: before every task)


def check_owner(owner):
    """A loader's workers, threads, queues and buffers are the process's that made it (``owner``): a forked child
    that used them would take the parent's results, or wait for ever on threads it does not have."""
    if os.getpid() != owner:
        raise RuntimeError(f"this loader was made in process {owner}, and this is a forked child ({os.getpid()}): "
                           "its workers and buffers belong to the parent; create a new loader in this process")


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (set as the caller's exception's cause)."""

    def __str__(self):
        return self.args[0]


_ERRORS = {cls.__name__: cls for cls in (fmt.FormatError, IndexError, KeyError, ValueError, TypeError,
                                          ZeroDivisionError, ArithmeticError, OSError, MemoryError, RuntimeError,
                                          AssertionError, AttributeError, NotImplementedError)}


def _worker_error(typename, message, record, tb, pid):
    """The caller's exception for a worker's: same type where known, the record named, its traceback as cause."""
    if record and record not in message:
        message = f"{record}: {message}"
    cls = _ERRORS.get(typename)
    exc = cls(message) if cls is not None else RuntimeError(f"{typename}: {message}")
    exc.record = record
    exc.__cause__ = RemoteTraceback(f"\n\nin loader worker (pid {pid}):\n{tb}")
    return exc


class _TaskPipe:
    """Tasks from the trainer to its workers: written straight into a pipe by the trainer's own thread (a Queue's
    feeder thread would wake once per batch), read by one worker at a time, as from a Queue. A write does not block:
    the pipe is made to hold every task that can be outstanding, one per slot and one stop per worker."""

    MESSAGE_BYTES = 64  # a pickled (generation, epoch, k, slot) and its length: 59 bytes at 2**63 - 1 each

    def __init__(self, ctx, most: int):
        self._reader, self._writer = ctx.Pipe(duplex=False)
        self._lock = ctx.Lock()
        need, fd = most * self.MESSAGE_BYTES, self._writer.fileno()
        # Linux: 64 KiB, or one page once the user's pipe quota is spent (macOS grows its pipes up to 64 KiB itself)
        if hasattr(fcntl, "F_SETPIPE_SZ") and fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < need:
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, need)
            except OSError:  # past pipe-max-size or the user's quota: a full pipe's write waits for a worker's read
                pass

    def put(self, task) -> None:
        self._writer.send(task)

    def get(self, timeout: float):
        """The next task; ``queue.Empty`` when none came within ``timeout`` s."""
        if not self._lock.acquire(timeout=timeout):
            raise queue.Empty
        try:
            if not self._reader.poll(timeout):
                raise queue.Empty
            return self._reader.recv()
        finally:
            self._lock.release()

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


def _worker(make_batches, images, labels, tasks, results, parent):
    """Build batches until told to stop or orphaned: task (generation, epoch, k, slot) -> result
    (generation, k, slot, (n, skipped records), error)."""
    gc.freeze()  # what the trainer left uncollected is never finalised here (forked with the collector off)
    gc.enable()
    results.cancel_join_thread()  # never block exit on a result nobody will read
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # a scheduler signals the whole job: the trainer decides, workers follow
    cached = {}
    # until the trainer dies (kill -9 included): then nobody builds for it, whatever is still queued (0.2 µs a check)
    while os.getppid() == parent:
        try:
            task = tasks.get(timeout=POLL_S)
        except queue.Empty:
            continue
        if task is None:
            return
        generation, epoch, k, slot = task
        try:
            if epoch not in cached:
                cached.clear()
                cached[epoch] = make_batches(epoch)
            results.put((generation, k, slot, cached[epoch].fill(k, images[slot], labels[slot]), None))
        except Exception as exc:  # raised again in the trainer, with the record and this traceback
            error = (type(exc).__name__, str(exc), getattr(exc, "record", None), traceback.format_exc(), os.getpid())
            results.put((generation, k, slot, 0, error))


class CudaRegistrar:
    """cudaHostRegister / cudaHostUnregister through torch, and cudaGetLastError through the libcudart that
    torch loaded: a failed registration leaves an error that a later kernel-launch check would report."""

    def __init__(self):
        import torch
        self.cudart = torch.cuda.cudart()

    def register(self, ptr, nbytes):
        return int(self.cudart.cudaHostRegister(ptr, nbytes, 0))

    def unregister(self, ptr):
        return int(self.cudart.cudaHostUnregister(ptr))

    def clear_error(self):
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()


class ProcessPool:
    """``workers`` processes and ``slots`` shared batch buffers of ``batch_shape`` (B, crop, crop, 3).
    ``registrar`` (e.g. ``CudaRegistrar()``) page-locks the slots; None leaves them pageable."""

    def __init__(self, make_batches, *, workers, slots, batch_shape, registrar=None):
        self._maps = [mmap.mmap(-1, max(int(np.prod(batch_shape)), 1)) for _ in range(slots)]
        self.images = [np.frombuffer(m, np.uint8)[:int(np.prod(batch_shape))].reshape(batch_shape)
                       for m in self._maps]
        self.labels = [np.frombuffer(mmap.mmap(-1, 8 * batch_shape[0]), np.int64) for _ in range(slots)]
        self._free = collections.deque(range(slots))  # appended to by finalizers, from any thread
        self._in_flight = {}  # slot -> generation of the task writing it
        self._leased = set()  # slots the caller holds
        self._lock = threading.Lock()
        self.generation = 0
        ctx = multiprocessing.get_context("fork")
        self.tasks, self.results = _TaskPipe(ctx, most=slots + workers), ctx.Queue()
        # Only this process reads the results: straight from the queue's pipe, without the queue's lock and a new
        # selector per call, which took half of this process's CPU time per batch (docs/BENCHMARKS.md, loader).
        self._results_pipe = self.results._reader
        self._results_ready = select.poll()
        self._results_ready.register(self._results_pipe.fileno(), select.POLLIN)
        # A forked child must not inherit OpenCV's thread pool (it hangs once OpenMP, e.g. torch's, ran here).
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        # Nor collect this process's garbage: a cycle not yet collected here (a CUDA object, a dropped batch's
        # lease) would be finalised in the worker too. Forked with the collector off, each worker freezes what
        # it inherited before collecting anything; this process's own gc state (frozen objects included) is
        # left as it was.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self.procs = [ctx.Process(target=_worker, args=(make_batches, self.images, self.labels, self.tasks,
                                                            self.results, os.getpid()), daemon=True)
                          for _ in range(workers)]
            for p in self.procs:
                p.start()
        finally:
            if collecting:
                gc.enable()
            cv2.setNumThreads(cv_threads)
        self._registrar, self._registered = registrar, {}
        self.closed = False
        self._owner = os.getpid()
        self.pinned = registrar is not None and self._pin()

    def _pin(self):
        """Page-lock every slot (after the fork: only this process's view), or none of them."""
        for slot, a in enumerate(self.images):
            try:
                ok = self._registrar.register(a.ctypes.data, a.nbytes) == 0
            except Exception:  # a binding that raises instead of returning the error code
                ok = False
            if not ok:
                self._registrar.clear_error()
                for s in list(self._registered):
                    self._unpin(s)
                warnings.warn("could not page-lock the loader's batch buffers; host-to-GPU copies will be "
                              "synchronous", RuntimeWarning)
                return False
            self._registered[slot] = a.ctypes.data
        return True

    def _unpin(self, slot):
        ptr = self._registered.pop(slot, None)
        if ptr is not None:
            self._registrar.unregister(ptr)

    def free_slots(self):
        return len(self._free)

    def _release(self, slot):
        self._leased.discard(slot)
        if self.closed:  # a batch held across close(): its page-locking ends with it
            if self._registrar is not None:
                self._unpin(slot)
            return
        self._free.append(slot)

    def _lease(self, slot, n):
        """A view of slot ``slot`` whose death (the caller's last reference) frees the slot."""
        self._leased.add(slot)
        view = self.images[slot][:n]
        finalizer = weakref.finalize(view, self._release, slot)
        finalizer.atexit = False
        return view

    def _check_owner(self):
        check_owner(self._owner)

    def _result(self):
        """The next result of any iteration; a slot whose task was abandoned goes back to the free list."""
        self._check_owner()
        while True:
            if not self._results_ready.poll(1000):
                for p in self.procs:
                    if not p.is_alive():
                        code = p.exitcode
                        self.close(timeout=0)  # the others may wait on a queue lock the dead one held
                        how = f"code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
                        hint = ("; a shard file is damaged or changed while open: run python -m preprocess.verify on "
                                "the split" if code == -signal.SIGBUS else "")
                        raise RuntimeError(f"loader worker (pid {p.pid}) exited unexpectedly with {how}{hint}"
                                           ) from None
                continue
            r = self._results_pipe.recv()
            with self._lock:
                self._in_flight.pop(r[2], None)
            return r

    def run(self, epoch, start, stop):
        """Yield (images [n, crop, crop, 3] uint8 array, labels, skipped) for batches start..stop-1 of ``epoch``.
        Starting another ``run`` ends this one: its slots go back once its workers report."""
        if self.closed:
            raise RuntimeError("the loader's worker pool is closed")
        self._check_owner()
        self.generation += 1
        gen = self.generation
        ahead = max(1, len(self.images) - 2)  # the caller's current and previous batch hold the other two
        sent, ready, nxt = {}, {}, start
        try:
            for k in range(start, stop):
                self._check_owner()
                if self.closed:
                    raise RuntimeError("the loader was closed during this iteration")
                if gen != self.generation:
                    raise RuntimeError("this iteration was ended by a newer iteration of this loader; "
                                       "iterate the newer one")
                while k not in sent and k not in ready and not self._free:
                    self._reclaim()  # the caller holds every slot it has not given back: wait for one in flight
                while nxt < stop and len(sent) + len(ready) < ahead and self._free:
                    slot = self._free.popleft()
                    with self._lock:
                        self._in_flight[slot] = gen
                    self.tasks.put((gen, epoch, nxt, slot))
                    sent[nxt] = slot
                    nxt += 1
                while k not in ready:
                    r_gen, r_k, slot, n, error = self._result()
                    if r_gen != gen:
                        self._release(slot)  # left over from an abandoned iteration
                        continue
                    sent.pop(r_k)
                    if error is not None:  # raised in its turn, after the batches before it
                        self._release(slot)
                        ready[r_k] = (None, error)
                    else:
                        ready[r_k] = (slot, n)
                slot, filled = ready.pop(k)
                if slot is None:
                    raise _worker_error(*filled)
                n, skipped = filled
                labels = self.labels[slot][:n].copy()
                if not self._free and not self._in_flight and not ready:
                    # the caller holds every other slot: copy out, so that this one can build the next batch
                    images = self.images[slot][:n].copy()
                    self._release(slot)
                    yield images, labels, skipped
                else:
                    yield self._lease(slot, n), labels, skipped
        finally:
            for slot, _ in ready.values():
                if slot is not None:
                    self._release(slot)

    def _reclaim(self):
        """Wait until a slot is free: a task of an abandoned iteration reports back, or a batch the caller
        kept in a reference cycle is collected."""
        if self._in_flight:
            r_gen, r_k, slot, n, error = self._result()
            self._release(slot)
            return
        gc.collect()
        if not self._free:
            raise RuntimeError("no batch buffer is free and none is being written: the loader's buffers are all "
                               "held by the caller")

    def close(self, timeout=5.0):
        """Stop the workers (killed after ``timeout`` s), unregister and unmap the slots; a slot the caller
        still holds stays registered and mapped until it is dropped. Safe to call twice."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        if os.getpid() != self._owner:  # a forked child's copy: the workers, queues and buffers are the parent's
            return
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=timeout)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
        if self._registrar is not None:
            for slot in list(self._registered):
                if slot not in self._leased:
                    self._unpin(slot)
        self.tasks.close()
        self.results.close()
        self.images = self.labels = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a batch the caller still holds: unmapped when it is dropped
                pass
        self._maps = []
