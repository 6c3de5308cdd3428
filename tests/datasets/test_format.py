"""The format module against the format's definition, written out by hand with struct-free bytes and msgpack."""
import json
import zlib

import msgpack
import numpy as np
import pytest

from datasets import format as fmt
from tests.conftest import random_rgb


def test_key_is_8_byte_big_endian_index():
    assert fmt.encode_key(0) == b"\x00" * 8
    assert fmt.encode_key(258) == b"\x00" * 6 + b"\x01\x02"
    assert fmt.decode_key((2**40 + 5).to_bytes(8, "big")) == 2**40 + 5
    keys = [fmt.encode_key(i) for i in (0, 1, 255, 256, 70000)]
    assert keys == sorted(keys)  # byte order = index order: a cursor walks records in order


def test_record_is_plain_msgpack_with_crc32():
    value = fmt.pack_record(b"abc", 7, (2, 3, 3), "x/y.jpg")
    rec = msgpack.unpackb(value)
    assert rec == {"image": b"abc", "label": 7, "shape": [2, 3, 3], "source": "x/y.jpg", "crc32": zlib.crc32(b"abc")}
    assert fmt.unpack_record(value)["label"] == 7


def test_corrupt_record_names_where_and_source():
    rec = msgpack.unpackb(fmt.pack_record(b"abcdef", 1, (1, 2, 3), "cls/a.jpg"))
    rec["image"] = b"abcdeX"
    with pytest.raises(fmt.FormatError, match=r"shard-00002 record 9 \(source 'cls/a.jpg'\): crc32"):
        fmt.unpack_record(msgpack.packb(rec), where="shard-00002 record 9")
    with pytest.raises(fmt.FormatError, match="record 3: not a msgpack"):
        fmt.unpack_record(b"\xc1", where="record 3")
    with pytest.raises(fmt.FormatError, match="lacks"):
        fmt.unpack_record(msgpack.packb({"image": b""}))


@pytest.mark.parametrize("encoding", fmt.ENCODINGS)
def test_encode_decode_roundtrip(encoding, rng):
    rgb = random_rgb(rng, 16, 24)
    rgb[:, :12] = (250, 10, 10)  # a red left half: catches a swapped channel order
    rec = {"image": fmt.encode_image(rgb, encoding, 95), "shape": [16, 24, 3], "source": 0}
    back = fmt.decode_image(rec, encoding)
    assert back.shape == (16, 24, 3)
    assert np.abs(back.astype(int) - rgb).mean() <= (0 if encoding != "jpeg" else 6)
    assert back[8, 3, 0] > 200 and back[8, 3, 2] < 60
    if encoding == "raw":
        assert rec["image"] == rgb.tobytes()


def test_decode_checks_declared_shape():
    rec = {"image": bytes(10), "shape": [2, 2, 3], "source": "s"}
    with pytest.raises(fmt.FormatError, match="raw image has 10 bytes"):
        fmt.decode_image(rec, "raw")


def test_read_meta_rejects_other_formats_and_versions(tmp_path):
    with pytest.raises(fmt.FormatError, match="no such split"):
        fmt.read_meta(tmp_path / "nope")
    with pytest.raises(fmt.FormatError, match="meta.json: missing"):
        fmt.read_meta(tmp_path)
    base = {k: None for k in fmt.META_FIELDS} | {"format": fmt.FORMAT, "version": fmt.VERSION}
    for change, message in (({"format": "ffcv"}, "format is 'ffcv'"), ({"version": 3}, "version 3"),
                            ({"classes": "drop"}, "missing field")):
        meta = {**base, **change}
        if change.get("classes") == "drop":
            del meta["classes"]
        (tmp_path / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(fmt.FormatError, match=message):
            fmt.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(fmt.FormatError, match="not valid JSON"):
        fmt.read_meta(tmp_path)


def test_write_json_atomic_leaves_no_temp(tmp_path):
    fmt.write_json_atomic(tmp_path / "m.json", {"a": "é"})
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8")) == {"a": "é"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
