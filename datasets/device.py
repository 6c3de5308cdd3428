"""The hand-off of host batches to the model's device: copies issued ahead on a side stream, and a host
buffer given back only once the event recorded after its copy has completed (as FFCV's loader does).

``to_device(batches, copier)`` wraps an iterator of host ``(images, labels)``: it issues the copy of each
batch ``ahead`` batches before the consumer asks for it, makes the consumer wait for that copy (on CUDA, its
stream waits for the copy's event: the host does not block), and keeps a reference to each host batch until
its copy's event reports completion. Dropping that reference is what frees the batch's shared-memory slot
(``datasets/worker_pool.py``), so no worker can overwrite memory that a queued copy has yet to read.

``Copier`` is the seam: ``copy(images, labels) -> (device images, device labels, event)`` where ``event``
has ``query()`` (done yet?) and ``synchronize()`` (wait until done), and ``wait(event, *device_tensors)``
orders the consumer after the copy. ``CudaCopier`` is the real one; tests hold events "in flight" with their own.
"""
import collections
import types
import typing


class Copier:
    """How batches reach a device; see the module docstring."""

    def copy(self, images, labels):
        raise NotImplementedError

    def wait(self, event, *device_tensors):
        raise NotImplementedError


class CudaCopier(Copier):
    """Copies on a side stream of ``device``; uint8 images keep their channels-last layout, labels int64.
    ``cuda`` is ``torch.cuda`` unless given: tests pass a stand-in that logs the stream calls, without CUDA."""

    def __init__(self, device, *, cuda: typing.Optional[types.ModuleType] = None):
        import torch
        self.cuda, self.device = cuda if cuda is not None else torch.cuda, torch.device(device)
        self.stream = self.cuda.Stream(self.device)

    def copy(self, images, labels):
        # From pageable memory (the labels; images whose buffers could not be page-locked) CUDA first waits for
        # the stream's earlier work, blocking the host: such a tensor is staged in pinned memory first, whose
        # block torch's host allocator keeps until this copy is done.
        images, labels = (t if t.is_pinned() else t.pin_memory() for t in (images, labels))
        with self.cuda.stream(self.stream):
            d_images = images.to(self.device, non_blocking=True)
            d_labels = labels.to(self.device, non_blocking=True)
            event = self.cuda.Event()
            event.record(self.stream)
        return d_images, d_labels, event

    def wait(self, event, *device_tensors):
        """The consumer's stream waits for the copy, and the caching allocator learns that the consumer's
        stream uses the copies' memory (allocated on the side stream), so it is not reused too early."""
        consumer = self.cuda.current_stream(self.device)
        consumer.wait_event(event)
        for t in device_tensors:
            t.record_stream(consumer)


def to_device(batches, copier, *, ahead=2, in_flight=2):
    """Device batches from host ``batches``: copies issued ``ahead`` batches early; at most ``in_flight``
    yielded batches whose copies are not yet known complete (the oldest is waited for beyond that). A host
    batch is dropped only after its copy's event has completed. An error of the host iteration comes after
    the batches read before it, as without this stage."""
    issued = collections.deque()  # (host images, host labels, device images, device labels, event), not yet yielded
    unconfirmed = collections.deque()  # (host images, host labels, event), yielded, copy maybe still running

    def reap():
        while unconfirmed and unconfirmed[0][2].query():
            unconfirmed.popleft()
        while len(unconfirmed) > in_flight:
            unconfirmed[0][2].synchronize()  # wait while the entry still holds the host batch, then drop it
            unconfirmed.popleft()

    def hand_over(entry):
        images, labels, d_images, d_labels, event = entry
        copier.wait(event, d_images, d_labels)
        unconfirmed.append((images, labels, event))
        return d_images, d_labels

    try:
        try:
            for images, labels in batches:
                reap()
                issued.append((images, labels, *copier.copy(images, labels)))
                del images, labels
                if len(issued) > ahead:
                    yield hand_over(issued.popleft())
        except Exception:
            while issued:  # the batches before the failing one first
                yield hand_over(issued.popleft())
            raise
        while issued:
            yield hand_over(issued.popleft())
            reap()
    finally:
        for entry in list(issued) + list(unconfirmed):
            entry[-1].synchronize()  # nothing in flight may outlive its host buffer
        issued.clear()
        unconfirmed.clear()
        if hasattr(batches, "close"):
            batches.close()  # the host iteration gives back what it had ready
