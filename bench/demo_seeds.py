"""How robust is the demo? ``python -m bench.demo_seeds [--seeds 5] [--config configs/demo.yaml]``.

Packs the demo data as ``make demo`` does (reusing ``demo/images`` and the packed splits when present), then
trains ``configs/demo.yaml`` once per training seed, each run from scratch in ``runs/demo-seed-K``, and prints
every run's val top-1 at its last epoch, its best, and its training time, then the worst / median / best over
seeds: the figures the README quotes for the demo. A seed stands for the run-to-run variation a newcomer meets
(another CPU, another thread count: small-data training from scratch is chaotic).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*args):
    subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, check=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--demo", default="demo", help="the demo folder (make demo's DEMO)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. train.epochs=20")
    args = p.parse_args(argv)
    demo = os.path.join(ROOT, args.demo)
    if not os.path.exists(os.path.join(demo, "images", ".done")):
        sh("-m", "preprocess.make_demo", os.path.join(demo, "images"))
        open(os.path.join(demo, "images", ".done"), "w").close()
    for split, extra in (("train", []), ("val", ["--classes-from", os.path.join(demo, "train")])):
        if not os.path.exists(os.path.join(demo, split, "meta.json")):
            sh("-m", "preprocess.build_lmdb", os.path.join(demo, "images", split), os.path.join(demo, split),
               "--size", 80, "--quiet", *extra)
    rows = []
    for seed in range(args.seeds):
        out = os.path.join(ROOT, "runs", f"demo-seed-{seed}")
        t0 = time.perf_counter()
        sh("train.py", args.config, f"data.train={demo}/train", f"data.val={demo}/val", f"out_dir={out}",
           f"seed={seed}", *args.overrides, "--fresh")
        seconds = time.perf_counter() - t0
        with open(os.path.join(out, "metrics.jsonl")) as f:
            epochs = [r for r in map(json.loads, f) if "val_top1" in r]
        last, best = epochs[-1]["val_top1"], max(r["val_top1"] for r in epochs)
        rows.append((seed, last, best, seconds))
        print(f"seed {seed}: last epoch {100 * last:.1f}%, best {100 * best:.1f}%, {seconds:.0f} s", flush=True)
    lasts = [r[1] for r in rows]
    print(f"\n| {args.config} {' '.join(args.overrides)}, {len(rows)} seeds | worst | median | best |\n|---|---|---|---|")
    print(f"| val top-1 at the last epoch | {100 * min(lasts):.1f}% | {100 * statistics.median(lasts):.1f}% | "
          f"{100 * max(lasts):.1f}% |")
    print(f"| training time, s | {min(r[3] for r in rows):.0f} | {statistics.median(r[3] for r in rows):.0f} | "
          f"{max(r[3] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
