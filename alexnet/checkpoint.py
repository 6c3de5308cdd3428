"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` (nothing is unpickled).

Keys: ``model`` (unwrapped from DDP and compile), ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (the
epoch in progress, or the next one), ``step`` (optimizer steps so far), ``loader`` (its position),
``rng`` (Python, numpy, torch, CUDA; and ``torch_ranks`` / ``cuda_ranks``, every rank's torch CPU and CUDA
generator states), ``config`` (the resolved config, nested plain dict), ``meta`` (the training split's classes,
size, mean, std and PCA), ``mean_image`` (the H×W×3 float32 mean image that ``data.mean=image`` subtracts, so
that using the network needs no training split; None otherwise), ``best_top1``, ``epoch_totals`` (the epoch's
metric sums so far, in a mid-epoch checkpoint; None at an epoch's end).
"""
import errno
import hashlib
import os
import random
import shutil

import numpy as np
import torch

from datasets.format import atomic_path

META_KEYS = ("classes", "size", "encoding", "mean_rgb", "std_rgb", "pca_eigval", "pca_eigvec", "mean_image",
             "quality", "class_names")  # (and "preprocess": how the builder decoded, for alexnet.predict)
# Keys whose change alters the shape of the model's parameters: resuming across one is an error.
SHAPE_KEYS = (("model", "groups"), ("model", "lrn"), ("data", "crop"))


class CheckpointError(ValueError):
    pass


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def rng_state():
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": np_state[0], "pos": int(np_state[2]), "state": torch.from_numpy(np_state[1].astype(np.int64)),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng_states(device):
    """Every rank's torch generator states (CPU, and this rank's CUDA device), gathered to all ranks: each rank
    draws its own dropout masks and colour shifts, and must get its own streams back on resume."""
    from alexnet import distributed
    states = {"torch_ranks": distributed.gather(torch.get_rng_state(), device)}
    if device.type == "cuda":
        states["cuda_ranks"] = distributed.gather(torch.cuda.get_rng_state(device), device)
    return states


def set_rng_state(state, rank=0, device=None):
    """Restore the generators; each rank its own torch streams. A rank that did not exist when they were saved
    (a resume on more processes) gets a stream of its own, seeded from the saved ones and its rank."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():  # every device rank 0 saw: those that this node has
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
    saved = state.get("torch_ranks") or [state["torch"]]
    if rank < len(saved):
        torch.set_rng_state(saved[rank])
    else:
        torch.manual_seed(_derived_seed(saved[0], rank))
    if device is not None and device.type == "cuda":
        saved = state.get("cuda_ranks") or []
        if rank < len(saved):
            torch.cuda.set_rng_state(saved[rank], device)
        elif saved:
            torch.cuda.manual_seed(_derived_seed(saved[0], rank))


def _derived_seed(generator_state, rank):
    """A 63-bit seed from a saved generator state and a rank: the same on every restart, other for each rank."""
    digest = hashlib.blake2b(generator_state.numpy().tobytes() + rank.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def save(path, *, also=None, **contents):
    """torch.save to a temp file beside ``path``, fsync, rename: a reader never sees half a checkpoint. With
    ``also`` (best.pt), the same file is hard-linked there first, by rename too: no second write and no extra
    space, and a kill between the two renames leaves ``also`` newer than ``path``, never older (so last.pt
    never records a best that best.pt does not hold). On a full disk: a CheckpointError saying what is kept,
    no temporary file left."""
    folder = os.path.dirname(os.path.abspath(path))
    had = os.path.exists(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(contents, f)
            if also is not None:
                _link(tmp, also)
    except (OSError, RuntimeError) as exc:
        free = shutil.disk_usage(folder).free
        # torch's writer reports ENOSPC as a RuntimeError ("... write failed", "unexpected pos"): call it a full
        # disk only when the disk is nearly full, so that another failure (an interrupt) keeps its own message
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < (256 << 20):
            kept = (f"the previous {os.path.basename(path)} is intact. Free some space and run the same command: it "
                    "resumes from it" if had else f"no {os.path.basename(path)} was written yet, so nothing of this "
                    "run is kept. Free some space and run the same command: it starts over")
            raise CheckpointError(f"{path}: no space left on the device ({free / 2**20:.0f} MiB free); {kept}"
                                  ) from None
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(src, dst):
    """``dst`` becomes the file ``src`` (a hard link, renamed into place); where the filesystem has no hard
    links, a copy (atomic too)."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            shutil.copyfile(src, tmp)


def load(path, map_location="cpu"):
    """A checkpoint's dict, or a CheckpointError naming the file and what is wrong with it."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:
        first = (str(exc).splitlines() or ["empty"])[0][:200]  # an empty file: EOFError with no message
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not written by train.py): "
                              f"{type(exc).__name__}: {first}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a train.py checkpoint (no 'model' and 'config')")
    return ckpt


def check_same_split(ckpt, meta, path, split):
    """Resuming must read the split it was trained on: one rebuilt at another size, in another encoding or from
    other images (other statistics) would go on with other pixels under the old normalisation. ``meta`` is
    ``run.split_meta`` of the split given now; keys an older checkpoint lacks are not compared."""
    for key in (k for k in META_KEYS if k != "class_names"):  # names are labels, not pixels
        if key in ckpt["meta"] and ckpt["meta"][key] != meta.get(key):
            old, new = (repr(v) if len(repr(v)) < 60 else repr(v)[:57] + "..." for v in (ckpt["meta"][key], meta.get(key)))
            raise CheckpointError(f"{path}: it was trained on a split whose {key} was {old}, and {split}'s is {new}; "
                                  "resume with the split it was trained on, or start over with --fresh")


def check_compatible(ckpt, config, path):
    """Resuming must not change the model's shape; name the key that does."""
    for section, key in SHAPE_KEYS:
        old, new = ckpt["config"][section][key], config[section][key]
        if old != new:
            raise CheckpointError(f"{path}: {section}.{key} was {old!r} when it was written and is {new!r} now; "
                                  "resume with the same value, or start over with --fresh")
