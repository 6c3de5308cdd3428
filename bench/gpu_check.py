"""Every GPU check of the project in one command: ``python -m bench.gpu_check [--out FILE] [--small]``.

Meant for the 15 minutes of a lent GPU machine (at most ~8 minutes on one H200 with 16 cores); it writes
its figures to ``--out`` (Markdown) as it goes and prints them. Without CUDA it runs the same parts on the
CPU at small sizes (``make test`` runs it that way, so it cannot rot):
(a) race: the device loader over a raw split while the GPU is kept busy, on the consumer's stream and on
    the copy stream (copies queued behind compute, so the host runs far ahead of them); every device batch
    is compared with the ``workers=0`` host batch of the same index, over several epochs;
(b) loader -> device images/s, raw and jpeg, 8 and 16 workers, against the same loop over synthetic uint8
    batches already on the device (min / median / max of 3 rounds of >= 4 s);
(c) ``bench.model``, ``bench.train_step`` (raw, 16 workers, bf16, compiled: the goal is >= 0.95 of the
    synthetic rate at >= 25,000 images/s) and ``bench.evaluate``, with their GPU arguments;
(d) ``train.py`` for 3 epochs with ``train.compile`` and bf16 on drawn demo data (the loss must fall), then
    ``evaluate.py --tencrop``;
(e) the DDP path with NCCL on one GPU (``torchrun --nproc_per_node 1 ... train.ddp=true``).
The machine has its own torch and no package registry: this command installs nothing and names any
package that is missing.
"""
import argparse
import importlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REQUIRED = ["numpy", "torch", "lmdb", "msgpack", "zlib_ng", "cv2", "h5py", "yaml", "tqdm", "PIL"]
PYPI_NAME = {"zlib_ng": "zlib-ng", "cv2": "opencv-python-headless", "yaml": "pyyaml", "PIL": "pillow"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def missing_packages():
    out = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(PYPI_NAME.get(name, name))
    return out


class Report:
    """Markdown lines, printed and written (atomically) to ``path`` after every section."""

    def __init__(self, path):
        self.path, self.lines = path, []

    def add(self, text=""):
        print(text, flush=True)
        self.lines.append(text)
        from datasets.format import atomic_path
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(self.lines) + "\n")


def spread(values, fmt="{:,.0f}"):
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def busy(device, n):
    """Work that keeps the device (the current stream) busy for a while: a chain of n×n matmuls."""
    import torch
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return lambda steps=1: [a @ a for _ in range(steps)]


def race(splits, device, *, epochs, workers, batch, matmul):
    """(a): mismatching batches over ``epochs`` epochs, with the consumer's stream busy, then the copy stream."""
    import torch
    from datasets import make_loader
    from datasets.device import CudaCopier
    root = splits["raw"]
    crop = 224
    reference = []
    ref_loader = make_loader(root, batch_size=batch, train=True, workers=0, crop=crop, seed=3)
    for epoch in range(epochs):
        ref_loader.set_epoch(epoch)
        reference.append([(x.clone(), y.clone()) for x, y in ref_loader])
    work = busy(device, matmul)

    class BusyCopier(CudaCopier):
        """Queues compute on the copy stream before each copy: copies complete long after they are issued."""

        def copy(self, images, labels):
            with torch.cuda.stream(self.stream):
                work(4)
            return super().copy(images, labels)

    results = []
    variants = [("consumer stream busy", None)]
    if device.type == "cuda":
        variants.append(("copy stream busy (copies complete late)", BusyCopier(device)))
    for name, copier in variants:
        loader = make_loader(root, batch_size=batch, train=True, workers=workers, crop=crop, seed=3, device=device,
                             copier=copier)
        bad = total = 0
        t0 = time.perf_counter()
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            got = []
            for images, labels in loader:
                work(4)  # the host runs ahead of the device
                got.append((images, labels))
            for (x, y), (ex, ey) in zip(got, reference[epoch]):
                total += 1
                bad += not (torch.equal(x.cpu(), ex) and torch.equal(y.cpu(), ey))
            total += abs(len(got) - len(reference[epoch]))
            bad += abs(len(got) - len(reference[epoch]))
        pinned = getattr(loader._pool, "pinned", None)
        loader.close()
        results.append((name, bad, total, pinned, time.perf_counter() - t0))
    return results


def loader_speed(splits, device, *, workers_list, batch, seconds, rounds):
    """(b): images/s of the loop `for images, labels in loader: normalize(images)`, and of the same loop over
    one synthetic batch already on the device."""
    import torch
    from datasets import Normalize, make_loader

    def run(batches, normalize):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, n = time.perf_counter(), 0
        for images, labels in batches:
            normalize(images)
            n += len(labels)
            if time.perf_counter() - t0 >= seconds and n:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n / (time.perf_counter() - t0)

    def endless(loader):
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader

    rows = {}
    for enc in ("raw", "jpeg"):
        for workers in workers_list:
            loader = make_loader(splits[enc], batch_size=batch, train=True, workers=workers, device=device)
            normalize = Normalize(loader.meta).to(device).train()
            stream = endless(loader)
            fixed = tuple(t.clone() for t in next(stream))
            run(itertools.islice(stream, 3), normalize)  # warm-up
            real, synthetic = [], []
            for _ in range(rounds):
                synthetic.append(run(itertools.repeat(fixed), normalize))
                real.append(run(stream, normalize))
            stream.close()
            loader.close()
            rows[(enc, workers)] = (real, synthetic)
    return rows


def run_command(report, title, args, *, timeout, env=None):
    """Run a command from the repository root; its output goes into the report. Returns (returncode, output)."""
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    out = proc.stdout + (f"\n[stderr]\n{proc.stderr[-3000:]}" if proc.returncode else "")
    report.add(f"### {title}\n\n`{' '.join(args[1:] if args[0] == sys.executable else args)}` "
               f"(exit {proc.returncode}, {time.perf_counter() - t0:.0f} s)\n\n```\n{out.strip()}\n```\n")
    return proc.returncode, proc.stdout


def demo_splits(work, per_class, val_per_class, size):
    from preprocess.build_lmdb import build
    from preprocess.make_demo import make_demo
    images = os.path.join(work, f"demo-{per_class}")
    if not os.path.exists(os.path.join(images, ".done")):
        make_demo(images, seed=1, train_per_class=per_class, val_per_class=val_per_class, quiet=True)
        open(os.path.join(images, ".done"), "w").close()
    train, val = os.path.join(work, f"demo-train-{per_class}"), os.path.join(work, f"demo-val-{per_class}")
    if not os.path.exists(train):
        build(os.path.join(images, "train"), train, size=size, workers=os.cpu_count(), quiet=True)
    if not os.path.exists(val):
        build(os.path.join(images, "val"), val, size=size, workers=os.cpu_count(), quiet=True, classes_from=train)
    return train, val


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.md")
    p.add_argument("--small", action="store_true", help="CPU-sized run (the default without CUDA)")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "alexnet-gpu-check"))
    args = p.parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"error: missing Python package(s): {', '.join(missing)}. This command installs nothing (the GPU "
              "machine has its own torch and no registry); bring wheels for its Python and install them with "
              f"`pip install --no-index --target DIR WHEELS`, then PYTHONPATH=DIR (see docs/BENCHMARKS.md)",
              file=sys.stderr)
        return 2
    import torch
    cuda = torch.cuda.is_available()
    small = args.small or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    cpus = os.cpu_count()
    n_images = 256 if small else 4096
    batch = 16 if small else 256
    workers_list = [2] if small else [8, 16]
    workers = workers_list[-1]
    from bench.loader import prepare
    report = Report(args.out)
    t_start = time.perf_counter()
    where = torch.cuda.get_device_name() if cuda else "CPU"
    report.add(f"# bench.gpu_check, {time.strftime('%Y-%m-%d %H:%M')}\n\n{where}, {cpus} cores, torch "
               f"{torch.__version__}, Python {sys.version.split()[0]}{' (small sizes)' if small else ''}\n")
    _, _, splits = prepare(os.path.join(args.dir, "corpus"), n_images)
    failures = []

    report.add("## (a) Race: device batches against workers=0 batches\n")
    report.add("| variant | mismatched batches | batches compared | slots page-locked | seconds |\n|---|---|---|---|---|")
    for name, bad, total, pinned, secs in race(splits, device, epochs=2 if small else 3, workers=workers,
                                               batch=batch, matmul=64 if small else 8192):
        report.add(f"| {name} | {bad} | {total} | {pinned} | {secs:.1f} |")
        if bad or (cuda and not pinned):
            failures.append(f"race: {name}: {bad} of {total} batches differ, pinned={pinned}")
    report.add()

    report.add("## (b) Loader to device, images/s (min / median / max of 3 rounds)\n")
    report.add(f"batch {batch}, 224 crops of 256, `for images, labels in loader: normalize(images)`\n")
    report.add("| split | workers | loader -> device | synthetic batch on the device | ratio |\n|---|---|---|---|---|")
    rows = loader_speed(splits, device, workers_list=workers_list, batch=batch, seconds=0.5 if small else 4.0,
                        rounds=3)
    for (enc, w), (real, synthetic) in rows.items():
        report.add(f"| {enc} | {w} | {spread(real)} | {spread(synthetic)} | "
                   f"{spread([r / s for r, s in zip(real, synthetic)], '{:.3f}')} |")
    report.add()

    py = sys.executable
    report.add("## (c) Benchmarks with their GPU arguments\n")
    if small:
        commands = [
            ("bench.model", [py, "-m", "bench.model", "--device", "cpu", "--batch", "2", "--steps", "1",
                             "--no-compile"]),
            ("bench.train_step", [py, "-m", "bench.train_step", "--device", "cpu", "--split", "raw", "--images",
                                  str(n_images), "--batch", "8", "--crop", "64", "--steps", "1", "--repeats", "1",
                                  "--dir", os.path.join(args.dir, "corpus")]),
            ("bench.evaluate", [py, "-m", "bench.evaluate", "--device", "cpu", "--images", "32", "--batch", "16",
                                "--dir", os.path.join(args.dir, "corpus")]),
        ]
    else:
        commands = [
            ("bench.model", [py, "-m", "bench.model", "--device", "cuda"]),
            ("bench.train_step, raw, 16 workers", [py, "-m", "bench.train_step", "--device", "cuda", "--split", "raw",
                                                   "--images", str(n_images), "--workers", "16", "--batch", "256",
                                                   "--dir", os.path.join(args.dir, "corpus")]),
            ("bench.train_step, jpeg, 16 workers", [py, "-m", "bench.train_step", "--device", "cuda", "--split",
                                                    "jpeg", "--images", str(n_images), "--workers", "16",
                                                    "--batch", "256", "--dir", os.path.join(args.dir, "corpus")]),
            ("bench.evaluate", [py, "-m", "bench.evaluate", "--device", "cuda", "--images", "2048", "--batch", "256",
                                "--workers", "16", "--dir", os.path.join(args.dir, "corpus")]),
        ]
    for title, command in commands:
        code, _ = run_command(report, title, command, timeout=600)
        if code:
            failures.append(f"{title} exited {code}")

    report.add("## (d) train.py, 3 epochs, then evaluate.py --tencrop\n")
    train, val = demo_splits(args.dir, 12 if small else 200, 4 if small else 20, 72 if small else 80)
    out_dir = os.path.join(args.dir, "run")
    common = [f"data.train={train}", f"data.val={val}", f"data.workers={workers}"]
    common += ["train.compile=true", "train.bf16=true", "train.batch_size=32"] if cuda else \
        ["train.device=cpu", "train.batch_size=16"]
    code, _ = run_command(report, "train.py", [py, "train.py", "configs/demo.yaml", f"out_dir={out_dir}", *common,
                                               "train.epochs=3", "--fresh"], timeout=600)
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            losses = [json.loads(line)["train_loss"] for line in f if line.strip()]
    except OSError:
        losses = []
    falls = len(losses) == 3 and losses[-1] < losses[0]
    report.add(f"train loss per epoch: {', '.join(f'{v:.3f}' for v in losses)}: "
               f"{'falls' if falls else 'DOES NOT FALL'}\n")
    if code or not falls:
        failures.append("train.py: " + (f"exit {code}" if code else "the loss did not fall"))
    code, _ = run_command(report, "evaluate.py --tencrop",
                          [py, "evaluate.py", "--checkpoint", os.path.join(out_dir, "last.pt"), "--data", val,
                           "--tencrop", "--workers", str(workers), "--device", device.type], timeout=300)
    if code:
        failures.append(f"evaluate.py exited {code}")

    report.add("## (e) DDP on one process (torchrun --nproc_per_node 1, train.ddp=true)\n")
    ddp_dir = os.path.join(args.dir, "run-ddp")
    ddp = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py", "configs/demo.yaml",
           f"out_dir={ddp_dir}", "train.ddp=true", *common, "train.epochs=1", "--fresh"]
    code, stdout = run_command(report, f"DDP, {'NCCL' if cuda else 'gloo'}", ddp, timeout=600)
    if code or "done:" not in stdout:
        failures.append(f"DDP run exited {code}")

    report.add(f"## Result\n\n{time.perf_counter() - t_start:.0f} s in all; "
               + ("all checks passed" if not failures else "FAILED: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
