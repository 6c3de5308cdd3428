"""The training configuration: one schema, declared once, with a type, a default and a line of help per key.

Precedence: these defaults < the YAML file < ``key.sub=value`` overrides on the command line. Unknown
keys and wrong types are errors naming the key (and the nearest valid one).
"""
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field

import yaml


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Data:
    train: str = _f("", "packed training split (python -m preprocess.build_lmdb)")
    val: str = _f("", "packed validation split, built with --classes-from the training split")
    crop: int = _f(224, "random crop side for training, centre crop for validation (paper: 224 of 256)")
    workers: int = _f(2, "loader worker processes per rank")
    mean: str = _f("rgb", "subtract the per-channel mean ('rgb') or the per-pixel mean image ('image')")
    std: bool = _f(False, "also divide by the per-channel std (not in the paper)")
    pca_std: float = _f(0.1, "sigma of the PCA colour shift's alpha (paper Sec. 4.1: 0.1); 0 turns it off")
    order: str = _f("random", "'random' (full shuffle) or 'sequential' (shard-local, for data larger than RAM)")
    skip_corrupt: bool = _f(False, "replace a corrupt training record by another of its batch and log it, instead "
                                   "of stopping (counted per epoch in metrics.jsonl as skipped_records)")


@dataclass
class Model:
    groups: int = _f(1, "2 reproduces the paper's two-GPU connectivity in conv2, conv4, conv5")
    init: str = _f("paper", "'paper' (N(0, 0.01), some biases 1) or 'kaiming'")
    lrn: bool = _f(True, "local response normalisation after conv1 and conv2 (paper Sec. 3.3)")
    dropout: float = _f(0.5, "dropout on the outputs of fc6 and fc7")


@dataclass
class Train:
    epochs: int = _f(90, "epochs to train")
    batch_size: int = _f(128, "global batch size, split evenly across ranks")
    checkpoint_every: int = _f(0, "also write last.pt every N steps (0: only at the end of each epoch)")
    log_every: int = _f(20, "read the loss back from the device every N steps (and update the bar)")
    compile: typing.Optional[bool] = _f(None, "torch.compile the model (default: on CUDA only)")
    bf16: bool = _f(True, "bf16 autocast on CUDA (the CPU always runs float32)")
    device: str = _f("auto", "'auto' (CUDA when present), 'cpu', 'cuda'")
    ddp: typing.Optional[bool] = _f(None, "wrap the model in DistributedDataParallel (default: with more than one "
                                          "process; true under torchrun on one GPU tests the multi-GPU path)")


@dataclass
class Optim:
    lr: float = _f(0.01, "initial learning rate (paper: 0.01)")
    momentum: float = _f(0.9, "SGD momentum (paper: 0.9)")
    weight_decay: float = _f(5e-4, "weight decay (paper: 0.0005)")
    lr_factor: float = _f(0.1, "multiply the lr by this when val top-1 stops improving (paper: 0.1)")
    patience: int = _f(5, "epochs without a better val top-1 before the lr drops")
    min_lr: float = _f(1e-5, "never drop the lr below this")


@dataclass
class Config:
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)
    optim: Optim = field(default_factory=Optim)
    out_dir: str = _f("runs/base", "run folder: config, log, checkpoints (last.pt, best.pt)")
    seed: int = _f(0, "seed of data order, augmentation and initialisation")


class ConfigError(ValueError):
    pass


def _check(value, kind, key):
    """``value`` as type ``kind`` (int where float is asked is fine), or a ConfigError naming ``key``."""
    if typing.get_origin(kind) is typing.Union:
        if value is None:
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is bool and not isinstance(value, bool) or kind is not bool and isinstance(value, bool) \
            or not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(obj, values, prefix, source):
    names = {f.name: f for f in dataclasses.fields(obj)}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys")
    for key, value in values.items():
        full = prefix + str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            raise ConfigError(f"{source}: unknown key {full!r}" + (f"; did you mean {prefix + near[0]!r}?" if near
                              else f"; valid keys here: {', '.join(names)}"))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".", source)
        else:
            setattr(obj, key, _check(value, typing.get_type_hints(type(obj))[key], f"{source}: {full}"))


def load(path=None, overrides=()):
    """The Config of defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides."""
    cfg = Config()
    if path:
        with open(path, encoding="utf-8") as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        _merge(cfg, values, "", path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        nested = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(cfg, nested, "", "command line")
    validate(cfg)
    return cfg


def from_dict(resolved, source="checkpoint"):
    """A Config from a resolved nested dict (a checkpoint's ``config``), checked like a file."""
    cfg = Config()
    _merge(cfg, resolved, "", str(source))
    validate(cfg)
    return cfg


def validate(cfg):
    choices = {"data.mean": ("rgb", "image"), "data.order": ("random", "sequential"),
               "model.init": ("paper", "kaiming"), "train.device": ("auto", "cpu", "cuda")}
    for key, allowed in choices.items():
        value = to_dict(cfg)[key.split(".")[0]][key.split(".")[1]]
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    if cfg.model.groups not in (1, 2):
        raise ConfigError(f"model.groups: {cfg.model.groups}; 1 or 2")
    for key, (lo, hi, lo_open, hi_open) in RANGES.items():
        section, name = key.split(".") if "." in key else (None, key)
        value = getattr(getattr(cfg, section), name) if section else getattr(cfg, name)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value}; allowed {_range_text(lo, hi, lo_open, hi_open)}, a finite number")
        if (value < lo or (lo_open and value == lo)) if lo is not None else False:
            raise ConfigError(f"{key}: {value}; allowed {_range_text(lo, hi, lo_open, hi_open)}")
        if (value > hi or (hi_open and value == hi)) if hi is not None else False:
            raise ConfigError(f"{key}: {value}; allowed {_range_text(lo, hi, lo_open, hi_open)}")


# key: (lowest, highest, lowest excluded, highest excluded); None: unbounded. Checked at start, before any work.
RANGES = {
    "data.crop": (63, None, False, False),  # the network's smallest input (alexnet/model.py)
    "data.workers": (0, 512, False, False),
    "data.pca_std": (0, None, False, False),
    "model.dropout": (0, 1, False, True),
    "train.epochs": (1, None, False, False), "train.batch_size": (1, None, False, False),
    "train.checkpoint_every": (0, None, False, False), "train.log_every": (1, None, False, False),
    "optim.lr": (0, None, True, False), "optim.momentum": (0, 1, False, True),
    "optim.weight_decay": (0, None, False, False), "optim.lr_factor": (0, 1, True, True),
    "optim.patience": (0, None, False, False), "optim.min_lr": (0, None, False, False),
    "seed": (0, 2**32 - 1, False, False),  # numpy's seeds are 32-bit
}


def _range_text(lo, hi, lo_open, hi_open):
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def to_dict(cfg):
    """The resolved config as nested plain types (what checkpoints and config.yaml hold)."""
    return dataclasses.asdict(cfg)


def yaml_dump(resolved):
    """The resolved config as YAML text (printed at start, saved as OUT/config.yaml)."""
    return yaml.safe_dump(resolved, sort_keys=False).rstrip()


def describe():
    """Every key with its type, default and help: the schema in text."""
    lines = []

    def walk(obj, prefix):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                kind = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
                lines.append(f"{prefix + f.name:<24} {kind:<15} {value!r:<12} {f.metadata.get('help', '')}")

    walk(Config(), "")
    return "\n".join(lines)
