"""Worker processes that build whole batches straight into shared memory: the ``processes`` backend.

A DataLoader hands every batch from a worker to the trainer through fresh shared memory, which costs page
faults and pickling per batch (near 10,000 small images/s here, whatever the workers can do). Here the
batch buffers ("slots") are mapped once, before the workers fork, and shared by all processes: a worker
writes batch k into a free slot and sends back only (k, slot, count); the trainer receives a zero-copy
tensor view of the slot. A slot is reused only once nothing outside this module refers to it any more
(its numpy array's reference count), so a batch that the caller keeps is never overwritten; if the caller
keeps every slot, batches are copied out instead. When CUDA is present the slots are page-locked
(``cudaHostRegister``), so copies to the GPU can be asynchronous, as from pinned memory.
"""
import mmap
import multiprocessing
import queue
import sys
import warnings

import cv2
import numpy as np
import torch

from datasets import format as fmt

_ERRORS = {"FormatError": fmt.FormatError, "IndexError": IndexError, "ValueError": ValueError}


def _shared_array(shape, dtype):
    """An array on anonymous shared memory: forked children write into the very same pages."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype)[:int(np.prod(shape))].reshape(shape)


def _worker(make_batches, images, labels, tasks, results):
    """Build batches until told to stop: task (generation, epoch, k, slot) -> result (generation, k, slot, n, error)."""
    cached = {}
    while True:
        task = tasks.get()
        if task is None:
            return
        generation, epoch, k, slot = task
        try:
            if epoch not in cached:
                cached.clear()
                cached[epoch] = make_batches(epoch)
            n = cached[epoch].fill(k, images[slot], labels[slot])
            results.put((generation, k, slot, n, None))
        except Exception as exc:  # sent back and raised in the trainer, with the record named
            results.put((generation, k, slot, 0, (type(exc).__name__, str(exc))))


class ProcessPool:
    """``workers`` processes and ``slots`` shared batch buffers of ``batch_shape`` (B, crop, crop, 3)."""

    def __init__(self, make_batches, *, workers, slots, batch_shape):
        self.images = [_shared_array(batch_shape, np.uint8) for _ in range(slots)]
        self.labels = [_shared_array(batch_shape[:1], np.int64) for _ in range(slots)]
        ctx = multiprocessing.get_context("fork")
        self.tasks, self.results = ctx.SimpleQueue(), ctx.Queue()
        self.generation = 0
        # A forked child must not inherit OpenCV's thread pool (it hangs once OpenMP, e.g. torch's, ran here).
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            self.procs = [ctx.Process(target=_worker, args=(make_batches, self.images, self.labels, self.tasks,
                                                            self.results), daemon=True) for _ in range(workers)]
            for p in self.procs:
                p.start()
        finally:
            cv2.setNumThreads(cv_threads)
        self.pinned = torch.cuda.is_available() and self._pin()

    def _pin(self):
        """Page-lock the slots for asynchronous host-to-GPU copies (after the fork: only this process's view)."""
        cudart = torch.cuda.cudart()
        for a in self.images:
            if int(cudart.cudaHostRegister(a.ctypes.data, a.nbytes, 0)) != 0:
                warnings.warn("could not page-lock the loader's batch buffers; host-to-GPU copies will be "
                              "synchronous", RuntimeWarning)
                return False
        return True

    def _held(self, slot):
        return sys.getrefcount(self.images[slot]) > 2  # the list's reference and getrefcount's own

    def _result(self):
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                for p in self.procs:
                    if not p.is_alive():
                        self.close()
                        raise RuntimeError(f"loader worker (pid {p.pid}) exited unexpectedly with code "
                                           f"{p.exitcode}") from None

    def run(self, epoch, start, stop):
        """Yield (images [n, crop, crop, 3] uint8 array, labels) for batches start..stop-1 of ``epoch``, in order."""
        self.generation += 1
        gen, in_flight, done, nxt = self.generation, {}, {}, start
        for k in range(start, stop):
            busy = set(in_flight.values()) | {s for s, _ in done.values()}
            for slot in range(len(self.images)):
                if nxt >= stop:
                    break
                if slot not in busy and not self._held(slot):
                    self.tasks.put((gen, epoch, nxt, slot))
                    in_flight[nxt] = slot
                    busy.add(slot)
                    nxt += 1
            if k not in in_flight and k not in done:  # every slot is held by the caller: wait for one
                raise RuntimeError("no batch buffer is free: the caller holds all of them")
            while k not in done:
                r_gen, r_k, slot, n, error = self._result()
                if r_gen != gen:
                    continue  # left over from an abandoned iteration
                if error is not None:
                    raise _ERRORS.get(error[0], RuntimeError)(error[1])
                done[r_k] = (slot, n)
                in_flight.pop(r_k)
            slot, n = done.pop(k)
            free = [s for s in range(len(self.images))
                    if s != slot and s not in in_flight.values() and not self._held(s)]
            images, labels = self.images[slot][:n], self.labels[slot][:n].copy()
            yield (images.copy() if not free else images), labels  # copy only when the caller keeps every slot
            del images

    def close(self):
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self.procs = []
