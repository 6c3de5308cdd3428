"""What MKL's reproducibility settings cost a CPU training step: ``python -m bench.mkl_settings [--rounds 3]``.

One training step of the 64×64 model at batch 32 (forward, backward, SGD with momentum) on synthetic data, mean
of 40 steps after 5 of warm-up, each setting in a fresh process (MKL reads its environment when it loads),
rounds interleaved; min / median / max per setting and the ratio to MKL's defaults.
"""
import argparse
import os
import statistics
import subprocess
import sys

SETTINGS = {"MKL defaults": {},
            "MKL_CBWR=AUTO,STRICT MKL_DYNAMIC=FALSE (train.py's default)": {"MKL_CBWR": "AUTO,STRICT", "MKL_DYNAMIC": "FALSE"},
            "MKL_CBWR=COMPATIBLE MKL_DYNAMIC=FALSE (the tests' pin)": {"MKL_CBWR": "COMPATIBLE", "MKL_DYNAMIC": "FALSE"}}

STEP = """
import time, torch
from alexnet.model import AlexNet
torch.manual_seed(0)
m = AlexNet(10, image_size=64, init="kaiming").to(memory_format=torch.channels_last)
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(32, 3, 64, 64).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (32,))
def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
for _ in range(5):
    step()
t = time.perf_counter()
for _ in range(40):
    step()
print((time.perf_counter() - t) / 40 * 1e3)
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = {k: v for k, v in os.environ.items() if not k.startswith("MKL_")}
    ms = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            out = subprocess.run([sys.executable, "-c", STEP], cwd=root, env={**base, **env, "PYTHONPATH": root},
                                 capture_output=True, text=True, check=True).stdout
            ms[name].append(float(out))
    ref = statistics.median(ms["MKL defaults"])
    print(f"| setting, {args.rounds} rounds | ms per step, min / median / max | vs defaults |\n|---|---|---|")
    for name, v in ms.items():
        print(f"| {name} | {min(v):.0f} / {statistics.median(v):.0f} / {max(v):.0f} | "
              f"{statistics.median(v) / ref:.2f}x |")


if __name__ == "__main__":
    main()
