"""The checks, one function each, run one per process by the runner:
``python3 -m bench.gpu_check.steps NAME --work DIR --result FILE [--small]``.

Each returns ``{"status": "passed" | "failed", "figures": {...}, "report": Markdown, "why": ...}``; an
exception fails the check, its traceback in the check's log. Sizes: one H200 with 16 cores, or (without
CUDA, or with ``--small``) 2 CPU cores at small sizes.
"""
import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Sizes:
    corpus: int  # benchmark corpus images (race, feed rates, bench.train_step, bench.evaluate)
    batch: int  # loader batch of the race and the feed rates
    workers: tuple  # loader workers of the feed rates; the last one elsewhere
    per_class: int  # drawn training images per class (10 classes)
    val_per_class: int
    size: int  # the drawn split's size, and its training crop
    crop: int
    train_batch: int
    race_epochs: int
    matmul: int  # side of the matmuls that keep the consumer busy
    seconds: float  # least seconds per feed-rate window


GPU = Sizes(corpus=4096, batch=256, workers=(8, 16), per_class=410, val_per_class=50, size=256, crop=224,
            train_batch=32, race_epochs=2, matmul=8192, seconds=1.5)
CPU = Sizes(corpus=256, batch=16, workers=(2,), per_class=16, val_per_class=4, size=72, crop=64, train_batch=16,
            race_epochs=2, matmul=64, seconds=0.3)


@dataclasses.dataclass
class Ctx:
    work: str
    cuda: bool
    sizes: Sizes

    @property
    def device(self):
        import torch
        return torch.device("cuda" if self.cuda else "cpu")

    @property
    def data(self):
        with open(os.path.join(self.work, "data.json"), encoding="utf-8") as f:
            return json.load(f)


def spread(values, fmt="{:,.0f}"):
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def passed(report, **figures):
    return {"status": "passed", "figures": figures, "report": report}


def verdict(failures, report, **figures):
    return {"status": "failed" if failures else "passed", "why": "; ".join(failures) or None, "figures": figures,
            "report": report}


@contextlib.contextmanager
def tee():
    """What the block prints, kept (for the report) and still printed (for the log)."""
    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            sys.__stdout__.write(s)
            return buf.write(s)

    with contextlib.redirect_stdout(Tee()):
        yield buf


def command(args, *, timeout, env=None):
    """Run a command from the repository root, its output in this check's log too; (exit status, output)."""
    print(f"$ {' '.join(args)}", flush=True)
    proc = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    print(proc.stdout, flush=True)
    return proc.returncode, proc.stdout


def fenced(text, last=2500):
    return f"```\n{text.strip()[-last:]}\n```"


# ---------------------------------------------------------------------------------------------- the checks


def versions(ctx):
    """What the machine runs; a module that does not import is named, not fatal (this check needs no set-up)."""
    import importlib
    mods = {}
    for name in ("numpy", "torch", "cv2", "lmdb"):
        try:
            mods[name] = importlib.import_module(name)
        except Exception as exc:
            mods[name] = f"missing ({type(exc).__name__}: {exc})"
    np, torch, cv2, lmdb = (mods[n] for n in ("numpy", "torch", "cv2", "lmdb"))
    lines = {"Python": sys.version.split()[0],
             "torch": getattr(torch, "__version__", torch), "numpy": getattr(np, "__version__", np),
             "OpenCV": (f"{cv2.__version__}, decodes straight to RGB: "
                        f"{'yes' if hasattr(cv2, 'IMREAD_COLOR_RGB') else 'no (decode, then convert)'}")
             if not isinstance(cv2, str) else cv2,
             "lmdb": f"LMDB {'.'.join(map(str, lmdb.version()))}, py-lmdb {lmdb.__version__}"
             if not isinstance(lmdb, str) else lmdb,
             "CPU cores": str(len(os.sched_getaffinity(0)))}
    figures = {"cuda": ctx.cuda}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            smi = "unknown (no nvidia-smi)"
        nccl = torch.cuda.nccl.version()
        lines = {"GPU": f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)",
                 "driver": smi, "CUDA": str(torch.version.cuda), "cuDNN": str(torch.backends.cudnn.version()),
                 "NCCL": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl), **lines}
        figures["gpu"] = props.name
    else:
        lines = {"GPU": "none (CUDA not available): CPU sizes", **lines}
    figures.update(lines)
    return passed("\n".join(f"- {k}: {v}" for k, v in lines.items()), **figures)


def data(ctx):
    """The benchmark corpus and its raw and jpeg splits (bench.loader.prepare), and a drawn split of the
    demo's ten classes, learnable, for train.py; all on every core."""
    from bench.gpu_check.drawn import drawn_splits
    from bench.loader import prepare
    s = ctx.sizes
    t0 = time.perf_counter()
    corpus = os.path.join(ctx.work, "corpus")
    _, _, splits = prepare(corpus, s.corpus)
    t1 = time.perf_counter()
    train, val = drawn_splits(ctx.work, s.per_class, s.val_per_class, s.size)
    t2 = time.perf_counter()
    paths = {"corpus": corpus, "raw": splits["raw"], "jpeg": splits["jpeg"], "train": train, "val": val}
    with open(os.path.join(ctx.work, "data.json"), "w", encoding="utf-8") as f:
        json.dump(paths, f)
    return passed(f"- corpus: {s.corpus} images, raw and jpeg splits at 256: {t1 - t0:.1f} s\n"
                  f"- drawn split: {10 * s.per_class} training and {10 * s.val_per_class} validation images at "
                  f"{s.size}: {t2 - t1:.1f} s", corpus_s=t1 - t0, drawn_s=t2 - t1, **paths)


def race(ctx):
    from bench.gpu_check.race import race as run_race
    s = ctx.sizes
    rows = run_race(ctx.data["raw"], ctx.device, batch=s.batch, crop=224, workers=s.workers[-1],
                    epochs=s.race_epochs, matmul=s.matmul)
    lines = ["| variant | must show | mismatched batches | compared | page-locked | verdict |", "|---|---|---|---|---|---|"]
    for name, kind, bad, total, pinned, what, ok in rows:
        must = "none" if kind == "check" else "some"
        locked = ", ".join(map(str, pinned)) if ctx.cuda else "n/a (host batches)"
        lines.append(f"| {name} | {must} | {bad} | {total} | {locked} | {what} |")
    if not ctx.cuda:
        lines.append("\nCPU: no streams, so the stressed hand-off (a)-(d) and the negative controls need CUDA "
                     "(skipped); the host batches above are checked the same way.")
    failures = [f"{name}: {what}" for name, _, _, _, _, what, ok in rows if not ok]
    return verdict(failures, "\n".join(lines),
                   rows=[dict(zip(("name", "kind", "mismatched", "compared", "page_locked", "verdict", "ok"), r))
                         for r in rows], controls_run=ctx.cuda)


def loader(ctx):
    """Loader -> device images/s against one synthetic batch already there; host syncs per batch counted."""
    import torch
    from datasets import Normalize, make_loader
    from datasets.device import CudaCopier
    s, device = ctx.sizes, ctx.device
    syncs = {"event_waits": 0}

    class Counted:
        def __init__(self, event):
            self.event = event

        def query(self):
            return self.event.query()

        def synchronize(self):
            syncs["event_waits"] += 1
            self.event.synchronize()

    class CountingCopier(CudaCopier):
        def copy(self, images, labels):
            d_images, d_labels, event = super().copy(images, labels)
            return d_images, d_labels, Counted(event)

        def wait(self, event, *tensors):
            super().wait(event.event, *tensors)

    def window(batches, normalize, count_syncs=False):
        if ctx.cuda:
            torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if count_syncs and ctx.cuda:
                torch.cuda.set_sync_debug_mode("warn")
            t0, n, k = time.perf_counter(), 0, 0
            for images, labels in batches:
                normalize(images)
                n, k = n + len(labels), k + 1
                if time.perf_counter() - t0 >= s.seconds:
                    break
            if ctx.cuda:
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
        implicit = sum("synchroniz" in str(w.message) for w in caught)
        return n / (time.perf_counter() - t0), k, implicit

    def endless(ld):
        for epoch in itertools.count():
            ld.set_epoch(epoch)
            yield from ld

    lines = [f"batch {s.batch}, 224 crops of 256, `for images, labels in loader: normalize(images)`; "
             "min / median / max of 3 rounds\n",
             "| split | workers | loader -> device | synthetic batch on the device | ratio | host syncs per batch |",
             "|---|---|---|---|---|---|"]
    figures = {}
    for enc in ("raw", "jpeg"):
        for workers in s.workers:
            syncs["event_waits"] = 0
            ld = make_loader(ctx.data[enc], batch_size=s.batch, train=True, workers=workers, device=device,
                             copier=CountingCopier(device) if ctx.cuda else None)
            normalize = Normalize(ld.meta).to(device).train()
            stream = endless(ld)
            fixed = tuple(t.clone() for t in next(stream))
            window(itertools.islice(stream, 3), normalize)  # warm-up: workers, page cache, allocator
            syncs["event_waits"] = 0
            real, synthetic, batches, implicit = [], [], 0, 0
            for _ in range(3):
                synthetic.append(window(itertools.repeat(fixed), normalize)[0])
                rate, k, imp = window(stream, normalize, count_syncs=True)
                real.append(rate)
                batches, implicit = batches + k, implicit + imp
            stream.close()
            ld.close()
            per_batch = (syncs["event_waits"] + implicit) / max(batches, 1)
            ratios = [r / y for r, y in zip(real, synthetic)]
            lines.append(f"| {enc} | {workers} | {spread(real)} | {spread(synthetic)} | {spread(ratios, '{:.3f}')} | "
                         f"{per_batch:.2f} ({syncs['event_waits']} event waits, {implicit} implicit, "
                         f"{batches} batches) |")
            figures[f"{enc}_{workers}"] = {"real": real, "synthetic": synthetic, "ratios": ratios,
                                           "event_waits": syncs["event_waits"], "implicit_syncs": implicit,
                                           "batches": batches}
    if not ctx.cuda:
        lines.append("\nCPU: no copy stream, so no event waits or implicit synchronisations to count.")
    return passed("\n".join(lines), **figures)


def train(ctx):
    s = ctx.sizes
    out = os.path.join(ctx.work, "run")
    code, output = command([sys.executable, "train.py", "configs/demo.yaml", f"out_dir={out}", *train_overrides(ctx),
                            "train.epochs=3", "--fresh"], timeout=600)
    failures = [f"train.py exited {code}"] if code else []
    rows = []
    try:
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError as exc:
        failures.append(f"no metrics.jsonl: {exc}")
    losses = [r["train_loss"] for r in rows]
    if len(rows) != 3 or losses[-1] >= losses[0]:
        failures.append(f"the training loss did not fall over 3 epochs: {losses}")
    if any("val_top1" not in r for r in rows):
        failures.append("metrics.jsonl lacks val_top1")
    tb = tensorboard_scalars(os.path.join(out, "tb"))
    if isinstance(tb, str):
        tb_line = tb
        if "not installed" not in tb:
            failures.append(f"TensorBoard: {tb}")
    else:
        wrong = [k for k in ("train_loss", "val_top1") if len(tb.get(k, [])) != len(rows) or
                 any(abs(v - r[k]) > 1e-6 * max(1.0, abs(r[k])) for v, r in zip(tb[k], rows))]  # float32 there
        tb_line = (f"TensorBoard events read back: {len(tb)} scalars, {len(tb.get('train_loss', []))} epochs, "
                   + ("equal to metrics.jsonl" if not wrong else f"NOT equal to metrics.jsonl for {wrong}"))
        if wrong:
            failures.append(f"TensorBoard scalars differ from metrics.jsonl: {wrong}")
    report = (f"`train.py configs/demo.yaml {' '.join(train_overrides(ctx))} train.epochs=3` on the drawn split "
              f"({10 * s.per_class} images at {s.size}, crops of {s.crop})\n\n| epoch | train loss | val top-1 | "
              "images/s | data wait |\n|---|---|---|---|---|\n"
              + "\n".join(f"| {r['epoch']} | {r['train_loss']:.3f} | {r.get('val_top1', float('nan')):.1%} | "
                          f"{r['images_per_s']:,.0f} | {r['data_wait']:.0%} |" for r in rows)
              + f"\n\n{tb_line}" + (f"\n\n{fenced(output)}" if failures else ""))
    return verdict(failures, report, losses=losses, val_top1=[r.get("val_top1") for r in rows], out=out)


def train_overrides(ctx, workers=None):
    s, d = ctx.sizes, ctx.data
    common = [f"data.train={d['train']}", f"data.val={d['val']}", f"data.workers={workers or s.workers[-1]}",
              f"data.crop={s.crop}", f"train.batch_size={s.train_batch}"]
    return common + (["train.device=cuda", "train.compile=true", "train.bf16=true"] if ctx.cuda else
                     ["train.device=cpu", "train.compile=false"])


def tensorboard_scalars(folder):
    """{tag: values by step} read back with TensorBoard's own reader, or a sentence saying why not."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return "tensorboard is not installed here: its events were not checked"
    if not os.path.isdir(folder):
        return f"no event files in {folder}"
    acc = EventAccumulator(folder)
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    if not tags:
        return f"the event files in {folder} hold no scalars"
    return {tag: [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)] for tag in tags}


def evaluate(ctx):
    """evaluate.py on train's last.pt: the centre crop equal to the last val top-1 within a point, ten crops,
    and the same checkpoint twice as an ensemble equal to it alone."""
    import evaluate as evaluate_cli
    run_dir = os.path.join(ctx.work, "run")
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        last_val = [json.loads(line) for line in f if line.strip()][-1]["val_top1"]
    last = os.path.join(run_dir, "last.pt")
    common = ["--data", ctx.data["val"], "--workers", str(ctx.sizes.workers[-1]), "--device", ctx.device.type,
              "--json"]
    results, texts = {}, []
    for name, argv in (("centre", ["--checkpoint", last]), ("tencrop", ["--checkpoint", last, "--tencrop"]),
                       ("ensemble of last.pt twice", ["--checkpoint", last, "--checkpoint", last])):
        with tee() as out:
            code = evaluate_cli.main([*argv, *common])
        results[name] = json.loads(out.getvalue().strip().splitlines()[-1])
        texts.append(f"{name} (exit {code}):\n{fenced(out.getvalue(), 600)}")
    centre = 1 - results["centre"]["top1_error"]
    failures = []
    if abs(centre - last_val) > 0.01:
        failures.append(f"centre-crop top-1 {centre:.2%} is not within a point of the last val top-1 {last_val:.2%}")
    pair, alone = results["ensemble of last.pt twice"], results["centre"]
    if (pair["top1_error"], pair["top5_error"]) != (alone["top1_error"], alone["top5_error"]):
        failures.append(f"an ensemble of one checkpoint twice differs from it alone: {pair} vs {alone}")
    report = (f"centre-crop top-1 {centre:.2%} against the last epoch's val top-1 {last_val:.2%} (within a point: "
              f"{'yes' if abs(centre - last_val) <= 0.01 else 'NO'}); ten-crop top-1 "
              f"{1 - results['tencrop']['top1_error']:.2%}; ensemble of last.pt twice equal to it alone: "
              f"{'yes' if (pair['top1_error'], pair['top5_error']) == (alone['top1_error'], alone['top5_error']) else 'NO'}"
              "\n\n" + "\n\n".join(texts))
    return verdict(failures, report, centre_top1=centre, last_val_top1=last_val, **results)


def ddp(ctx):
    out = os.path.join(ctx.work, "run-ddp")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
            "configs/demo.yaml", f"out_dir={out}", "train.ddp=true", *train_overrides(ctx), "train.compile=false",
            "train.epochs=1", "--fresh"]
    code, output = command(args, timeout=600, env={"NCCL_DEBUG": "INFO"} if ctx.cuda else None)
    failures = [f"exit status {code}"] if code else []
    if "done:" not in output:
        failures.append("train.py did not finish")
    backend = "NCCL" if ctx.cuda else "gloo"
    if ctx.cuda and "NCCL INFO" not in output:
        failures.append("NCCL printed nothing with NCCL_DEBUG=INFO: the DDP path did not use NCCL")
    nccl = [line for line in output.splitlines() if "NCCL version" in line][:1]
    return verdict(failures, f"{backend}, `{' '.join(args[1:])}`: exit {code}"
                   + (f"; {nccl[0].strip()}" if nccl else "") + f"\n\n{fenced(output, 1500)}", exit=code)


def train_step(ctx):
    """bench.train_step on raw records (goal on a GPU: >= 0.95 of the synthetic rate at >= 25,000 images/s)."""
    from bench import train_step as bench_train_step
    s, corpus = ctx.sizes, ctx.data["corpus"]
    argv = (["--device", "cuda", "--split", "raw", "--images", str(s.corpus), "--workers", str(s.workers[-1]),
             "--batch", "256", "--dir", corpus] if ctx.cuda else
            ["--device", "cpu", "--split", "raw", "--images", str(s.corpus), "--batch", "8", "--crop", "64",
             "--steps", "1", "--repeats", "1", "--dir", corpus])
    with tee() as out:
        res = bench_train_step.main(argv)
    ratio, real = statistics.median(res["ratios"]), statistics.median(res["real"])
    failures = []
    if ctx.cuda:
        if ratio < 0.95 or real < 25_000:
            failures.append(f"goal not met: real / synthetic {ratio:.3f} (goal >= 0.95) at {real:,.0f} images/s "
                            "(goal >= 25,000)")
        goal = "goal met" if not failures else failures[0]
    else:
        goal = "the goal (>= 0.95 at >= 25,000 images/s) applies on a GPU"
    return verdict(failures, f"`python -m bench.train_step {' '.join(argv)}`: {goal}\n\n{fenced(out.getvalue())}",
                   **res)


def kill9(ctx):
    """A trainer killed with SIGKILL mid-epoch: its loader workers gone within 5 s, its GPU memory back."""
    from bench.gpu_check import procs
    out = os.path.join(ctx.work, "run-kill")
    workers = ctx.sizes.workers[0]
    args = [sys.executable, "train.py", "configs/demo.yaml", f"out_dir={out}", *train_overrides(ctx, workers),
            "train.compile=false", "train.epochs=50", "--fresh"]
    baseline = procs.gpu_memory_used() if ctx.cuda else None  # this process's own CUDA context included
    log = open(os.path.join(ctx.work, "kill9-train.log"), "w")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        procs.wait_for_children(proc.pid, workers, timeout=120)
        time.sleep(1.0)  # well into the epoch: batches queued, copies in flight
        children = procs.children(proc.pid)
        listed = proc.pid in procs.gpu_pids() if ctx.cuda else None
        during = procs.gpu_memory_used() if ctx.cuda else None
        t0 = time.perf_counter()
        proc.kill()
        proc.wait()
        left = procs.wait_gone(children, timeout=10)
        gone_s = time.perf_counter() - t0
        failures = []
        if left:
            failures.append(f"{len(left)} of {len(children)} workers still alive {gone_s:.1f} s after the kill")
        elif gone_s > 5:
            failures.append(f"the workers took {gone_s:.1f} s to exit (goal: within 5 s)")
        report = (f"train.py with {workers} loader workers, killed with SIGKILL mid-epoch: {len(children)} "
                  f"child processes, all gone {gone_s:.2f} s after the kill")
        figures = {"workers": len(children), "gone_s": gone_s}
        if ctx.cuda:
            after, freed_s = procs.wait_gpu_memory(baseline + 256, timeout=10)
            held = (procs.gpu_pids() or set()) & {proc.pid, *children}
            seen = {True: "was", False: "was not", None: "could not be"}[listed]
            report += (f"; GPU memory used: {baseline} MiB before the run, {during} MiB during it, {after} MiB "
                       f"{freed_s:.1f} s after the kill (the trainer {seen} listed by nvidia-smi"
                       f"{'; still listed: ' + str(held) if held else ''})")
            figures.update(baseline_mib=baseline, during_mib=during, after_mib=after)
            if after > baseline + 256 or held:
                failures.append(f"GPU memory not given back: {after} MiB used 10 s after the kill, {baseline} before")
        return verdict(failures, report, **figures)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def model(ctx):
    from bench import model as bench_model
    argv = ["--device", "cuda"] if ctx.cuda else ["--device", "cpu", "--batch", "1", "--steps", "1", "--no-compile"]
    with tee() as out:
        bench_model.main(argv)
    return passed(f"`python -m bench.model {' '.join(argv)}`\n\n{fenced(out.getvalue())}")


def evaluate_bench(ctx):
    from bench import evaluate as bench_evaluate
    corpus = ctx.data["corpus"]
    argv = (["--device", "cuda", "--images", "2048", "--batch", "256", "--workers", str(ctx.sizes.workers[-1]),
             "--dir", corpus] if ctx.cuda else ["--device", "cpu", "--images", "16", "--batch", "8", "--dir", corpus])
    with tee() as out:
        bench_evaluate.main(argv)
    return passed(f"`python -m bench.evaluate {' '.join(argv)}`\n\n{fenced(out.getvalue())}")


CHECKS = {f.__name__: f for f in (versions, data, race, loader, train, evaluate, ddp, train_step, kill9, model,
                                  evaluate_bench)}


def main(argv=None):
    p = argparse.ArgumentParser(description="one check of bench.gpu_check (the runner starts these)")
    p.add_argument("name", choices=sorted(CHECKS))
    p.add_argument("--work", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--small", action="store_true")
    args = p.parse_args(argv)
    try:
        import torch
        cuda = torch.cuda.is_available() and not args.small
    except ImportError:  # versions says so; every other check needs the set-up, which names it
        cuda = False
    ctx = Ctx(work=args.work, cuda=cuda, sizes=GPU if cuda else CPU)
    try:
        result = CHECKS[args.name](ctx)
    except Exception as exc:
        traceback.print_exc()
        result = {"status": "failed", "why": f"{type(exc).__name__}: {exc}", "figures": {}, "report": ""}
    result["figures"] = json.loads(json.dumps(result["figures"], default=str))
    print(f"\n{result['status']}" + (f": {result['why']}" if result.get("why") else "") + f"\n{result['report']}",
          flush=True)  # the log holds what the report says, whatever the check printed itself
    tmp = f"{args.result}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, args.result)
    return 0 if result["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
