"""alexnet.run: the run log's TensorBoard scalars, read back with TensorBoard's own reader, and a failing
TensorBoard that costs one warning and never the run; the device settings of a CUDA run."""
import errno
import sys

import numpy as np
import pytest
import torch

from alexnet import run

ROWS = [{"epoch": e, "step": 9 * (e + 1), "lr": 0.01 / 10 ** e, "train_loss": 2.3 - 0.4 * e, "train_top1": 0.1 + e / 7,
         "train_images": 288 * (e + 1), "val_loss": 2.25 - 0.3 * e, "val_top1": 0.125 * e, "val_top5": 0.5 + e / 9,
         "images_per_s": 345.6 + e, "data_wait": 0.03, "wall_time": 12.5 * (e + 1)} for e in range(3)]


def tb_scalars(folder):
    """{tag: [(step, value)]} of every scalar in the event files under ``folder``, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def scalars_of(rows):
    """What TensorBoard should hold for ``rows``: every number but epoch and step, at its epoch, as float32."""
    keys = [k for k in rows[0] if k not in ("epoch", "step")]
    return {k: [(row["epoch"], float(np.float32(row[k]))) for row in rows] for k in keys}


def warnings_in(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def test_tensorboard_holds_every_scalar_of_every_row(tmp_path, capsys):
    log = run.RunLog(tmp_path)
    for row in ROWS:
        log.write(row)
    assert run.read_log(tmp_path) == ROWS
    assert tb_scalars(tmp_path / "tb") == scalars_of(ROWS)
    assert not warnings_in(capsys)


def test_an_uncreatable_writer_is_one_warning_and_the_log_goes_on(tmp_path, capsys):
    (tmp_path / "tb").write_text("a file where the writer's folder should be")
    log = run.RunLog(tmp_path)
    for row in ROWS:
        log.write(row)
    [warning] = warnings_in(capsys)
    assert "TensorBoard" in warning and str(tmp_path / "tb") in warning
    assert run.read_log(tmp_path) == ROWS


def test_a_broken_tensorboard_install_is_one_warning(tmp_path, monkeypatch, capsys):
    """tensorboard present but torch's writer fails to import (an ImportError, as a protobuf mismatch gives)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now raises ImportError
    log = run.RunLog(tmp_path)
    for row in ROWS:
        log.write(row)
    [warning] = warnings_in(capsys)
    assert "TensorBoard" in warning and "torch.utils.tensorboard" in warning
    assert run.read_log(tmp_path) == ROWS


def test_without_tensorboard_there_is_no_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # importlib finds no such package
    log = run.RunLog(tmp_path)
    log.write(ROWS[0])
    assert not warnings_in(capsys) and not (tmp_path / "tb").exists()
    assert run.read_log(tmp_path) == ROWS[:1]


@pytest.mark.parametrize("method", ["add_scalar", "flush"])
def test_a_writer_failing_mid_run_is_one_warning_and_the_log_goes_on(tmp_path, monkeypatch, capsys, method):
    from torch.utils.tensorboard import SummaryWriter

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    log = run.RunLog(tmp_path)
    log.write(ROWS[0])
    monkeypatch.setattr(SummaryWriter, method, full_disk)
    for row in ROWS[1:]:
        log.write(row)
    [warning] = warnings_in(capsys)
    assert "TensorBoard" in warning
    assert run.read_log(tmp_path) == ROWS


def test_cuda_runs_let_cudnn_pick_its_fastest_convolutions(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    run.device_settings(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    run.device_settings(torch.device("cuda", 1))  # no CUDA needed: the flag is only read when cuDNN runs
    assert torch.backends.cudnn.benchmark is True


def test_a_resumed_run_drops_the_rows_it_runs_again(tmp_path, monkeypatch):
    """Rows of the epoch a run resumes at, and later ones, were logged before a failure that kept no checkpoint
    of them: they go (and a torn last line with them); earlier rows, and a damaged line, stay. No start epoch: all
    stay."""
    import json
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in ROWS) + "not json\n" + json.dumps(ROWS[0])[:20]
    path.write_text(text)
    run.RunLog(tmp_path)
    assert path.read_text() == text
    run.RunLog(tmp_path, start_epoch=1)
    assert path.read_text() == json.dumps(ROWS[0]) + "\nnot json\n"
