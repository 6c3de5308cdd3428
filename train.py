"""Train AlexNet as in the paper: ``python train.py configs/base.yaml [key.sub=value ...] [--fresh]``.

Parse the config, build data, model and optimizer, resume from OUT/last.pt if it is there, then per epoch:
train, validate (centre crop, top-1 and top-5), step the lr on val top-1, write last.pt (and best.pt).
Many GPUs or machines: ``torchrun --nproc_per_node N train.py CONFIG`` (train.batch_size stays global).
"""
import argparse
import os
import random
import sys
import time

# Intel's setting for MKL (torch's CPU matrix products) reproducible run to run at a fixed thread count, unless
# the user says otherwise. Measured cost: none within noise (bench.mkl_settings; MKL_CBWR=COMPATIBLE costs 31%).
# Not sufficient for bit-identical restarts on its own (README, "Training").
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import numpy as np  # noqa: E402 (after MKL's settings, read when it loads)
import torch  # noqa: E402

from alexnet import checkpoint, config, distributed, engine, run
from alexnet.checkpoint import CheckpointError
from datasets import cli, format as fmt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="key.sub=value, overriding the file (e.g. optim.lr=0.02)")
    p.add_argument("--fresh", action="store_true", help="start over: move an existing OUT aside (never deleted)")
    args = p.parse_args(argv)
    stop = run.Preemption()  # from the start: SIGTERM / SIGUSR1 stop at the first step, saved, exit PREEMPTED_EXIT
    cfg = config.load(args.config, args.overrides)
    resolved = config.to_dict(cfg)
    device = run.pick_device(cfg.train.device)
    if cfg.train.ddp and "RANK" not in os.environ:
        raise run.RunError("train.ddp=true needs the process group that torchrun sets up: "
                           "torchrun --nproc_per_node N train.py CONFIG train.ddp=true")
    rank, world_size = distributed.setup(device, force=bool(cfg.train.ddp))
    if cfg.train.ddp is False and world_size > 1:
        raise run.RunError(f"train.ddp=false with {world_size} processes would train {world_size} separate models; "
                           "leave train.ddp unset")
    use_ddp = world_size > 1 or bool(cfg.train.ddp)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (torchrun's LOCAL_RANK)
    run.device_settings(device)
    main_rank = rank == 0
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    train_loader, val_loader, normalize = run.data(cfg, rank, world_size, device)
    meta = train_loader.meta
    # what data.mean=image subtracts travels in every checkpoint: using the network needs no training split
    mean_image = torch.from_numpy(fmt.read_mean_image(cfg.data.train, meta)) if cfg.data.mean == "image" else None
    net = run.model(cfg, len(meta["classes"])).to(device, memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed * 1000 + rank)  # after init (DDP copies rank 0's): each rank its own dropout
    normalize = normalize.to(device)
    optimizer, scheduler = run.optimizer(cfg, net.parameters())
    epoch, step, best = 0, 0, 0.0

    lock = run.prepare_out_dir(cfg.out_dir, args.fresh) if main_rank else None  # one trainer per out_dir
    if world_size > 1:
        torch.distributed.barrier()
    last, best_path = os.path.join(cfg.out_dir, "last.pt"), os.path.join(cfg.out_dir, "best.pt")
    totals = None
    if os.path.exists(last):
        ckpt = checkpoint.load(last)
        checkpoint.check_compatible(ckpt, resolved, last)
        checkpoint.check_same_split(ckpt, run.split_meta(meta), last, cfg.data.train)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        try:
            train_loader.load_state_dict(ckpt["loader"])
        except ValueError as exc:
            raise CheckpointError(f"{last}: {exc}; resume with the settings it was written with, or start over "
                                  "with --fresh") from None
        checkpoint.set_rng_state(ckpt["rng"], rank, device)
        epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt["best_top1"]
        totals = engine.share_totals(ckpt.get("epoch_totals"), rank, world_size)
        was = ckpt["loader"]["world_size"]
        if was != world_size and main_rank:
            print(f"note: {last} was written by {was} process(es), this run has {world_size}: the same global "
                  "batches from here, but other dropout and colour-shift draws (not bit-identical to a run that "
                  "kept its processes)", flush=True)
        if best > 0 and not os.path.exists(best_path):
            print(f"warning: {best_path} is missing though {last} records a best val top-1 of {best:.1%} (a run "
                  "stopped between the two writes by an older version); it is written again at the next epoch",
                  file=sys.stderr)
            best = 0.0
        if main_rank:
            print(f"=== RESUMING {last}: epoch {epoch}, step {step}, batch {ckpt['loader']['position']} of the epoch "
                  f"(run with --fresh to start over) ===", flush=True)
    if main_rank:
        print(config.yaml_dump(resolved), flush=True)
        run.write_config(cfg.out_dir, resolved)
    log = run.RunLog(cfg.out_dir, start_epoch=epoch) if main_rank else None  # rows from here on are run again

    model = net
    if use_ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile if cfg.train.compile is not None else device.type == "cuda":
        model = torch.compile(model)  # after DDP, so the compiler splits graphs at DDP's gradient buckets
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.train.bf16)

    def save(path, next_epoch, epoch_totals=None, also=None, position=None):
        rng = {**checkpoint.rng_state(), **checkpoint.rank_rng_states(device)}
        if epoch_totals is not None:  # every rank's own sums (its share of the epoch), restored per rank
            epoch_totals = distributed.gather_dicts(epoch_totals, device)
        if main_rank:
            checkpoint.save(path, also=also, model=net.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), scaler={}, epoch=next_epoch, step=step,
                            loader={**train_loader.state_dict(), **({} if position is None else {"position": position})},
                            rng=rng, config=resolved,
                            meta=run.split_meta(meta), mean_image=mean_image, best_top1=best,
                            epoch_totals=epoch_totals)

    def on_checkpoint(at_step, epoch_totals):
        nonlocal step
        step = at_step
        save(last, epoch, epoch_totals)

    t_start = time.time()
    try:
        for epoch in range(epoch, cfg.train.epochs):
            train_loader.set_epoch(epoch)
            skipped_before = len(train_loader.skipped)
            stats, step, totals, stopped = engine.train_one_epoch(
                model, train_loader, normalize, optimizer, device=device, epoch=epoch, step=step, autocast=autocast,
                log_every=cfg.train.log_every, checkpoint_every=cfg.train.checkpoint_every,
                on_checkpoint=on_checkpoint, stop=stop, totals=totals, show=main_rank and sys.stderr.isatty())
            # the epoch's training, kept before validating (its loader at the end): a failure there loses none of it
            save(last, epoch, totals, position=None if stopped else len(train_loader))
            if stopped:
                return stop.exit(main_rank, last, epoch, step, t_start)
            try:
                val = engine.evaluate(model, val_loader, normalize, device=device, autocast=autocast)
            except fmt.FormatError as exc:
                raise run.RunError(f"{exc}. data.skip_corrupt covers training only (validation scores every record). "
                                   f"To go on: python -m preprocess.verify {cfg.data.val} lists the damage; rebuild "
                                   f"the split or restore the shard from a copy, then run the same command: it resumes "
                                   f"at epoch {epoch}'s validation ({last} holds its training)") from None
            scheduler.step(val["val_top1"])
            improved = val["val_top1"] > best
            best = max(best, val["val_top1"])
            row = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"], **stats, **val,
                   "wall_time": time.time() - t_start}
            for what in train_loader.skipped[skipped_before:]:
                print(f"skipped corrupt record (data.skip_corrupt): {what}", file=sys.stderr, flush=True)
            if main_rank:
                log.write(row)
                print(f"epoch {epoch}: train loss {stats['train_loss']:.3f} top-1 {stats['train_top1']:.1%} | "
                      f"val loss {val['val_loss']:.3f} top-1 {val['val_top1']:.1%} top-5 {val['val_top5']:.1%} | "
                      f"{stats['images_per_s']:.0f} img/s, data wait {stats['data_wait']:.0%}", flush=True)
            save(last, epoch + 1, also=best_path if improved else None)  # best.pt: the same file, linked
            totals = None
            if distributed.any_rank([stop.requested], device)[0]:
                return stop.exit(main_rank, last, epoch + 1, step, t_start)
    except engine.Diverged as exc:
        print(f"stopped: {exc}. The last good checkpoint is kept in {cfg.out_dir}.", file=sys.stderr)
        return 1
    except fmt.FormatError as exc:
        again = f"it resumes from {last}" if os.path.exists(last) else "it starts over (no checkpoint yet)"
        raise run.RunError(f"{exc}. To go on: python -m preprocess.verify {cfg.data.train} lists the damage; rebuild "
                           f"the split or restore the shard from a copy, then run the same command ({again})"
                           + ("" if cfg.data.skip_corrupt else "; or set data.skip_corrupt=true to log and replace "
                              "corrupt training records")) from None
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
    if not distributed.same_on_all_ranks(net):
        raise RuntimeError("ranks ended with different weights")
    if main_rank:
        print(f"done: best val top-1 {best:.1%}" + (f"; {best_path}" if os.path.exists(best_path) else "") +
              (f"; identical weights on all {world_size} ranks" if world_size > 1 else ""), flush=True)
    distributed.teardown()
    return 0


if __name__ == "__main__":
    cli.run(main, (config.ConfigError, run.RunError, CheckpointError, fmt.FormatError))
