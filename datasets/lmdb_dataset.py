"""Random access to a packed split: ``LMDBDataset(root)[i] -> (H×W×3 RGB uint8 array, label)``.

LMDB environments are opened lazily, read-only and lock-free, in the process that reads, and shared by
every dataset of that process: py-lmdb refuses to open one environment twice in a process, and its table
of open environments survives a fork. So a process-wide registry holds them, and a forked child closes
what it inherited before opening its own. A dataset pickles as its root alone, so DataLoader workers
started with ``spawn`` or ``forkserver`` reopen too.
"""
import os
import threading

import lmdb
import numpy as np

from datasets import format as fmt

_envs = {}  # realpath -> lmdb.Environment, for this process only
_envs_lock = threading.Lock()


def _close_inherited():
    """In a forked child: close the parent's environments (never use them), so they can be reopened."""
    for env in _envs.values():
        try:
            env.close()
        except Exception:
            pass
    _envs.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


def shared_env(path, *, readahead=False):
    """This process's one read-only environment for the shard at ``path``."""
    key = os.path.realpath(path)
    env = _envs.get(key)
    if env is None:
        with _envs_lock:
            env = _envs.get(key)
            if env is None:
                env = _envs[key] = fmt.open_shard(path, readahead=readahead)
    return env


class LMDBDataset:
    """A packed split. ``meta`` is its meta.json; ``classes`` the class names; records decode on access."""

    def __init__(self, root, *, readahead=False):
        self.root = os.fspath(root)
        self.readahead = readahead
        self.meta = fmt.read_meta(self.root)
        self.classes = self.meta["classes"]
        self.encoding = self.meta["encoding"]
        self.paths = [os.path.join(self.root, s["path"]) for s in self.meta["shards"]]
        for p in self.paths:
            if not os.path.isdir(p):
                raise fmt.FormatError(f"{p}: shard directory is missing (meta.json lists it); "
                                      "restore it or rebuild the split")
        self.offsets = np.cumsum([0] + [s["num_records"] for s in self.meta["shards"]])
        self.first_keys = fmt.first_keys(self.meta)

    def __len__(self):
        return int(self.offsets[-1])

    def __getstate__(self):
        return {"root": self.root, "readahead": self.readahead}

    def __setstate__(self, state):
        self.__init__(state["root"], readahead=state["readahead"])

    def shard_of(self, index):
        return int(np.searchsorted(self.offsets, index, side="right")) - 1

    def where(self, index):
        return f"{self.root}/{self.meta['shards'][self.shard_of(index)]['path']} record {index}"

    def visit(self, indices, fn, *, copy=False, on_error=None):
        """Call ``fn(position, index, record)`` for each of ``indices``, in one read transaction per shard
        touched. With ``copy=False`` the record's ``image`` is a zero-copy view into the memory-mapped
        shard, valid only during the call: decode or copy what you need there. An exception from ``fn``
        leaves with the record named (its ``record`` attribute, and a note); a FormatError (a damaged record)
        goes to ``on_error(position, index, exc)`` instead, when given, and the visit goes on."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise IndexError(f"record {bad} out of range for {self.root} ({len(self)} records)")
        shards = np.searchsorted(self.offsets, indices, side="right") - 1
        for s in np.unique(shards):
            env = shared_env(self.paths[s], readahead=self.readahead)
            key_offset = self.first_keys[s] - int(self.offsets[s])
            with env.begin(buffers=True) as txn:
                for pos in np.flatnonzero(shards == s):
                    i = int(indices[pos])
                    where = f"{self.paths[s]} record {i}"
                    try:
                        value = txn.get(fmt.encode_key(i + key_offset))
                    except lmdb.Error as exc:
                        raise fmt.FormatError(f"{where}: LMDB reports '{exc}': the shard is damaged; restore it or "
                                              "rebuild the split") from None
                    if value is None:
                        raise fmt.FormatError(f"{where}: missing from its shard; the split is damaged, rebuild it")
                    try:
                        fn(pos, i, fmt.unpack_record(value, where=where, copy=copy))
                    except Exception as exc:  # name the record, whatever failed (a worker sends this on)
                        if getattr(exc, "record", None) is None:
                            exc.record = where
                            if where not in str(exc):
                                exc.add_note(f"while reading {where}")
                        if on_error is None or not isinstance(exc, fmt.FormatError):
                            raise
                        on_error(pos, i, exc)

    def records(self, indices):
        """Unpacked, crc-checked records for ``indices`` (images as bytes)."""
        out = [None] * len(indices)
        self.visit(indices, lambda pos, i, rec: out.__setitem__(pos, rec), copy=True)
        return out

    def check_record(self, rec, index):
        """The record's shape is the split's and its label one of its classes (as preprocess.verify checks)."""
        size, n = self.meta["size"], len(self.classes)
        if rec["shape"] != [size, size, 3]:
            raise fmt.FormatError(f"{self.where(index)} (source {rec['source']!r}): shape {rec['shape']}, but "
                                  f"meta.json says size {size}; the split is damaged: run python -m preprocess.verify "
                                  f"{self.root}, then rebuild it")
        if not (isinstance(rec["label"], int) and 0 <= rec["label"] < n):
            raise fmt.FormatError(f"{self.where(index)} (source {rec['source']!r}): label {rec['label']!r} out of "
                                  f"range for the split's {n} classes; run python -m preprocess.verify {self.root}, "
                                  "then rebuild it")

    def decode(self, rec, index):
        self.check_record(rec, index)
        return fmt.decode_image(rec, self.encoding, where=self.where(index))

    def __getitem__(self, index):
        index = int(index)
        if index < 0:
            index += len(self)
        rec = self.records([index])[0]
        return self.decode(rec, index), rec["label"]

    def __getitems__(self, indices):
        """A batch in one transaction per shard (DataLoader calls this with a whole batch of indices)."""
        return [(self.decode(rec, i), rec["label"]) for i, rec in zip(indices, self.records(indices))]
