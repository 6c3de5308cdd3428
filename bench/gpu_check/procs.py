"""Processes and GPU memory seen from outside, for the kill -9 check: children by /proc, GPU memory by
cudaMemGetInfo (every process's use of the device), and nvidia-smi's list of processes where it is there."""
import os
import subprocess
import time


def children(pid):
    """The live child processes of ``pid``."""
    kids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat and stat[1] == pid and stat[0] != "Z":
                kids.add(int(name))
    return kids


def _stat(pid):
    """(state, parent pid) of ``pid``, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid):
    """Running: a zombie (dead, not yet reaped by whoever adopted it) holds no memory and counts as gone."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def wait_for_children(pid, count, timeout):
    """The children of ``pid`` once there are at least ``count`` of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = children(pid)
        if len(kids) >= count:
            return kids
        if not alive(pid):
            raise RuntimeError(f"the trainer (pid {pid}) exited before its {count} loader workers started")
        time.sleep(0.1)
    raise RuntimeError(f"the trainer (pid {pid}) did not start {count} loader workers within {timeout} s")


def wait_gone(pids, timeout):
    """The pids still alive after waiting up to ``timeout`` seconds for all to end."""
    deadline = time.monotonic() + timeout
    left = {p for p in pids if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {p for p in left if alive(p)}
    return left


def gpu_pids():
    """The pids nvidia-smi lists as holding GPU memory; None without nvidia-smi (in a container it may also
    list none: the host's pids)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {int(p) for p in out.split() if p.isdigit()}


def gpu_memory_used():
    """MiB in use on this process's CUDA device, by every process (cudaMemGetInfo: no nvidia-smi needed, and
    CUDA_VISIBLE_DEVICES is respected)."""
    import torch
    free, total = torch.cuda.mem_get_info()
    return (total - free) >> 20


def wait_gpu_memory(at_most, timeout):
    """(MiB used, seconds waited) once the device uses at most ``at_most`` MiB, or when ``timeout`` runs out."""
    t0 = time.monotonic()
    used = gpu_memory_used()
    while used > at_most and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
        used = gpu_memory_used()
    return used, time.monotonic() - t0
