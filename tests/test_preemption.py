"""train.py on a cluster: preemption by signal, a kill between the two checkpoint writes, two trainers on one
folder, a NaN on one rank, a full disk, per-rank random streams after a resume, and config values out of range."""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import DETERMINISTIC, ROOT
from tests.test_train import train, weights

COMMON = ["train.epochs=2", "train.batch_size=32", "train.log_every=4"]  # 9 steps an epoch on the tiny split


def faulty(tiny, out, *extra, env=None, timeout=600, ranks=None):
    args = [sys.executable, os.path.join(ROOT, "tests", "faults.py"), "configs/demo.yaml",
            f"data.train={tiny / 'train'}", f"data.val={tiny / 'val'}", f"out_dir={out}", *map(str, extra)]
    if ranks:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                *args[1:]]
    threads = {**DETERMINISTIC, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if ranks else DETERMINISTIC
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **threads, **(env or {})})


def assert_same_weights(a, b, context=""):
    wa, wb = weights(a), weights(b)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), (key, context)


@pytest.mark.slow
def test_sigterm_at_a_random_step_then_restart_equals_an_uninterrupted_run(tiny, tmp_path):
    train(tiny, tmp_path / "whole", *COMMON)
    at = int(np.random.default_rng(int(time.time())).integers(1, 18))  # any step of either epoch, its last too
    out = tmp_path / "cut"
    t0 = time.monotonic()
    proc = faulty(tiny, out, *COMMON, env={"FAULT_SIGNAL_AT_STEP": str(at), "FAULT_SIGNAL_TWICE": "1"})
    assert proc.returncode == 143, (at, proc.stdout[-2000:], proc.stderr[-2000:])
    assert f"step {at}" in proc.stdout and "run the same command to resume" in proc.stdout, (at, proc.stdout)
    assert "already stopping" in proc.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == at, "no step lost, none repeated"
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    resumed = train(tiny, out, *COMMON)
    assert "RESUMING" in resumed.stdout, (at, time.monotonic() - t0)
    assert_same_weights(tmp_path / "whole" / "last.pt", out / "last.pt", f"signal at step {at}")
    from alexnet.run import read_log
    whole, cut = read_log(tmp_path / "whole"), read_log(out)
    assert [r["epoch"] for r in cut] == [0, 1]
    for a, b in zip(whole, cut):  # a resumed epoch reports the whole epoch, to the last bit
        assert (a["train_loss"], a["train_top1"], a["val_top1"]) == (b["train_loss"], b["train_top1"], b["val_top1"])


@pytest.mark.slow
def test_sigusr1_on_the_last_step_of_an_epoch_resumes_into_the_next(tiny, tmp_path):
    out = tmp_path / "cut"
    proc = faulty(tiny, out, *COMMON, env={"FAULT_SIGNAL_AT_STEP": "9", "FAULT_SIGNAL": "USR1"})
    assert proc.returncode == 143, proc.stderr[-2000:]
    resumed = train(tiny, out, *COMMON)
    assert "epoch 0, step 9, batch 9 of the epoch" in resumed.stdout
    from alexnet.run import read_log
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["train_loss"] > 0.5 for r in rows)


@pytest.mark.slow
def test_killed_between_best_and_last_keeps_them_in_agreement(tiny, tmp_path):
    out = tmp_path / "run"
    proc = faulty(tiny, out, "train.epochs=1", "train.batch_size=32", env={"FAULT_KILL_AFTER_BEST": "1"})
    assert proc.returncode == -9
    best, last = (torch.load(out / n, weights_only=True) for n in ("best.pt", "last.pt"))
    assert best["epoch"] == 1 and last["epoch"] == 0 and last["loader"]["position"] == 9  # trained, not validated
    assert best["best_top1"] > last["best_top1"] == 0.0, "last.pt never records a best that best.pt does not hold"
    left = [p for p in os.listdir(out) if ".tmp-" in p]
    assert left, "the kill came between the two renames: the new last.pt is still a temporary file"
    done = train(tiny, out, "train.epochs=1", "train.batch_size=32")
    assert left[0] in done.stdout and not [p for p in os.listdir(out) if ".tmp-" in p]
    assert "RESUMING" in done.stdout and "epoch 0, step 9, batch 9 of the epoch" in done.stdout
    best, last = (torch.load(out / n, weights_only=True) for n in ("best.pt", "last.pt"))
    assert best["best_top1"] == last["best_top1"] > 0 and best["epoch"] == last["epoch"] == 1
    assert os.path.samefile(out / "best.pt", out / "last.pt"), "best.pt is last.pt's file, linked, not a copy"
    from alexnet.run import read_log
    assert [r["epoch"] for r in read_log(out)] == [0]


def test_two_trainers_on_one_folder(tiny, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", "configs/demo.yaml", f"data.train={tiny / 'train'}",
                              f"data.val={tiny / 'val'}", f"out_dir={out}", "train.epochs=50"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.yaml").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.05)
        second = train(tiny, out, "train.epochs=1", check=False)
        assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        second = train(tiny, out, "train.epochs=1", "--fresh", check=False)
        assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr, "never moved aside in use"
    finally:
        first.kill()
        first.wait()
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    assert len(lines) == len(set(lines)), "no row written twice"


@pytest.mark.slow
def test_nan_on_one_rank_stops_both_at_the_same_step(tiny, tmp_path):
    out = tmp_path / "run"
    proc = faulty(tiny, out, "train.epochs=1", "train.batch_size=32", "train.log_every=2", "train.checkpoint_every=2",
                  "data.workers=1", env={"FAULT_NAN_RANK": "1", "FAULT_NAN_AT_STEP": "3"}, ranks=2, timeout=300)
    assert proc.returncode != 0
    # two processes write to one pipe: their lines may interleave, so count the messages, not the lines
    stops = re.findall(r"stopped: loss is not finite at step (\d+) \(epoch 0", proc.stderr)
    assert stops == ["4", "4"], proc.stderr[-3000:]  # NaN from step 3 on rank 1; the sync point at step 4 stops both
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.slow
def test_two_ranks_preempted_and_resumed_equal_uninterrupted_with_their_own_streams(tiny, tmp_path):
    common = ["train.epochs=1", "train.batch_size=64", "train.log_every=1", "data.workers=1"]
    whole = faulty(tiny, tmp_path / "whole", *common, ranks=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = faulty(tiny, tmp_path / "cut", *common, env={"FAULT_SIGNAL_AT_STEP": "2"}, ranks=2)
    assert cut.returncode != 0 and "preempted: saved" in cut.stdout, cut.stdout[-2000:] + cut.stderr[-2000:]
    log = tmp_path / "masks"
    resumed = faulty(tiny, tmp_path / "cut", *common, env={"FAULT_LOG_DROPOUT": str(log)}, ranks=2)
    assert resumed.returncode == 0 and "RESUMING" in resumed.stdout, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "whole" / "last.pt", tmp_path / "cut" / "last.pt")
    from alexnet.run import read_log
    rows = [[(r["train_loss"], r["train_top1"]) for r in read_log(tmp_path / d)] for d in ("whole", "cut")]
    assert rows[0] == rows[1], "each rank resumes its own share of the epoch's metric sums"
    masks = [open(f"{log}.{r}").read().split() for r in range(2)]
    assert masks[0][-1] != masks[1][-1], "after a resume each rank draws its own dropout masks"
    rng = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["rng"]
    assert len(rng["torch_ranks"]) == 2 and not torch.equal(rng["torch_ranks"][0], rng["torch_ranks"][1])



@pytest.mark.slow
def test_a_run_requeued_on_another_number_of_processes_goes_on(tiny, tmp_path):
    """Preempted on 1 process, requeued on 2, preempted again, finished on 1 (a cluster gives what it has): each
    restart says so, the 2 ranks draw their own dropout masks, and the epoch's metrics count every image once."""
    out, log = tmp_path / "run", tmp_path / "masks"
    common = ["train.epochs=1", "train.batch_size=32", "train.log_every=1", "data.workers=1"]  # 9 steps
    first = faulty(tiny, out, *common, env={"FAULT_SIGNAL_AT_STEP": "2"})
    assert first.returncode == 143, first.stderr[-3000:]
    two = faulty(tiny, out, *common, env={"FAULT_SIGNAL_AT_STEP": "3", "FAULT_LOG_DROPOUT": str(log)}, ranks=2)
    assert two.returncode != 0 and "preempted: saved" in two.stdout, two.stdout[-2000:] + two.stderr[-3000:]
    assert "written by 1 process(es), this run has 2" in two.stdout
    masks = [open(f"{log}.{r}").read().split() for r in range(2)]
    assert masks[0][-1] != masks[1][-1], "a rank that did not exist at the save draws its own dropout masks"
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 5 and [t["seen"] for t in ckpt["epoch_totals"]] == [64 + 48, 48]
    wrong = train(tiny, out, *common, "seed=1", check=False)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert f"{out / 'last.pt'}: loader state: seed was 0, is now 1" in wrong.stderr
    from preprocess.build_lmdb import build
    build(str(tiny / "images" / "train"), str(tmp_path / "rebuilt"), size=80, workers=2, quiet=True)
    wrong = train(tiny, out, *common, f"data.train={tmp_path / 'rebuilt'}", check=False)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert f"whose size was 72, and {tmp_path / 'rebuilt'}'s is 80" in wrong.stderr
    last = faulty(tiny, out, *common)
    assert last.returncode == 0 and "written by 2 process(es), this run has 1" in last.stdout, last.stderr[-3000:]
    from alexnet.run import read_log
    assert [r["train_images"] for r in read_log(out)] == [9 * 32]


@pytest.mark.slow
@pytest.mark.parametrize("size,kept", [("260M", 0)])
def test_a_full_disk_while_checkpointing_keeps_the_epoch_and_resumes_once_there_is_room(tiny, small_disk, size,
                                                                                      kept):
    """Checkpoints are 173 MB here. 260M: room for one, not for the end of epoch 0 beside it (a later epoch, with
    an older best.pt beside last.pt, takes the same path). The message says what is kept, and the same command,
    run once there is room, resumes from it and logs every epoch once."""
    disk = small_disk(size)
    out = disk / "run"
    proc = train(tiny, out, "train.epochs=3", "train.batch_size=32", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "no space left" in err and str(out) in err and "Traceback" not in proc.stderr
    assert "the previous last.pt is intact" in err and "run the same command: it resumes" in err
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == kept and ckpt["loader"]["position"] == 9, "the failed epoch's training is kept"
    subprocess.run(["mount", "-o", "remount,size=1G", str(disk)], check=True)  # room again
    done = train(tiny, out, "train.epochs=3", "train.batch_size=32")
    assert f"epoch {kept}, step {9 * (kept + 1)}, batch 9 of the epoch" in done.stdout
    from alexnet.run import read_log
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2]
    best, last = (torch.load(out / n, weights_only=True) for n in ("best.pt", "last.pt"))
    assert best["best_top1"] == last["best_top1"]


@pytest.mark.slow
def test_the_first_checkpoint_on_a_full_disk_says_nothing_is_kept_and_the_rerun_starts_over(tiny, small_disk):
    disk = small_disk("100M")
    out = disk / "run"
    proc = train(tiny, out, "train.epochs=1", "train.batch_size=32", check=False)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "no space left" in err and "Traceback" not in proc.stderr
    assert "no last.pt was written yet" in err and "it starts over" in err
    subprocess.run(["mount", "-o", "remount,size=1G", str(disk)], check=True)
    done = train(tiny, out, "train.epochs=1", "train.batch_size=32")
    assert "RESUMING" not in done.stdout
    from alexnet.run import read_log
    assert [r["epoch"] for r in read_log(out)] == [0]


@pytest.mark.parametrize("override,key", [
    ("optim.lr=-0.1", "optim.lr"), ("optim.momentum=-1", "optim.momentum"), ("optim.weight_decay=-1e-4",
                                                                              "optim.weight_decay"),
    ("model.dropout=1.0", "model.dropout"), ("optim.lr_factor=1.0", "optim.lr_factor"), ("seed=-1", "seed"),
    ("train.log_every=0", "train.log_every"), ("data.workers=-1", "data.workers"), ("data.crop=999", "data.crop"),
    ("train.batch_size=100000", "train.batch_size"), ("data.mean=image", "data.mean"),
    ("train.batch_size=0", "train.batch_size"), ("data.pca_std=-1", "data.pca_std"),
    ("optim.lr=.nan", "optim.lr"), ("optim.momentum=.inf", "optim.momentum"), ("model.dropout=.nan", "model.dropout"),
    ("seed=4294967296", "seed"), ("data.crop=8", "data.crop"),
])
def test_config_values_out_of_range_are_refused_before_any_work(tiny, tmp_path, override, key):
    t0 = time.monotonic()
    proc = train(tiny, tmp_path / "run", override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and key in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert time.monotonic() - t0 < 60


def test_out_dir_that_is_a_file(tiny, tmp_path):
    (tmp_path / "f").write_text("x")
    proc = train(tiny, tmp_path / "f", check=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr


def _flip_crc(root, index):
    """Record ``index`` of shard 0 made corrupt (its CRC no longer matches); returns the record."""
    import lmdb
    import msgpack
    env = lmdb.open(str(root / "shard-00000"), map_size=1 << 28)
    with env.begin(write=True) as txn:
        key = index.to_bytes(8, "big")
        rec = msgpack.unpackb(txn.get(key))
        rec["crc32"] ^= 1
        txn.put(key, msgpack.packb(rec))
    env.close()
    return rec


def _corrupt(tiny, tmp_path):
    import shutil
    root = tmp_path / "train"
    shutil.copytree(tiny / "train", root)
    return root, _flip_crc(root, 37)["source"]


def test_a_corrupt_record_mid_epoch_says_how_to_go_on_or_is_skipped_when_asked(tiny, tmp_path):
    root, source = _corrupt(tiny, tmp_path)
    common = [f"data.train={root}", "train.epochs=1", "train.batch_size=32"]
    proc = train(tiny, tmp_path / "stop", *common, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err[-2000:]
    assert "shard-00000 record 37" in err and source in err and "preprocess.verify" in err and "skip_corrupt" in err
    proc = train(tiny, tmp_path / "skip", *common, "data.skip_corrupt=true")
    assert "skipped corrupt record (data.skip_corrupt)" in proc.stderr and "record 37" in proc.stderr
    from alexnet.run import read_log
    assert read_log(tmp_path / "skip")[0]["skipped_records"] == 1


def test_a_corrupt_validation_record_keeps_the_epochs_training_and_names_the_val_split(tiny, tmp_path):
    import shutil
    val = tmp_path / "val"
    shutil.copytree(tiny / "val", val)
    _flip_crc(val, 7)
    out = tmp_path / "run"
    common = [f"data.val={val}", "train.epochs=1", "train.batch_size=32", "data.skip_corrupt=true"]
    proc = train(tiny, out, *common, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert f"python -m preprocess.verify {val}" in err and "record 7" in err
    assert "covers training only" in err and "resumes at epoch 0's validation" in err
    assert torch.load(out / "last.pt", weights_only=True)["loader"]["position"] == 9
    shutil.rmtree(val)
    shutil.copytree(tiny / "val", val)  # the split restored from a copy
    done = train(tiny, out, *common)
    assert "epoch 0, step 9, batch 9 of the epoch" in done.stdout
    from alexnet.run import read_log
    assert [r["epoch"] for r in read_log(out)] == [0] and read_log(out)[0]["train_images"] == 9 * 32


def test_an_out_dir_whose_parents_do_not_exist_yet_is_created(tiny, tmp_path):
    """A fresh clone has no runs/: out_dir=runs/demo must work there."""
    train(tiny, tmp_path / "runs" / "deep" / "demo", "train.epochs=1", "train.batch_size=64")
    assert (tmp_path / "runs" / "deep" / "demo" / "last.pt").exists()
