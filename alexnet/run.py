"""What train.py builds before its loop: device, data, model, optimizer, the run folder and its log."""
import json
import os
import time

import torch

from alexnet.checkpoint import META_KEYS
from alexnet.config import yaml_dump
from alexnet.model import AlexNet
from datasets import LMDBDataset, Normalize, format as fmt, make_loader


class RunError(RuntimeError):
    """A run that cannot start; the message says what to do."""


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device is 'cuda' but no CUDA device is present; use 'auto' or 'cpu'")
    return torch.device(name)


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
    if cfg.train.batch_size % world_size:
        raise RunError(f"train.batch_size {cfg.train.batch_size} does not split evenly over {world_size} ranks")
    per_rank = cfg.train.batch_size // world_size
    common = dict(workers=cfg.data.workers, crop=cfg.data.crop, rank=rank, world_size=world_size, device=device)
    train = make_loader(train_ds, batch_size=per_rank, train=True, seed=cfg.seed, order=cfg.data.order, **common)
    val = make_loader(val_ds, batch_size=per_rank, train=False, **common)
    mean_image = fmt.read_mean_image(train_ds.root, train_ds.meta) if cfg.data.mean == "image" else None
    normalize = Normalize(train_ds.meta, pca_std=cfg.data.pca_std, mean=cfg.data.mean, std=cfg.data.std,
                          mean_image=mean_image)
    return train, val, normalize


def model(cfg, num_classes):
    return AlexNet(num_classes, image_size=cfg.data.crop, groups=cfg.model.groups, lrn=cfg.model.lrn,
                   dropout=cfg.model.dropout, init=cfg.model.init)


def optimizer(cfg, params):
    opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.optim.lr_factor,
                                                       patience=cfg.optim.patience, min_lr=cfg.optim.min_lr)
    return opt, sched


def split_meta(meta):
    """What a checkpoint keeps of the training split's meta.json."""
    return {k: meta.get(k) for k in META_KEYS}


def prepare_out_dir(out_dir, fresh):
    """Create the run folder; ``fresh`` first moves an existing one aside (never deletes it)."""
    if fresh and os.path.exists(out_dir):
        aside = f"{out_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(out_dir, aside)
        print(f"--fresh: moved the previous run to {aside}", flush=True)
    os.makedirs(out_dir, exist_ok=True)


def write_config(out_dir, resolved):
    with fmt.atomic_path(os.path.join(out_dir, "config.yaml")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(yaml_dump(resolved) + "\n")


class RunLog:
    """One JSON line per epoch in OUT/metrics.jsonl, and TensorBoard scalars when tensorboard is installed."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:
            self.tb = None

    def write(self, row):
        _drop_torn_line(self.path)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["epoch"])
            self.tb.flush()


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
