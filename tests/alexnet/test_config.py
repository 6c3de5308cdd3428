"""The config schema: defaults < YAML < command line; unknown keys and wrong types name the key."""
import pytest

from alexnet import config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_precedence(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.05\ndata:\n  crop: 64\n")
    cfg = config.load(path, ["optim.lr=0.2", "train.compile=true", "out_dir=runs/x"])
    assert cfg.optim.lr == 0.2 and cfg.data.crop == 64 and cfg.train.compile is True and cfg.out_dir == "runs/x"
    assert cfg.optim.momentum == 0.9  # default
    assert config.load(write(tmp_path, "optim:\n  weight_decay: 5e-4\n")).optim.weight_decay == 5e-4
    resolved = config.to_dict(cfg)
    assert resolved["data"]["crop"] == 64 and resolved["model"]["groups"] == 1


def test_shipped_configs_load():
    base = config.load("configs/base.yaml")
    assert (base.train.batch_size, base.optim.lr, base.optim.momentum, base.optim.weight_decay) == (128, 0.01, 0.9, 5e-4)
    assert (base.train.epochs, base.data.crop, base.model.dropout, base.data.pca_std) == (90, 224, 0.5, 0.1)
    assert base.model.init == "paper" and base.data.std is False
    for name in ("demo", "cifar64"):
        cfg = config.load(f"configs/{name}.yaml")
        assert cfg.data.crop == 64 and cfg.model.init == "kaiming" and cfg.data.std is True


@pytest.mark.parametrize("text,overrides,message", [
    ("optim:\n  lrr: 0.1\n", [], "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
    ("dat:\n  crop: 3\n", [], "unknown key 'dat'; did you mean 'data'"),
    ("optim:\n  lr: fast\n", [], "optim.lr: expected float, got str"),
    ("data:\n  std: 1\n", [], "data.std: expected bool, got int"),
    ("train:\n  epochs: 2.5\n", [], "train.epochs: expected int, got float"),
    ("", ["optim.momentun=0.5"], "command line: unknown key 'optim.momentun'; did you mean 'optim.momentum'"),
    ("", ["optim.lr"], "expected key.sub=value"),
    ("", ["model.init=xavier"], "model.init: 'xavier' is not one of paper, kaiming"),
    ("", ["model.groups=3"], "model.groups: 3; 1 or 2"),
    ("optim: [1, 2]\n", [], "optim must be a mapping"),
])
def test_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(write(tmp_path, text), overrides)


def test_every_key_has_help():
    text = config.describe()
    assert "optim.lr" in text and "data.pca_std" in text
    assert all(len(line.split(None, 3)) == 4 for line in text.splitlines())
