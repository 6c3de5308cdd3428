"""What train.py builds before its loop: device, data, model, optimizer, the run folder and its log."""
import importlib.util
import json
import os
import re
import signal
import sys
import time

import torch

from alexnet.checkpoint import META_KEYS
from alexnet.config import yaml_dump
from alexnet.model import AlexNet
from datasets import LMDBDataset, Normalize, cli, format as fmt, make_loader
from datasets.lock import FolderLock, LockedError


class RunError(RuntimeError):
    """A run that cannot start; the message says what to do."""


def pick_device(name, option="train.device"):
    """The torch device for ``name`` ('auto', 'cpu', 'cuda', 'cuda:N'); ``option`` names it in errors."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"{option} is {name!r}: one of 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"{option} is {name!r}: one of 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise RunError(f"{option} is {name!r} but no such CUDA device is present; use 'auto' or 'cpu'")
    return device


def device_settings(device: torch.device) -> None:
    """Process-wide settings for training on ``device``, set once before the model is built."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: time each convolution's algorithms once, keep the best


def open_split(path, key, *, readahead=False):
    try:
        return LMDBDataset(path, readahead=readahead)
    except fmt.FormatError as exc:
        raise RunError(f"{key}: {exc}. Build a packed split with: python -m preprocess.build_lmdb SRC {path or 'OUT'}"
                       ) from None


def data(cfg, rank, world_size, device=None):
    """(train loader, val loader, Normalize) for this rank, the loaders yielding batches on ``device``; val
    must share train's classes. The sequential order reads its shards with the kernel's readahead on."""
    train_ds = open_split(cfg.data.train, "data.train", readahead=cfg.data.order == "sequential")
    val_ds = open_split(cfg.data.val, "data.val")
    if train_ds.classes != val_ds.classes:
        missing = sorted(set(train_ds.classes) ^ set(val_ds.classes))[:5]
        raise RunError(f"data.val ({cfg.data.val}) has other classes than data.train ({cfg.data.train}), e.g. "
                       f"{missing}; build val with --classes-from the training split")
    check_against_split(cfg, train_ds, world_size)
    per_rank = cfg.train.batch_size // world_size
    common = dict(workers=cfg.data.workers, crop=cfg.data.crop, rank=rank, world_size=world_size, device=device)
    train = make_loader(train_ds, batch_size=per_rank, train=True, seed=cfg.seed, order=cfg.data.order,
                        skip_corrupt=cfg.data.skip_corrupt, **common)
    val = make_loader(val_ds, batch_size=per_rank, train=False, **common)
    mean_image = fmt.read_mean_image(train_ds.root, train_ds.meta) if cfg.data.mean == "image" else None
    normalize = Normalize(train_ds.meta, pca_std=cfg.data.pca_std, mean=cfg.data.mean, std=cfg.data.std,
                          mean_image=mean_image)
    return train, val, normalize


def check_against_split(cfg, train_ds, world_size):
    """Config values that depend on the training split, checked before any work, each naming its key."""
    meta = train_ds.meta
    if cfg.data.crop > meta["size"]:
        raise RunError(f"data.crop: {cfg.data.crop}; allowed 1..{meta['size']} (the size of {cfg.data.train})")
    if cfg.train.batch_size % world_size:
        raise RunError(f"train.batch_size {cfg.train.batch_size} does not split evenly over {world_size} ranks")
    if cfg.train.batch_size > len(train_ds):
        raise RunError(f"train.batch_size: {cfg.train.batch_size}; allowed 1..{len(train_ds)} (the records of "
                       f"{cfg.data.train})")
    if cfg.data.mean == "image" and not meta.get("mean_image"):
        raise RunError(f"data.mean: 'image', but {cfg.data.train} has no mean image; rebuild it with --mean-image, "
                       "or use data.mean=rgb")
    if cfg.data.std and min(meta["std_rgb"]) <= 0:
        raise RunError(f"data.std: true, but {cfg.data.train} has a channel of std {min(meta['std_rgb'])} "
                       "(constant images); use data.std=false")


def model(cfg, num_classes):
    return AlexNet(num_classes, image_size=cfg.data.crop, groups=cfg.model.groups, lrn=cfg.model.lrn,
                   dropout=cfg.model.dropout, init=cfg.model.init)


def optimizer(cfg, params):
    opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.optim.lr_factor,
                                                       patience=cfg.optim.patience, min_lr=cfg.optim.min_lr)
    return opt, sched


def split_meta(meta):
    """What a checkpoint keeps of the training split's meta.json: enough to prepare new images as its records
    were (``alexnet.predict``) and to name its classes."""
    build = meta.get("build") or {}
    return {k: meta.get(k) for k in META_KEYS} | {
        "preprocess": {"exact": bool(build.get("exact", False)), "max_pixels": build.get("max_pixels")}}


def _lock_run(out_dir):
    try:
        return FolderLock(out_dir, lambda pid: f"{out_dir} is in use by pid {pid} (another train.py); wait for it "
                                               "to end, or choose another out_dir")
    except LockedError as exc:
        raise RunError(str(exc)) from None


def prepare_out_dir(out_dir, fresh):
    """Create and lock the run folder (one trainer per folder; a dead owner's lock does not count); ``fresh``
    first moves an existing one aside (never deletes it). Temporary files of a killed write are removed.
    Returns the held lock."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunError(f"out_dir {out_dir} is a file; choose a folder")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):  # the nearest folder that exists: the rest is created
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise RunError(f"out_dir {out_dir} cannot be created or written ({existing} is not a writable folder); "
                       "choose another out_dir")
    if fresh and os.path.exists(out_dir):
        lock = _lock_run(out_dir)  # never move a folder another trainer is writing
        aside = f"{out_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(out_dir, aside)
        lock.release()
        print(f"--fresh: moved the previous run to {aside}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    lock = _lock_run(out_dir)
    for name in os.listdir(out_dir):
        if _TMP.fullmatch(name):
            os.remove(os.path.join(out_dir, name))
            print(f"removed {name}, left by a write that was killed", flush=True)
    return lock


_TMP = re.compile(r".+\.tmp-\d+(\.[A-Za-z0-9]+)?")  # datasets.format.atomic_path's temporary names


class Preemption:
    """SIGTERM or SIGUSR1 (what Slurm, Kubernetes and spot machines send before they kill): ask the loop to
    stop at the next step all ranks agree on; train.py then saves last.pt and exits with PREEMPTED_EXIT. A
    second signal while saving changes nothing (the save is atomic either way)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = 0
        self.t_signal = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            print(f"{name} again: already stopping, the checkpoint is being written", file=sys.stderr, flush=True)
            return
        self.requested, self.t_signal = signum, time.time()
        print(f"{name}: finishing this step, then saving last.pt and exiting", file=sys.stderr, flush=True)

    def exit(self, main_rank, last, epoch, step, t_start):
        if main_rank:
            took = f", {time.time() - self.t_signal:.1f} s after the signal" if self.t_signal else ""
            print(f"preempted: saved {last} at epoch {epoch}, step {step}{took}; run the same command to resume "
                  f"(exit status {PREEMPTED_EXIT})", flush=True)
        return PREEMPTED_EXIT

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


PREEMPTED_EXIT = 143  # 128 + SIGTERM: what a scheduler expects of a job it asked to stop; requeue on it


def write_config(out_dir, resolved):
    with fmt.atomic_path(os.path.join(out_dir, "config.yaml")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(yaml_dump(resolved) + "\n")


class RunLog:
    """One JSON line per epoch in OUT/metrics.jsonl, and TensorBoard scalars in OUT/tb when tensorboard is
    installed. metrics.jsonl is the record: any failure of TensorBoard (a broken install, an unwritable or full
    disk) is one warning, and the run goes on without it."""

    def __init__(self, out_dir, start_epoch=None):
        """``start_epoch``: where the run (re)starts; rows of that epoch and later ones, logged before a failure
        that kept no checkpoint of them, are dropped, since they are run again."""
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if start_epoch is not None:
            _drop_rows_from(self.path, start_epoch)
        self.tb = None
        if importlib.util.find_spec("tensorboard") is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except Exception as exc:
            self._tb_failed(exc)

    def write(self, row):
        _drop_torn_line(self.path)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as exc:
            _drop_torn_line(self.path)
            raise RunError(f"{self.path}: {cli.explain(exc)}; the checkpoints are intact") from None
        if self.tb is not None:
            try:
                for key, value in row.items():
                    if key not in ("epoch", "step") and isinstance(value, (int, float)):
                        self.tb.add_scalar(key, value, row["epoch"])
                self.tb.flush()
            except Exception as exc:
                self._tb_failed(exc)

    def _tb_failed(self, exc):
        what = cli.explain(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        print(f"warning: no TensorBoard logging from here on ({what}); {self.path} records every epoch",
              file=sys.stderr, flush=True)
        self.tb = None


def _drop_rows_from(path, epoch):
    """A run resumed at ``epoch`` runs that epoch and the later ones again: their rows, written before a failure
    that kept no checkpoint of them, go, so that no epoch is logged twice."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return
    complete = [line for line in lines[:-1] if line.strip()]  # after the last newline: nothing, or a torn line
    kept = [line for line in complete if not _epoch_at_least(line, epoch)]
    if len(kept) != len(complete):
        with fmt.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in kept)


def _epoch_at_least(line, epoch):
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False  # a damaged line stays, for read_log to report
    return isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] >= epoch


def _drop_torn_line(path):
    """A run killed while appending leaves a last line without its newline: cut it, so the next row starts clean."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def read_log(out_dir):
    """The rows of OUT/metrics.jsonl; a torn last line (a run killed mid-write) is left out."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise RunError(f"{path}: missing; is {out_dir} a run folder written by train.py?")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # no newline after it: the write was cut short
                continue
            raise RunError(f"{path}:{n}: not a JSON row; the log is damaged (fix or remove that line)") from None
    return rows
