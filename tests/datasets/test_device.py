"""The consumer side of the host-to-device hand-off, on the CPU: CudaCopier driven by a stand-in for torch.cuda
whose streams, events and tensors append every call to one log, in order; and to_device through a Copier."""
import contextlib

import pytest

from datasets.device import Copier, CudaCopier, to_device


class FakeCuda:
    """The part of torch.cuda that CudaCopier uses. ``consumer`` is the stream current outside any
    ``stream(...)`` block, as the default stream is."""

    def __init__(self):
        self.log = []
        self.consumer = FakeStream(self, "consumer")
        self._current = [self.consumer]

    def Stream(self, device):
        return FakeStream(self, f"side stream of {device}")

    @contextlib.contextmanager
    def stream(self, s):
        self.log.append(("enter", s))
        self._current.append(s)
        try:
            yield
        finally:
            self._current.pop()
            self.log.append(("exit", s))

    def Event(self):
        return FakeEvent(self)

    def current_stream(self, device=None):
        return self._current[-1]


class FakeStream:
    def __init__(self, cuda, name):
        self.cuda, self.name = cuda, name

    def wait_event(self, event):
        self.cuda.log.append(("wait_event", self, event))

    def __repr__(self):
        return self.name


class FakeEvent:
    def __init__(self, cuda):
        self.cuda = cuda

    def record(self, stream=None):  # torch.cuda.Event.record: on the current stream unless told
        self.cuda.log.append(("record", self, stream if stream is not None else self.cuda.current_stream()))

    def query(self):
        return True

    def synchronize(self):
        pass


class FakeTensor:
    """A host tensor whose ``to`` logs the stream current at the copy; the copy knows what it was copied from."""

    def __init__(self, cuda, name, source=None, pinned=True):
        self.cuda, self.name, self.source, self.pinned = cuda, name, source, pinned

    def is_pinned(self):
        return self.pinned

    def pin_memory(self):
        pinned = FakeTensor(self.cuda, f"{self.name} pinned", source=self)
        self.cuda.log.append(("pin_memory", self, pinned, self.cuda.current_stream()))
        return pinned

    def to(self, device, non_blocking=False):
        copy = FakeTensor(self.cuda, f"{self.name} on {device}", source=self)
        self.cuda.log.append(("to", self, copy, self.cuda.current_stream(), non_blocking))
        return copy

    def record_stream(self, stream):
        self.cuda.log.append(("record_stream", self, stream))

    def __repr__(self):
        return self.name


def host_batches(cuda, n):
    return [(FakeTensor(cuda, f"images {k}"), FakeTensor(cuda, f"labels {k}")) for k in range(n)]


def test_copy_issues_both_copies_on_the_side_stream_then_records_its_event_there():
    """An event recorded before the labels' copy (or on another stream) would let the consumer run ahead of it."""
    cuda = FakeCuda()
    copier = CudaCopier("cuda:1", cuda=cuda)
    side = copier.stream
    assert side is not cuda.consumer
    [(images, labels)] = host_batches(cuda, 1)
    d_images, d_labels, event = copier.copy(images, labels)
    assert cuda.log == [("enter", side),
                        ("to", images, d_images, side, True),
                        ("to", labels, d_labels, side, True),
                        ("record", event, side),
                        ("exit", side)]
    assert (d_images.source, d_labels.source) == (images, labels)


def _waited():
    """(the stand-in, the copies and event of one batch, and the log of ``wait`` alone)."""
    cuda = FakeCuda()
    copier = CudaCopier("cuda", cuda=cuda)
    [(images, labels)] = host_batches(cuda, 1)
    d_images, d_labels, event = copier.copy(images, labels)
    del cuda.log[:]
    copier.wait(event, d_images, d_labels)
    return cuda, d_images, d_labels, event


def test_wait_makes_the_consumer_stream_wait_on_the_given_event():
    cuda, _, _, event = _waited()
    assert [entry for entry in cuda.log if entry[0] == "wait_event"] == [("wait_event", cuda.consumer, event)]


def test_wait_records_the_side_stream_copies_on_the_consumer_stream():
    """Without record_stream the caching allocator may hand the copies' memory to the side stream's next copy
    while the consumer still reads it."""
    cuda, d_images, d_labels, _ = _waited()
    assert [entry for entry in cuda.log if entry[0] == "record_stream"] == [
        ("record_stream", d_images, cuda.consumer), ("record_stream", d_labels, cuda.consumer)]


@pytest.mark.parametrize("ahead", [0, 2, 9])
def test_each_batch_is_waited_for_on_the_consumer_stream_before_it_is_yielded(ahead):
    """Between two yields, the consumer's stream waits on exactly one event: the one recorded after the copies of
    the batch about to be yielded (another batch's event would let the consumer read a copy still running)."""
    cuda = FakeCuda()
    copier = CudaCopier("cuda", cuda=cuda)
    host = host_batches(cuda, 5)
    log, seen = cuda.log, 0
    yielded = []
    for d_images, d_labels in to_device(iter(host), copier, ahead=ahead):
        copied = [k for k, entry in enumerate(log) if entry[0] == "to" and entry[2] in (d_images, d_labels)]
        assert len(copied) == 2
        own_event = next(entry[1] for entry in log[max(copied):] if entry[0] == "record")
        since = log[seen:]
        assert [e[1:] for e in since if e[0] == "wait_event"] == [(cuda.consumer, own_event)]
        assert [e[1:] for e in since if e[0] == "record_stream"] == [(d_images, cuda.consumer),
                                                                      (d_labels, cuda.consumer)]
        seen = len(log)
        yielded.append((d_images.source, d_labels.source))
    assert yielded == host


class Token:
    """An event that has always completed, named after its batch."""

    def __init__(self, k):
        self.k = k

    def query(self):
        return True

    def synchronize(self):
        pass


class RecordingCopier(Copier):
    """Device tensors and events named after the batch: ``waits`` lists (event, device tensors) per wait."""

    def __init__(self):
        self.copies, self.waits = 0, []

    def copy(self, images, labels):
        k = self.copies
        self.copies += 1
        return ("images", k), ("labels", k), Token(k)

    def wait(self, event, *device_tensors):
        self.waits.append((event.k, device_tensors))


def failing_after(batches, n):
    yield from batches[:n]
    raise OSError("the host iteration failed")


@pytest.mark.parametrize("ahead", [0, 1, 2, 7])
@pytest.mark.parametrize("fail_after", [None, 4])
def test_to_device_waits_for_each_batch_with_the_event_its_copy_returned(ahead, fail_after):
    """Every way a batch leaves to_device (the steady state, the end of the host batches, the batches before a
    host error): one wait, with the event ``copy`` returned for that same batch, before it is yielded."""
    copier = RecordingCopier()
    n = 6
    host = [(("host images", k), ("host labels", k)) for k in range(n)]
    source = iter(host) if fail_after is None else failing_after(host, fail_after)
    got = []
    with pytest.raises(OSError) if fail_after is not None else contextlib.nullcontext():
        for d_images, d_labels in to_device(source, copier, ahead=ahead):
            k = len(got)
            assert copier.waits[k:] == [(k, (("images", k), ("labels", k)))]
            assert (d_images, d_labels) == (("images", k), ("labels", k))
            got.append(k)
    assert got == list(range(n if fail_after is None else fail_after))


def test_pageable_tensors_are_staged_in_pinned_memory_before_their_copy():
    """A copy from pageable memory would make the host wait for the side stream's earlier work: the labels
    (always pageable) and images that could not be page-locked are pinned first, and the pinned one is copied."""
    cuda = FakeCuda()
    copier = CudaCopier("cuda:0", cuda=cuda)
    images, labels = FakeTensor(cuda, "images"), FakeTensor(cuda, "labels", pinned=False)
    d_images, d_labels, _ = copier.copy(images, labels)
    pins = [e for e in cuda.log if e[0] == "pin_memory"]
    assert [e[1] for e in pins] == [labels], "only the pageable tensor is staged"
    assert d_labels.source is pins[0][2] and d_images.source is images
