"""The check's driver: set-up, the budget, one process per check, and the two reports.

It imports nothing beyond the standard library, so it runs (and reports) on a machine where torch, lmdb or
OpenCV is missing or broken: every check runs in a child process (``python3 -m bench.gpu_check.steps``)
in a session of its own, so a check that hangs or overruns is killed with all its processes (loader
workers, torchrun's children) and the next one starts on a clean GPU.
"""
import argparse
import dataclasses
import glob
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# import name -> distribution name, for what the project needs at run time
REQUIRED = {"numpy": "numpy", "torch": "torch", "lmdb": "lmdb", "msgpack": "msgpack", "zlib_ng": "zlib-ng",
            "cv2": "opencv-python-headless", "h5py": "h5py", "yaml": "pyyaml", "tqdm": "tqdm", "PIL": "pillow"}
RESERVE_S = 3.0  # kept back from the budget to write the reports


@dataclasses.dataclass(frozen=True)
class Step:
    """A check: its name (``steps.py``'s function), what it needs to have passed, the seconds it is expected
    to take on one H200 with 16 cores and on 2 CPU cores at small sizes, and its own time limit."""
    name: str
    title: str
    gpu_s: int
    cpu_s: int
    limit_s: int
    needs: tuple = ()


# In order of importance: what the budget cannot reach is the least important.
STEPS = (
    Step("versions", "Versions", 10, 5, 60),
    Step("data", "Data drawn for the check", 40, 15, 300),
    Step("race", "Race: the host-to-GPU hand-off, checked batch by batch", 60, 10, 240, ("data",)),
    Step("loader", "Loader to device, images/s", 60, 10, 240, ("data",)),
    Step("train", "train.py: 3 epochs", 120, 20, 300, ("data",)),
    Step("evaluate", "evaluate.py: centre crop, ten crops, an ensemble of one checkpoint twice", 30, 15, 180,
         ("train",)),
    Step("ddp", "DDP: torchrun --nproc_per_node 1", 45, 15, 180, ("data",)),
    Step("train_step", "bench.train_step: the real loader against a synthetic batch", 75, 10, 240, ("data",)),
    Step("kill9", "kill -9 of a training process", 25, 12, 90, ("data",)),
    Step("model", "bench.model", 90, 8, 300),
    Step("evaluate_bench", "bench.evaluate", 30, 8, 180, ("data",)),
)


def wheel_tags():
    """What a wheel's file name must say to install on this interpreter: its CPython tag, and the machine."""
    return f"cp{sys.version_info.major}{sys.version_info.minor}", platform.machine()


def matching_wheels(folder, dist):
    """The wheels of distribution ``dist`` in ``folder`` that this interpreter can install."""
    python, machine = wheel_tags()
    norm = re.sub(r"[-_.]+", "_", dist).lower()
    found = []
    for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        parts = os.path.basename(path)[:-4].split("-")
        if len(parts) < 5 or re.sub(r"[-_.]+", "_", parts[0]).lower() != norm:
            continue
        py, abi, plat = parts[-3:]
        if (python in py.split(".") or "py3" in py.split(".")) and \
                (abi in ("none", "abi3") or python in abi.split(".")) and (plat == "any" or machine in plat):
            found.append(path)
    return found


def probe(env):
    """{import name: error} for the required modules that do not import in a fresh interpreter."""
    code = ("import importlib, json, sys\nbad = {}\nfor name in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(name)\n    except Exception as exc:\n"
            "        bad[name] = f'{type(exc).__name__}: {exc}'\nprint(json.dumps(bad))")
    proc = subprocess.run([sys.executable, "-c", code, *REQUIRED], capture_output=True, text=True, env=env,
                          timeout=120)
    if proc.returncode:
        return {name: proc.stderr.strip()[-300:] for name in REQUIRED}
    return json.loads(proc.stdout)


def install(wheels, target):
    """Install ``wheels`` into ``target`` with pip (no index, no dependencies), or, where this Python has no
    pip, by unpacking them (all a --target install of a wheel does). Returns how."""
    os.makedirs(target, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
                           "--target", target, *wheels], capture_output=True, text=True)
    if proc.returncode == 0:
        return "pip install --no-index --no-deps --target"
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(target)
    return f"unpacked (pip failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})"


def setup(wheels_dir, target, env):
    """Make every required module importable: what fails is installed from ``wheels_dir`` into ``target``,
    which goes first on the children's PYTHONPATH. Returns the set-up check's result."""
    t0 = time.perf_counter()
    missing = probe(env)
    lines, installed = [], []
    if missing:
        lines.append("missing at start: " + ", ".join(f"{REQUIRED[m]} ({e})" for m, e in missing.items()))
        wheels = {m: matching_wheels(wheels_dir, REQUIRED[m]) for m in missing}
        have = [w for ws in wheels.values() for w in ws]
        if have:
            how = install(have, target)
            installed = [os.path.basename(w) for w in have]
            lines.append(f"installed into {target} ({how}): {', '.join(installed)}")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (target, env.get("PYTHONPATH")) if p)
            missing = probe(env)
    status = "failed" if missing else "passed"
    if missing:
        python, machine = wheel_tags()
        lines.append(f"still missing: {', '.join(REQUIRED[m] for m in missing)}; no wheel for {python} on {machine} "
                     f"in {wheels_dir}: run `make gpu-wheels` where a registry is reachable and carry {wheels_dir}")
    else:
        lines.append("every required module imports" + (f" ({len(installed)} installed)" if installed else ""))
    return {"name": "setup", "title": "Set-up", "status": status, "seconds": time.perf_counter() - t0,
            "figures": {"missing": sorted(REQUIRED[m] for m in missing), "installed": installed},
            "report": "\n".join(f"- {line}" for line in lines)}


def run_step(step, args, env, timeout):
    """Run one check in a child process of its own session; its result, or a failure that says why."""
    log = os.path.join(args.out, "logs", f"{step.name}.log")
    result_path = os.path.join(args.out, "logs", f"{step.name}.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    cmd = [sys.executable, "-m", "bench.gpu_check.steps", step.name, "--work", args.work, "--result", result_path]
    cmd += ["--small"] if args.small else []
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            why = None if code == 0 else f"exit status {code}"
        except subprocess.TimeoutExpired:
            why = f"timed out after {timeout:.0f} s (its processes were killed)"
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what it left running (workers, torchrun's children)
            except ProcessLookupError:
                pass
            proc.wait()
    seconds = time.perf_counter() - t0
    try:
        with open(result_path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {"status": "failed", "figures": {}, "report": ""}
        why = why or "it wrote no result"
    if why and result.get("status") != "failed":
        result["status"] = "failed"
    if why:
        result["why"] = "; ".join(w for w in (why, result.get("why")) if w)
        with open(log, encoding="utf-8", errors="replace") as f:
            result["log_tail"] = f.read()[-3000:]
    return {"name": step.name, "title": step.title, **result, "seconds": seconds,
            "log": os.path.relpath(log, args.out)}


class Reports:
    """``report.md`` and ``report.json`` in the output folder, rewritten (atomically) after every check."""

    def __init__(self, out, header):
        self.out, self.header, self.results = out, header, []

    def add(self, result):
        self.results.append(result)
        self.write()
        print(self.markdown_of(result), flush=True)

    @staticmethod
    def markdown_of(r):
        head = f"## {r['title']}: {r['status'].upper()}" + (f" ({r['seconds']:.0f} s)" if r.get("seconds") else "")
        parts = [head, ""]
        if r.get("why"):
            parts += [f"**{r['why']}**", ""]
        if r.get("report"):
            parts += [r["report"].rstrip(), ""]
        if r.get("log_tail"):
            parts += [f"last lines of {r.get('log', 'its log')}:", "", "```", r["log_tail"].rstrip()[-1500:], "```", ""]
        return "\n".join(parts)

    def summary(self):
        counts = {s: sum(r["status"] == s for r in self.results) for s in ("passed", "failed", "skipped")}
        return counts

    def write(self, final=None):
        counts = self.summary()
        table = ["| check | status | seconds |", "|---|---|---|"]
        table += [f"| {r['name']} | {r['status']} | {r.get('seconds', 0):.0f} |" for r in self.results]
        text = "\n".join([self.header, "", *table, "", *(self.markdown_of(r) for r in self.results)])
        if final:
            text += f"\n## Result\n\n{final}\n"
        doc = {"header": self.header, "counts": counts, "result": final, "checks": self.results}
        for name, content in (("report.md", text), ("report.json", json.dumps(doc, indent=1))):
            path = os.path.join(self.out, name)
            fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(content + "\n")
            os.replace(tmp, path)


def parse(argv):
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=420, help="seconds for the whole check (default 420)")
    p.add_argument("--out", default="gpu_check", help="folder for report.md, report.json and logs/")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "alexnet-gpu-check"),
                   help="folder for the drawn data and runs (reused by a second call)")
    p.add_argument("--wheels", default=os.path.join(ROOT, ".wheels"), help="wheels for what the machine lacks")
    p.add_argument("--small", action="store_true", help="CPU sizes even where CUDA is present")
    p.add_argument("--only", help="comma-separated checks to run (default: all, in order)")
    args = p.parse_args(argv)
    names = [s.name for s in STEPS]
    args.only = args.only.split(",") if args.only else names
    unknown = [n for n in args.only if n not in names]
    if unknown:
        p.error(f"--only: unknown check(s) {', '.join(unknown)}; the checks are {', '.join(names)}")
    if args.budget <= RESERVE_S:
        p.error(f"--budget {args.budget:g}: must be more than {RESERVE_S:g} seconds")
    return args


def main(argv=None):
    args = parse(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget - RESERVE_S
    args.out, args.work = os.path.abspath(args.out), os.path.abspath(args.work)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    reports = Reports(args.out, f"# bench.gpu_check, {time.strftime('%Y-%m-%d %H:%M %Z')}\n\n"
                                f"budget {args.budget:.0f} s; `{' '.join(['python3 -m bench.gpu_check', *(argv or sys.argv[1:])])}`")
    reports.add(setup(args.wheels, os.path.join(args.work, "pydeps"), env))
    passed = {"setup"} if reports.results[-1]["status"] == "passed" else set()
    for step in STEPS:
        if step.name not in args.only:
            continue
        left = deadline - time.monotonic()
        expected = step.cpu_s if args.small or not passed_cuda(reports) else step.gpu_s
        missing = [n for n in ("setup", *step.needs) if n not in passed]
        if missing:
            result = {"status": "skipped", "why": f"needs {', '.join(missing)}, which did not pass"}
        elif left < expected:
            result = {"status": "skipped", "why": f"budget: {max(left, 0):.0f} s left, it expects {expected} s"}
        else:
            result = run_step(step, args, env, timeout=min(step.limit_s, left))
        result = {"name": step.name, "title": step.title, "seconds": 0.0, **result}
        if step.name == "versions" and result["status"] == "passed":
            reports.header += "\n\n" + result["report"]
            result = {**result, "report": ""}
        reports.add(result)
        if result["status"] == "passed":
            passed.add(step.name)
    counts = reports.summary()
    final = (f"{time.monotonic() - t_start:.0f} s of a {args.budget:.0f} s budget; {counts['passed']} passed, "
             f"{counts['failed']} failed, {counts['skipped']} skipped"
             + (": " + ", ".join(r["name"] for r in reports.results if r["status"] == "failed")
                if counts["failed"] else ""))
    reports.write(final)
    print(f"## Result\n\n{final}\nreports: {os.path.join(args.out, 'report.md')}, "
          f"{os.path.join(args.out, 'report.json')}", flush=True)
    return 1 if counts["failed"] else 0


def passed_cuda(reports):
    """Whether the versions check found a CUDA device (the GPU's expected times apply)."""
    for r in reports.results:
        if r["name"] == "versions":
            return bool(r.get("figures", {}).get("cuda"))
    return False
