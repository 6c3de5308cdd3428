"""The on-disk format of a packed split: the one definition the builder and the reader share.

A split is a directory holding ``meta.json`` and one or more LMDB environments (shards).
Record i of shard k (counting from 0 within the shard) has the key ``first_key + i`` as an 8-byte
big-endian unsigned integer, so a cursor walks records in index order; ``first_key`` is the shard's
(version 2), or the number of records before the shard (version 1, where keys are global indices; a
merged split keeps its parts' keys, so version 2 names them). Its value is a msgpack map (``pack_record``). Nothing is
pickled: a split from a stranger is safe to open. ``docs/FORMAT.md`` is the prose version.
"""
import contextlib
import json
import os
import struct

import cv2
import lmdb
import msgpack
import numpy as np
from zlib_ng.zlib_ng import crc32  # zlib's CRC-32, ~6x faster than the standard library's here

FORMAT = "alexnet-lmdb"
VERSION = 2
READ_VERSIONS = (1, 2)
META_FILE = "meta.json"
MEAN_IMAGE_FILE = "mean_image.npy"
ENCODINGS = ("jpeg", "png", "raw")
RECORD_FIELDS = ("image", "label", "shape", "source", "crc32")
META_FIELDS = (
    "format", "version", "num_records", "classes", "size", "encoding", "quality",
    "mean_rgb", "std_rgb", "pca_eigval", "pca_eigvec", "shards", "skipped",
)
_KEY = struct.Struct(">Q")


class FormatError(ValueError):
    """A split, shard or record that does not follow this format; the message names it."""


def encode_key(index):
    return _KEY.pack(index)


def decode_key(key):
    return _KEY.unpack(key)[0]


def shard_name(i):
    return f"shard-{i:05d}"


def pack_record(image, label, shape, source):
    """msgpack map of one record; ``image`` is the encoded file, or raw H×W×3 RGB bytes."""
    return msgpack.packb({
        "image": image, "label": int(label), "shape": [int(s) for s in shape],
        "source": source, "crc32": crc32(image),
    })


_FIXED_SIZE = {0xc0: 1, 0xc2: 1, 0xc3: 1, 0xcc: 2, 0xcd: 3, 0xce: 5, 0xcf: 9, 0xd0: 2, 0xd1: 3, 0xd2: 5, 0xd3: 9,
               0xca: 5, 0xcb: 9, 0xd4: 3, 0xd5: 4, 0xd6: 6, 0xd7: 10, 0xd8: 18}
_BIN_HEADER = {0xc4: 2, 0xc5: 3, 0xc6: 5}


def _be(b, start, n):
    return int.from_bytes(b[start:start + n], "big")


def _end(b, p):
    """Offset just past the msgpack object starting at ``b[p]``."""
    t = b[p]
    if t < 0x80 or t >= 0xe0:
        return p + 1
    if t < 0xa0:  # fixmap, fixarray
        return _skip(b, p + 1, (t & 0x0f) * (2 if t < 0x90 else 1))
    if t < 0xc0:
        return p + 1 + (t & 0x1f)
    if t in _FIXED_SIZE:
        return p + _FIXED_SIZE[t]
    width = {0xc4: 1, 0xd9: 1, 0xc7: 1, 0xc5: 2, 0xda: 2, 0xc8: 2, 0xc6: 4, 0xdb: 4, 0xc9: 4}.get(t)
    if width is not None:  # bin, str, ext: a length, (ext: a type byte), the payload
        return p + 1 + width + (t in (0xc7, 0xc8, 0xc9)) + _be(b, p + 1, width)
    if t in (0xdc, 0xdd, 0xde, 0xdf):  # array16/32, map16/32
        width = 2 if t in (0xdc, 0xde) else 4
        return _skip(b, p + 1 + width, _be(b, p + 1, width) * (2 if t in (0xde, 0xdf) else 1))
    raise ValueError(f"byte 0x{t:02x} at offset {p} starts no msgpack object")


def _skip(b, p, n):
    for _ in range(n):
        p = _end(b, p)
    return p


def _record_view(b):
    """A msgpack map like ``unpackb``'s, except that ``image`` is a zero-copy view into ``b``.
    Reading a record then costs no copy of its image (and no fresh pages for one)."""
    t = b[0]
    if 0x80 <= t <= 0x8f:
        n, p = t & 0x0f, 1
    elif t in (0xde, 0xdf):
        width = 2 if t == 0xde else 4
        n, p = _be(b, 1, width), 1 + width
    else:
        raise ValueError("not a msgpack map")
    rec = {}
    for _ in range(n):
        e = _end(b, p)
        key = msgpack.unpackb(b[p:e])
        p, e = e, _end(b, e)
        header = _BIN_HEADER.get(b[p]) if key == "image" else None
        rec[key] = b[p + header:e] if header else msgpack.unpackb(b[p:e])
        p = e
    if p != len(b):
        raise ValueError(f"{len(b) - p} bytes after the map")
    return rec


def unpack_record(value, *, where="record", copy=True):
    """The record's map, with its crc32 checked; ``where`` names it in any error.

    ``copy=False`` leaves ``image`` a memoryview into ``value`` (valid only while ``value`` is, e.g. inside
    the LMDB transaction that returned it)."""
    try:
        rec = msgpack.unpackb(value, raw=False) if copy else _record_view(memoryview(value))
    except Exception as exc:
        raise FormatError(f"{where}: not a msgpack record ({exc})") from None
    if not isinstance(rec, dict) or any(f not in rec for f in RECORD_FIELDS):
        raise FormatError(f"{where}: record lacks one of the fields {', '.join(RECORD_FIELDS)}")
    if not isinstance(rec["image"], (bytes, memoryview)):
        raise FormatError(f"{where}: 'image' is {type(rec['image']).__name__}, not bytes")
    if crc32(rec["image"]) != rec["crc32"]:
        raise FormatError(f"{where} (source {rec['source']!r}): crc32 mismatch, the image bytes are corrupt; "
                          "rebuild the split or restore the shard from a copy")
    return rec


def encode_image(img, encoding, quality=90, *, bgr=False):
    """Encoded bytes of an H×W×3 uint8 array, RGB (or OpenCV's BGR with ``bgr=True``, saving a copy)."""
    if encoding == "raw":
        return (cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(img)).tobytes()
    if encoding not in ENCODINGS:
        raise FormatError(f"unknown encoding {encoding!r}; one of {', '.join(ENCODINGS)}")
    bgr = img if bgr else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(quality)]) if encoding == "jpeg" else (".png", [])
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise FormatError(f"cannot encode a {img.shape} image as {encoding}")
    return buf.tobytes()


def decode_image(rec, encoding, *, where="record"):
    """H×W×3 RGB uint8 array of an unpacked record, checked against its declared shape."""
    shape = tuple(rec["shape"])
    if encoding == "raw":
        if len(rec["image"]) != int(np.prod(shape)):
            raise FormatError(f"{where} (source {rec['source']!r}): raw image has {len(rec['image'])} bytes, "
                              f"shape {list(shape)} needs {int(np.prod(shape))}")
        return np.frombuffer(rec["image"], np.uint8).reshape(shape)
    bgr = cv2.imdecode(np.frombuffer(rec["image"], np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FormatError(f"{where} (source {rec['source']!r}): the {encoding} image does not decode")
    if bgr.shape != shape:
        raise FormatError(f"{where} (source {rec['source']!r}): decoded shape {list(bgr.shape)}, "
                          f"declared {list(shape)}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside ``path`` (same extension) to write; when the block ends it is fsynced and
    renamed over ``path``, so a reader never sees half a file; on an error it is removed."""
    root, ext = os.path.splitext(os.fspath(path))
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def read_meta(root):
    """meta.json of a split as a dict, checked for this format and version."""
    path = os.path.join(root, META_FILE)
    if not os.path.isdir(root):
        raise FormatError(f"{root}: no such split directory")
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block the read forever
        raise FormatError(f"{path}: not a regular file; {root} is not a packed split")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing; {root} is not a packed split (or its build did not finish)") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, a 5000-digit number, deep nesting
        raise FormatError(f"{path}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError(f"{path}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                          f"expected {FORMAT!r}")
    if type(meta.get("version")) is not int or meta["version"] not in READ_VERSIONS:
        raise FormatError(f"{path}: version {meta.get('version')!r}, this code reads versions "
                          f"{', '.join(map(str, READ_VERSIONS))}; rebuild the split with this version of "
                          "preprocess.build_lmdb, or update this project")
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        raise FormatError(f"{path}: missing field(s) {', '.join(missing)}")
    _check_meta(meta, path)
    return meta


def _numbers(value, shape):
    """True when ``value`` is a nested list of finite numbers (not strings, not booleans) of this shape."""
    def flat(v):
        return [x for item in v for x in flat(item)] if isinstance(v, list) else [v]
    if not all(type(x) in (int, float) for x in flat(value)):
        return False
    a = np.asarray(value, dtype=np.float64)
    return a.shape == shape and bool(np.isfinite(a).all())


def _count(value):
    return type(value) is int and value >= 0


def _check_meta(meta, path):
    """The fields a reader relies on, each named when wrong: a split from a stranger is checked, not trusted."""
    def bad(field, what):
        return FormatError(f"{path}: field {field} {what}; the file is damaged or not written by "
                           "preprocess.build_lmdb: rebuild the split")

    if not _count(meta["size"]) or meta["size"] < 1:
        raise bad("size", f"is {meta['size']!r}, expected a positive integer")
    if meta["encoding"] not in ENCODINGS:
        raise bad("encoding", f"is {meta['encoding']!r}, expected one of {', '.join(ENCODINGS)}")
    if not isinstance(meta["classes"], list) or not meta["classes"] or not all(isinstance(c, str) for c in meta["classes"]):
        raise bad("classes", "is not a non-empty list of names")
    if len(set(meta["classes"])) != len(meta["classes"]):
        raise bad("classes", "names a class twice")
    names = meta.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != len(meta["classes"]) or
                              not all(isinstance(c, str) for c in names)):
        raise bad("class_names", f"is not a list of {len(meta['classes'])} names, one per class")
    if not _count(meta["num_records"]):
        raise bad("num_records", f"is {meta['num_records']!r}, expected a count")
    name = meta.get("mean_image")
    if name is not None and (not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", "..")):
        raise bad("mean_image", f"is {name!r}: a file name inside the split, or null")
    for field, shape in (("mean_rgb", (3,)), ("std_rgb", (3,)), ("pca_eigval", (3,)), ("pca_eigvec", (3, 3))):
        if not _numbers(meta[field], shape):
            raise bad(field, f"is {str(meta[field])[:80]}, expected {'×'.join(map(str, shape))} finite numbers")
    shards = meta["shards"]
    if not isinstance(shards, list) or not shards:
        raise bad("shards", "is not a non-empty list")
    for k, shard in enumerate(shards):
        sp = shard.get("path") if isinstance(shard, dict) else None
        if not isinstance(sp, str) or not sp or os.path.isabs(sp) or ".." in sp.replace("\\", "/").split("/"):
            raise bad(f"shards[{k}].path", f"is {sp!r}: a shard path must be relative and stay inside the split")
        n = shard.get("num_records")
        if not _count(n):
            raise bad(f"shards[{k}].num_records", f"is {n!r}, expected a count")
        if meta["version"] >= 2 and not _count(shard.get("first_key")):
            raise bad(f"shards[{k}].first_key", f"is {shard.get('first_key')!r}, expected a count")
    if len({s["path"] for s in shards}) != len(shards):
        raise bad("shards", "names a shard twice")
    total = sum(s["num_records"] for s in shards)
    if meta["num_records"] != total:
        raise FormatError(f"{path}: num_records {meta['num_records']!r}, but its shards list {total} records; "
                          "the file is damaged: rebuild the split")


def first_keys(meta):
    """The key of each shard's first record: version 2 stores it, version 1 numbers records globally."""
    if meta["version"] >= 2:
        return [s["first_key"] for s in meta["shards"]]
    return np.cumsum([0] + [s["num_records"] for s in meta["shards"]])[:-1].tolist()


def read_mean_image(root, meta):
    """The per-pixel mean image (H×W×3 float32, RGB, 0–255), or None if the split has none."""
    name = meta.get("mean_image")
    if not name:
        return None
    return np.load(os.path.join(root, name), allow_pickle=False)


def open_shard(path, *, write=False, map_size=1 << 30, readahead=False):
    """An LMDB environment for one shard: a directory, one unnamed database, no locking for readers."""
    if write:
        return lmdb.open(path, map_size=map_size, subdir=True, max_dbs=0, sync=True, metasync=True)
    if not os.path.isdir(path):
        raise FormatError(f"{path}: shard directory is missing")
    data = os.path.join(path, "data.mdb")
    if not os.path.isfile(data):
        raise FormatError(f"{data}: missing or not a regular file; restore the shard or rebuild the split")
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=readahead, subdir=True, max_dbs=0,
                        max_readers=2048)
    except lmdb.Error as exc:
        text = str(exc)
        if "Too many open files" in text:
            raise FormatError(f"{path}: too many open files (every shard of a split stays open while it is read); "
                              "raise the limit, e.g. ulimit -n 65536") from None
        if "Permission denied" in text:
            raise FormatError(f"{path}: permission denied; make the shard readable") from None
        raise FormatError(f"{path}: not a readable LMDB shard ({exc}); restore it or rebuild the split") from None
    # A data.mdb shorter than its last page would kill the reader with SIGBUS on the first read past its end.
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = os.path.getsize(data)
    if have < need:
        env.close()
        raise FormatError(f"{data}: {have} bytes, but its LMDB pages need {need}: the file is truncated "
                          "(a copy that did not finish, a full disk); restore the shard or rebuild the split")
    return env
