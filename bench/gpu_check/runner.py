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
MIN_START_S = 5.0  # a check starts only with this much of the budget left; one the deadline cuts short is skipped


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
    Step("data", "Data drawn for the check", 25, 15, 300, ("setup",)),
    Step("race", "Race: the host-to-GPU hand-off, checked batch by batch", 45, 10, 240, ("setup", "data")),
    Step("loader", "Loader to device, images/s", 40, 10, 240, ("setup", "data")),
    Step("train", "train.py: 3 epochs", 90, 20, 300, ("setup", "data")),
    Step("evaluate", "evaluate.py: centre crop, ten crops, an ensemble of one checkpoint twice", 20, 12, 180,
         ("setup", "train")),
    Step("ddp", "DDP: torchrun --nproc_per_node 1", 30, 12, 180, ("setup", "data")),
    Step("train_step", "bench.train_step: the real loader against a synthetic batch", 60, 10, 240,
         ("setup", "data")),
    Step("kill9", "kill -9 of a training process", 20, 10, 90, ("setup", "data")),
    Step("model", "bench.model", 60, 8, 300, ("setup",)),
    Step("evaluate_bench", "bench.evaluate", 20, 8, 180, ("setup", "data")),
)


def wheel_tags():
    """What a wheel's file name must say to install on this interpreter: its CPython tag, and the machine."""
    return f"cp{sys.version_info.major}{sys.version_info.minor}", platform.machine()


def _installable(tags, python, machine):
    """Whether a wheel's (python tag, abi tag, platform tag) installs here: this CPython (or a stable-ABI
    wheel for an older one, or pure Python) on glibc Linux of this machine (or any platform)."""
    py, abi, plat = (t.split(".") for t in tags)
    ours = int(python[2:])
    pythons = {t for t in py if t == python or t in ("py3", f"py{python[2]}")}
    if "abi3" in abi:
        pythons |= {t for t in py if t.startswith("cp3") and t[2:].isdigit() and int(t[2:]) <= ours}
    abis = {"none", "abi3", python}
    platform_ok = "any" in plat or any((p.startswith("manylinux") or p.startswith("linux_")) and p.endswith(machine)
                                       for p in plat)
    return bool(pythons) and bool(abis & set(abi)) and platform_ok


def matching_wheels(folder, dist):
    """The wheels of distribution ``dist`` in ``folder`` that this interpreter can install, best first (built
    for this CPython, then stable-ABI, then pure Python)."""
    python, machine = wheel_tags()
    norm = re.sub(r"[-_.]+", "_", dist).lower()
    found = []
    for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        parts = os.path.basename(path)[:-4].split("-")
        if len(parts) in (5, 6) and re.sub(r"[-_.]+", "_", parts[0]).lower() == norm and \
                _installable(parts[-3:], python, machine):
            found.append(path)
    return sorted(found, key=lambda p: (python not in os.path.basename(p).split("-")[-3], p))


def probe(env, timeout):
    """{import name: error} for the required modules that do not import in a fresh interpreter."""
    code = ("import importlib, json, sys\nbad = {}\nfor name in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(name)\n    except Exception as exc:\n"
            "        bad[name] = f'{type(exc).__name__}: {exc}'\nprint(json.dumps(bad))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, *REQUIRED], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {name: f"importing the required modules took more than {timeout:.0f} s" for name in REQUIRED}
    if proc.returncode:
        return {name: proc.stderr.strip()[-300:] for name in REQUIRED}
    return json.loads(proc.stdout)


def install(wheels, target, timeout=120):
    """Install ``wheels`` into ``target`` with pip (no index, no dependencies), or, where this Python has no
    pip, by unpacking them (all a --target install of a wheel does). Returns how; raises OSError or
    zipfile.BadZipFile for a wheel that cannot be installed."""
    os.makedirs(target, exist_ok=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
                               "--target", target, *wheels], capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return "pip install --no-index --no-deps --target"
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        why = f"pip took more than {timeout:.0f} s"
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(target)
    return f"unpacked (pip failed: {why})"


def setup(wheels_dir, target, env, timeout=120):
    """Make every required module importable: what fails is installed from ``wheels_dir`` into ``target``
    (one wheel per distribution, the best match), which goes first on the children's PYTHONPATH. Returns the
    set-up check's result; never raises."""
    t0 = time.perf_counter()
    missing = probe(env, timeout)
    lines, installed = [], []
    if missing:
        lines.append("missing at start: " + ", ".join(f"{REQUIRED[m]} ({e})" for m, e in missing.items()))
        have = [ws[0] for ws in (matching_wheels(wheels_dir, REQUIRED[m]) for m in missing) if ws]
        if have:
            try:
                how = install(have, target, timeout)
            except (OSError, zipfile.BadZipFile) as exc:
                lines.append(f"could not install {', '.join(map(os.path.basename, have))}: {type(exc).__name__}: "
                             f"{exc}")
            else:
                installed = [os.path.basename(w) for w in have]
                lines.append(f"installed into {target} ({how}): {', '.join(installed)}")
                env["PYTHONPATH"] = os.pathsep.join(p for p in (target, env.get("PYTHONPATH")) if p)
                missing = probe(env, timeout)
    status = "failed" if missing else "passed"
    if missing:
        python, machine = wheel_tags()
        for m, err in missing.items():
            if any(w.split("-")[0].lower().replace("_", "-") == REQUIRED[m] for w in installed):
                lines.append(f"{REQUIRED[m]}: installed from its wheel, and still does not import: {err}")
            else:
                lines.append(f"{REQUIRED[m]}: no wheel for {python} on {machine} Linux in {wheels_dir}: add it to "
                             f"GPU_WHEELS in the Makefile, run `make gpu-wheels` where a registry is reachable, "
                             f"and carry {wheels_dir}")
    else:
        lines.append("every required module imports" + (f" ({len(installed)} installed)" if installed else ""))
    return {"name": "setup", "title": "Set-up", "status": status, "seconds": time.perf_counter() - t0,
            "figures": {"missing": sorted(REQUIRED[m] for m in missing), "installed": installed},
            "report": "\n".join(f"- {line}" for line in lines)}


def descendants(pid):
    """Every process started from ``pid``, however deep, whatever its session (torchrun starts its workers in
    sessions of their own), read from /proc."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as f:
                    parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid):
    """SIGKILL ``pid``'s session and every process started from it, found before any is killed (a killed
    parent's children are adopted by init and could no longer be found)."""
    tree = descendants(pid)
    for target in (lambda: os.killpg(pid, signal.SIGKILL), *(lambda p=p: os.kill(p, signal.SIGKILL) for p in tree)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


class Interrupted(Exception):
    """The runner itself was asked to stop (SIGTERM, SIGINT): the running check is killed, the rest skipped."""


def run_step(step, args, env, timeout, budget_cut=False):
    """Run one check in a child process of its own session; its result, or a failure that says why.
    ``budget_cut``: ``timeout`` is what is left of the budget (less than the check's own limit), so running
    out of it is a skip."""
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
        timed_out = False
        try:
            code = proc.wait(timeout=timeout)
            why = None if code == 0 else f"exit status {code}"
        except subprocess.TimeoutExpired:
            timed_out, code = True, None
            why = f"timed out after {timeout:.0f} s (its processes were killed)"
        finally:
            kill_tree(proc.pid)  # whatever it left running: loader workers, torchrun's workers
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
    if timed_out and budget_cut:  # the overall deadline, not the check's own limit, stopped it
        result["status"], why = "skipped", f"budget: it ran out after {timeout:.0f} s (its processes were killed)"
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
        self.running = None  # the check in progress

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
        table = ["| check | status | seconds | expected |", "|---|---|---|---|"]
        table += [f"| {r['name']} | {r['status']} | {r.get('seconds', 0):.0f} | {r.get('expected_s', '')} |"
                  for r in self.results]
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
    for flag, folder in (("--out", os.path.join(args.out, "logs")), ("--work", args.work)):
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            print(f"error: {flag} {folder}: cannot write there ({exc.strerror}); choose a writable folder",
                  file=sys.stderr)
            return 2
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    reports = Reports(args.out, f"# bench.gpu_check, {time.strftime('%Y-%m-%d %H:%M %Z')}\n\n"
                                f"budget {args.budget:.0f} s; `{' '.join(['python3 -m bench.gpu_check', *(argv or sys.argv[1:])])}`")

    def interrupted(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        reports.add(setup(args.wheels, os.path.join(args.work, "pydeps"), env,
                          timeout=max(1.0, min(120.0, deadline - time.monotonic()))))
        passed = {"setup"} if reports.results[-1]["status"] == "passed" else set()
        for step in (s for s in STEPS if s.name in args.only):
            reports.add(run_check(step, args, env, deadline, passed, reports))
    except Interrupted as exc:
        code = 130 if str(exc) == "SIGINT" else 143
        done = {r["name"] for r in reports.results}
        for step in (s for s in STEPS if s.name in args.only and s.name not in done):
            reports.results.append({"name": step.name, "title": step.title, "seconds": 0.0,
                                    "status": "failed" if step.name == reports.running else "skipped",
                                    "why": f"the check was stopped by {exc}" + (" while this ran (its processes "
                                           "were killed)" if step.name == reports.running else "")})
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    counts = reports.summary()
    final = (f"{time.monotonic() - t_start:.0f} s of a {args.budget:.0f} s budget; {counts['passed']} passed, "
             f"{counts['failed']} failed, {counts['skipped']} skipped"
             + (": " + ", ".join(r["name"] for r in reports.results if r["status"] == "failed")
                if counts["failed"] else ""))
    reports.write(final)
    print(f"## Result\n\n{final}\nreports: {os.path.join(args.out, 'report.md')}, "
          f"{os.path.join(args.out, 'report.json')}", flush=True)
    return code or (1 if counts["failed"] else 0)


def run_check(step, args, env, deadline, passed, reports):
    """One check's result: skipped when what it needs did not pass or the budget is spent, else run."""
    left = deadline - time.monotonic()
    missing = [n for n in step.needs if n not in passed]
    if missing:
        result = {"status": "skipped", "why": f"needs {', '.join(missing)}, which did not pass"}
    elif left < MIN_START_S:
        result = {"status": "skipped", "why": f"budget: {max(left, 0):.0f} s left"}
    else:
        reports.running = step.name
        result = run_step(step, args, env, timeout=min(step.limit_s, left), budget_cut=left < step.limit_s)
        reports.running = None
    result = {"name": step.name, "title": step.title, "seconds": 0.0, **result,
              "expected_s": step.cpu_s if args.small or not passed_cuda(reports) else step.gpu_s}
    if step.name == "versions" and result["status"] == "passed":
        reports.header += "\n\n" + result["report"]
        result = {**result, "report": ""}
    if result["status"] == "passed":
        passed.add(step.name)
    return result


def passed_cuda(reports):
    """Whether the versions check found a CUDA device (the GPU's expected times apply)."""
    for r in reports.results:
        if r["name"] == "versions":
            return bool(r.get("figures", {}).get("cuda"))
    return False
