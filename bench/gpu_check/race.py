"""The race test of the host-to-GPU hand-off (``datasets/device.py``), and the controls that prove it can fail.

For every batch the loader yields, a checksum of the device batch is queued on the consumer's stream at
once and the batch is dropped, as a training step drops it; at the epoch's end the checksums are compared
with those of the same records computed on the host, in numpy, from the ``workers=0`` batches. Keeping the
batches instead (as a first version did) would hide both ways a hand-off can fail: the consumer reading a
device buffer before its copy lands (a missing wait on the copy's event), and the caching allocator giving a
buffer the consumer still reads to the next copy (a missing ``record_stream``).

Stress makes those windows wide: (a) the consumer's stream kept busy before each checksum, (b) the copy
stream delayed by a sleep kernel before each copy, (c) the threads backend, (d) successive loaders in one
process, each of which must page-lock its buffers. Negative controls break the hand-off on purpose (no
``record_stream``; no wait on the event; an event recorded before the copy): each must show mismatches,
or the test is too weak to prove anything and the check fails.
"""
import numpy as np
import torch

from datasets import make_loader
from datasets.device import CudaCopier

SLEEP_CYCLES = 20_000_000  # about 10 ms at the H200's 1.98 GHz: far longer than a batch's copy


def weights(n):
    """Position weights of the checksum: a permutation or a shifted crop changes it, not only a changed pixel."""
    return np.arange(n, dtype=np.float64) % 65521 + 1


def host_checksums(root, *, batch, crop, seed, epochs):
    """Per epoch, per batch: [sum_i w_i x_i for each image, then the labels], from the workers=0 host batches,
    in numpy (float64 holds these integer sums exactly: each is below 2**53)."""
    loader = make_loader(root, batch_size=batch, train=True, workers=0, crop=crop, seed=seed)
    w = weights(crop * crop * 3)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        sums = []
        for images, labels in loader:
            hwc = images.permute(0, 2, 3, 1).numpy()  # the buffer's own layout, contiguous
            sums.append(np.concatenate([hwc.reshape(len(hwc), -1).astype(np.float64) @ w,
                                        labels.numpy().astype(np.float64)]))
        out.append(sums)
    return out


def device_checksum(images, labels, w):
    """The same checksum, queued on the current stream of the batch's device."""
    x = images.permute(0, 2, 3, 1).reshape(len(images), -1)
    return torch.cat([x.double() @ w, labels.double()])


class DelayedCopier(CudaCopier):
    """Copies queued behind a sleep kernel on the copy stream: they complete long after they are issued."""

    def copy(self, images, labels):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(SLEEP_CYCLES)
        return super().copy(images, labels)


class NoRecordStream(CudaCopier):
    """Control: the consumer waits for the copy, but the allocator is not told that it uses the memory."""

    def wait(self, event, *device_tensors):
        torch.cuda.current_stream(self.device).wait_event(event)


class NoWait(DelayedCopier):
    """Control: the consumer does not wait for the copy's event."""

    def wait(self, event, *device_tensors):
        consumer = torch.cuda.current_stream(self.device)
        for t in device_tensors:
            t.record_stream(consumer)


class EarlyEvent(CudaCopier):
    """Control: the event is recorded before the (delayed) copy, so it reports done before the copy ran:
    the host buffer goes back to the workers, and the consumer starts, too early."""

    def copy(self, images, labels):
        images, labels = (t if t.is_pinned() else t.pin_memory() for t in (images, labels))  # as CudaCopier
        with torch.cuda.stream(self.stream):
            event = torch.cuda.Event()
            event.record(self.stream)
            torch.cuda._sleep(SLEEP_CYCLES)
            d_images = images.to(self.device, non_blocking=True)
            d_labels = labels.to(self.device, non_blocking=True)
        return d_images, d_labels, event


def busy(device, n):
    """Work queued on the current stream before each checksum: a chain of n×n matmuls, and on CUDA a sleep
    kernel, so the consumer falls further behind the host with every batch (well past the three batches after
    which the allocator could reuse a dropped batch's memory)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)

    def work():
        for _ in range(4):
            a @ a
        if device.type == "cuda":
            torch.cuda._sleep(SLEEP_CYCLES)
    return work


def run(root, device, reference, *, batch, crop, seed, workers, backend="processes", copier=None,
        consumer_busy=None, loaders=1):
    """Mismatched batches against ``reference`` over its epochs, for ``loaders`` loaders made one after the
    other; returns (mismatched, compared, page-locked per loader)."""
    w = torch.from_numpy(weights(crop * crop * 3)).to(device)
    bad = total = 0
    pinned = []
    for _ in range(loaders):
        cop = copier(device) if copier is not None else None
        loader = make_loader(root, batch_size=batch, train=True, workers=workers, crop=crop, seed=seed,
                             device=device, copier=cop, backend=backend)
        for epoch, expected in enumerate(reference):
            loader.set_epoch(epoch)
            sums = []
            for images, labels in loader:
                if consumer_busy is not None:
                    consumer_busy()
                sums.append(device_checksum(images, labels, w))
                del images, labels  # dropped at once, as a training step drops its batch
            got = [s.cpu().numpy() for s in sums]  # waits for every checksum
            total += max(len(got), len(expected))
            bad += abs(len(got) - len(expected)) + sum(not np.array_equal(g, e) for g, e in zip(got, expected))
        pool = loader._pool
        pinned.append(getattr(pool, "pinned", None) if backend == "processes" else loader.pin)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a control's copies may still read host buffers that close() unmaps
        loader.close()
    return bad, total, pinned


def variants(cuda, work):
    """(name, kind, keyword arguments of ``run``): the checks that must show no mismatch, then the controls
    that must show some; ``work`` keeps the consumer busy. Without CUDA, only the plain host variants."""
    plain = [("processes backend", "check", {}),
             ("threads backend", "check", {"backend": "threads"}),
             ("3 successive loaders", "check", {"loaders": 3})]
    if not cuda:
        return plain
    return [
        ("(a) consumer stream busy before each checksum", "check", {"consumer_busy": work}),
        ("(b) copy stream delayed before each copy", "check", {"copier": DelayedCopier}),
        ("(c) threads backend, consumer busy, copies delayed", "check",
         {"backend": "threads", "copier": DelayedCopier, "consumer_busy": work}),
        ("(d) 3 successive loaders, consumer busy, copies delayed", "check",
         {"loaders": 3, "copier": DelayedCopier, "consumer_busy": work}),
        ("control: no record_stream (consumer busy)", "control",
         {"copier": NoRecordStream, "consumer_busy": work}),
        ("control: no wait on the copy's event (copies delayed)", "control", {"copier": NoWait}),
        ("control: event recorded before the copy (copies delayed)", "control", {"copier": EarlyEvent}),
    ]


def race(root, device, *, batch, crop, workers, epochs, matmul):
    """Every variant's row: (name, kind, mismatched, compared, page-locked per loader, verdict, ok)."""
    reference = host_checksums(root, batch=batch, crop=crop, seed=3, epochs=epochs)
    work = busy(device, matmul)
    rows = []
    for name, kind, kw in variants(device.type == "cuda", work):
        bad, total, pinned = run(root, device, reference, batch=batch, crop=crop, seed=3, workers=workers, **kw)
        locked_ok = device.type != "cuda" or all(pinned)
        if kind == "check":
            ok = bad == 0 and locked_ok
            verdict = "correct" if ok else ("MISMATCHES" if bad else "NOT PAGE-LOCKED")
        else:
            ok = bad > 0
            verdict = "broken hand-off detected" if ok else "NO MISMATCH: the test is too weak to prove anything"
        rows.append((name, kind, bad, total, pinned, verdict, ok))
    return rows
