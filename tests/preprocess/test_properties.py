"""Property tests of the tar lister (Hypothesis): whatever its headers say (sizes, names, types, checksums),
listing an archive and reading its members is a source or a SourceError, and never allocates more than the
archive holds."""
import io
import os
import tarfile
import tempfile
import tracemalloc

from hypothesis import HealthCheck, given, settings, strategies as st

from preprocess.sources import SourceError
from preprocess.tar_source import list_tar


def _archive():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for k, size in enumerate((700, 1500, 90)):
            info = tarfile.TarInfo(f"c{k % 2}/img{k}.jpg")
            info.size = size
            tf.addfile(info, io.BytesIO(bytes([k]) * size))
    return buf.getvalue()


ARCHIVE = _archive()
HEADERS = [0, 512 * 3, 512 * 7]  # where the three members' headers start
FIELDS = {"name": (0, 100), "size": (124, 12), "checksum": (148, 8), "type": (156, 1), "link": (157, 100),
          "magic": (257, 8), "prefix": (345, 155)}


def _base256(n):
    return bytes([0x80 if n >= 0 else 0xFF]) + (n % (1 << 88)).to_bytes(11, "big")


SIZES = (st.integers(0, 8**11 - 1).map(lambda n: b"%011o\0" % n) | st.integers(-2**80, 2**80).map(_base256) |
         st.binary(min_size=12, max_size=12))
TYPES = st.sampled_from([b"0", b"\0", b"1", b"2", b"5", b"7", b"L", b"K", b"S", b"x", b"g"]) | st.binary(min_size=1,
                                                                                                  max_size=1)


@st.composite
def damaged(draw):
    """The archive with some header fields rewritten (sizes as octal, base-256 or noise; types; names), the
    checksum usually made right again so that the damage is believed, and perhaps cut short."""
    data = bytearray(ARCHIVE)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.sampled_from(HEADERS))
        field = draw(st.sampled_from(sorted(FIELDS)))
        start, width = FIELDS[field]
        value = draw(SIZES if field == "size" else TYPES if field == "type" else
                     st.binary(min_size=width, max_size=width))
        data[at + start:at + start + width] = value
        if draw(st.integers(0, 3)):
            h = data[at:at + 512]
            h[148:156] = b" " * 8
            data[at + 148:at + 156] = b"%06o\0 " % sum(h)
    return bytes(data[:draw(st.integers(512, len(data)))])


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(damaged())
def test_any_tar_headers_list_or_fail_plainly_and_allocate_no_more_than_the_archive(data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.tar")
        with open(path, "wb") as f:
            f.write(data)
        tracemalloc.start()
        try:
            source = list_tar(path)
            list(source.load(range(len(source))))
        except SourceError:
            pass
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < len(data) + (4 << 20), f"{peak} bytes allocated for a {len(data)}-byte archive"
