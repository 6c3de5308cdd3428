"""Run train.py with a fault injected at an exact moment: ``FAULT_...=... python tests/faults.py CONFIG [overrides]``.

Faults (environment variables, read once):
- ``FAULT_SIGNAL_AT_STEP=N`` (and ``FAULT_SIGNAL=TERM|USR1``, ``FAULT_SIGNAL_TWICE=1``): the process signals
  itself right after optimizer step N, as a scheduler would (twice: the second lands during the save);
- ``FAULT_KILL_AFTER_BEST=1``: SIGKILL right after the new checkpoint is linked as best.pt, before it is
  renamed to last.pt;
- ``FAULT_NAN_RANK=R`` with ``FAULT_NAN_AT_STEP=N``: rank R's loss is NaN from step N on (the others' finite);
- ``FAULT_LOG_DROPOUT=PATH``: each rank appends, at its first dropout of each process start, a hash of the state
  of the generator that draws the mask (equal states draw equal masks) to PATH.RANK.
Nothing here is imported by the project; it patches from outside, as a test harness.
"""
import hashlib
import os
import signal
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alexnet import checkpoint, engine  # noqa: E402

env = os.environ
rank = int(env.get("RANK", 0))
steps = {"n": 0}

if "FAULT_SIGNAL_AT_STEP" in env:
    at, sig = int(env["FAULT_SIGNAL_AT_STEP"]), getattr(signal, "SIG" + env.get("FAULT_SIGNAL", "TERM"))
    original_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == at and rank == 0:
            steps["signalled"] = True
            os.kill(os.getpid(), sig)
        return out

    torch.optim.SGD.step = step
    if env.get("FAULT_SIGNAL_TWICE"):
        original_save = checkpoint.save

        def save(path, **contents):
            if steps.get("signalled"):
                os.kill(os.getpid(), sig)  # arrives while the checkpoint is written
            return original_save(path, **contents)

        checkpoint.save = save

if env.get("FAULT_KILL_AFTER_BEST"):
    original_link = checkpoint._link

    def link(src, dst):
        original_link(src, dst)
        if os.path.basename(dst) == "best.pt":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._link = link

if "FAULT_NAN_RANK" in env:
    nan_rank, nan_at = int(env["FAULT_NAN_RANK"]), int(env["FAULT_NAN_AT_STEP"])
    original_ce = engine.F.cross_entropy
    calls = {"n": 0}

    def cross_entropy(logits, labels, *args, **kwargs):
        loss = original_ce(logits, labels, *args, **kwargs)
        if torch.is_grad_enabled() and kwargs.get("reduction", "mean") == "mean":
            calls["n"] += 1
            if rank == nan_rank and calls["n"] >= nan_at:
                return loss * float("nan")
        return loss

    engine.F.cross_entropy = cross_entropy

if "FAULT_LOG_DROPOUT" in env:
    original_dropout = torch.nn.functional.dropout
    logged = {"done": False}

    def dropout(x, p=0.5, training=True, inplace=False):
        if training and not logged["done"]:  # the generator's state, not the output: a ReLU's zeros hide the mask
            logged["done"] = True
            with open(f"{env['FAULT_LOG_DROPOUT']}.{rank}", "a") as f:
                f.write(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest() + "\n")
        return original_dropout(x, p, training, inplace)

    torch.nn.functional.dropout = dropout

if __name__ == "__main__":
    sys.argv = ["train.py", *sys.argv[1:]]
    os.chdir(ROOT)
    import runpy
    runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
