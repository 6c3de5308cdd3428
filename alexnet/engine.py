"""The loop: ``train_one_epoch`` and ``evaluate``, each about a screen long.

Batches arrive as uint8 on the model's device (the loader copies them there ahead of use, see
``datasets/device.py``) and are normalised there (``datasets.Normalize``). The loss is read back to the host
only at sync points (every ``log_every`` steps, at checkpoints and at the epoch's end). There all ranks agree,
with one all-reduce, on whether any rank saw a NaN or infinite loss (all stop at that step) and whether any
rank was asked to stop (preemption: all stop at that step and save it).
"""
import math
import time

import torch
from torch.nn import functional as F
from tqdm import tqdm

from alexnet import distributed


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


def topk_correct(logits, labels, ks=(1, 5)):
    """Number of samples whose label is among the top-k logits, for each k."""
    top = logits.topk(max(ks), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, :k].any(dim=1).sum() for k in ks]


def new_totals():
    """What an epoch's metrics are summed from; kept in mid-epoch checkpoints, so a resumed epoch reports the
    whole epoch."""
    return {"loss_sum": 0.0, "correct": 0.0, "seen": 0, "wait": 0.0, "elapsed": 0.0}


def share_totals(saved, rank, world_size):
    """This rank's share of a mid-epoch checkpoint's per-rank sums (None at an epoch's end). On another number
    of processes than wrote them, rank 0 takes all the counts (they are summed over ranks at the epoch's end)
    and the saved rank 0's times; the other ranks start from zero."""
    if isinstance(saved, dict):  # written by one process before the sums were kept per rank
        saved = [saved]
    if not isinstance(saved, list) or not saved:
        return None
    if len(saved) == world_size:
        return saved[rank]
    if rank:
        return new_totals()
    merged = dict(saved[0])
    for key in ("loss_sum", "correct", "seen", "skipped"):
        merged[key] = sum(t.get(key, 0) for t in saved)
    return merged


def train_one_epoch(model, loader, normalize, optimizer, *, device, epoch, step, autocast, log_every=20,
                    checkpoint_every=0, on_checkpoint=None, stop=None, totals=None, show=True):
    """One pass over ``loader`` (from its position, adding to ``totals`` of the batches before it).
    ``on_checkpoint(step, totals)`` runs every ``checkpoint_every`` steps, once the loss is known to be finite
    (not on the epoch's last step: the end-of-epoch checkpoint follows). ``stop.requested`` (a signal) ends
    the epoch early at a sync point that all ranks agree on. Returns (metrics, new step count, totals,
    stopped)."""
    model.train()
    normalize.train()
    totals = dict(totals or new_totals())
    # float64 accumulators that start from the sums carried in a checkpoint: a resumed epoch adds the same
    # numbers in the same order as an uninterrupted one, so its metrics match to the last bit
    loss_sum = torch.tensor(float(totals["loss_sum"]), dtype=torch.float64, device=device)
    correct = torch.tensor(float(totals["correct"]), dtype=torch.float64, device=device)
    seen, wait, t0 = 0, 0.0, time.perf_counter()
    alone = distributed.world_size() == 1
    stopped, skipped_before = False, len(loader.skipped)

    def current():
        return {"loss_sum": loss_sum.item(), "correct": correct.item(),
                "seen": totals["seen"] + seen, "wait": totals["wait"] + wait,
                "elapsed": totals["elapsed"] + time.perf_counter() - t0,
                "skipped": totals.get("skipped", 0) + len(loader.skipped) - skipped_before}

    bar = tqdm(total=len(loader), initial=loader.position, desc=f"epoch {epoch}", disable=not show,
               dynamic_ncols=True, leave=False)
    t_wait = time.perf_counter()
    for images, labels in loader:
        wait += time.perf_counter() - t_wait
        with autocast:
            logits = model(normalize(images))
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        loss_sum += loss.detach().double() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        last_step = loader.position == len(loader)
        checkpoint_due = bool(checkpoint_every) and step % checkpoint_every == 0 and not last_step
        asked = stop is not None and stop.requested
        if step % log_every == 0 or checkpoint_due or last_step or (alone and asked):
            value = loss.item()  # the only host sync of the loop
            diverged, stopping = distributed.any_rank([not math.isfinite(value), asked], device)
            if diverged:
                raise Diverged(f"loss is not finite at step {step} (epoch {epoch}; this rank's loss: {value}); "
                               "lower optim.lr, or use model.init=kaiming with data.std=true for small data")
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2g}",
                            img_s=f"{seen / elapsed:.0f}", wait=f"{wait / elapsed:.0%}")
            if stopping:
                stopped = True
                bar.update()
                break
        bar.update()
        if checkpoint_due and on_checkpoint is not None:
            on_checkpoint(step, current())
        t_wait = time.perf_counter()
    bar.close()
    totals = current()
    loss_total, correct_total, count, skipped = distributed.all_sum(
        [totals["loss_sum"], totals["correct"], totals["seen"], totals["skipped"]], device)
    stats = {"train_loss": loss_total / max(count, 1), "train_top1": correct_total / max(count, 1),
             "train_images": int(count), "images_per_s": count / max(totals["elapsed"], 1e-9),
             "data_wait": totals["wait"] / max(totals["elapsed"], 1e-9), "skipped_records": int(skipped)}
    return stats, step, totals, stopped


@torch.no_grad()
def evaluate(model, loader, normalize, *, device, autocast, show=False):
    """Centre-crop loss, top-1 and top-5 over every record of the split, summed over all ranks."""
    model.eval()
    normalize.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    for images, labels in tqdm(loader, desc="val", disable=not show, leave=False, dynamic_ncols=True):
        if len(labels) == 0:
            continue
        with autocast:
            logits = model(normalize(images)).float()
        top1, top5 = topk_correct(logits, labels, (1, min(5, logits.shape[1])))
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), top1.double(),
                               top5.double(), torch.tensor(len(labels), dtype=torch.float64, device=device)])
    loss, top1, top5, count = distributed.all_sum(totals.tolist(), device)
    return {"val_loss": loss / max(count, 1), "val_top1": top1 / max(count, 1), "val_top5": top5 / max(count, 1),
            "val_images": int(count)}
