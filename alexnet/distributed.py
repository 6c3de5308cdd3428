"""One process or many (torchrun): rank, world size, the process group, and all-reduce of metrics."""
import os

import torch
import torch.distributed as dist


def setup(device, force=False):
    """(rank, world_size), joining the process group when torchrun started more than one process (or started
    us at all, with ``force``): NCCL on CUDA, bound to this rank's GPU (so its barriers and collectives need not
    guess the device), gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1 and not (force and "RANK" in os.environ):
        return 0, 1
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return rank, world_size


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flags, device):
    """For each boolean, whether it is true on any rank (one all-reduce; no communication on one process)."""
    if world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_sum(values, device):
    """Sum a list of numbers over all ranks (identity on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def gather(tensor, device):
    """Every rank's copy of ``tensor`` (same shape on all ranks), as a list of CPU tensors."""
    if not (dist.is_available() and dist.is_initialized()):
        return [tensor.cpu()]
    t = tensor.to(device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def gather_dicts(numbers, device):
    """Every rank's dict of numbers (same keys on all ranks), as a list indexed by rank, on every rank."""
    keys = sorted(numbers)
    rows = gather(torch.tensor([float(numbers[k]) for k in keys], dtype=torch.float64), device)
    return [dict(zip(keys, row.tolist())) for row in rows]


def same_on_all_ranks(model):
    """True when every rank holds bit-identical parameters (a checksum of each, compared across ranks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])  # on the NCCL or gloo device
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)
