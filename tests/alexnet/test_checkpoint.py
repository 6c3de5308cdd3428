"""alexnet.checkpoint's per-rank random streams, CUDA included: no GPU here, so torch.cuda's generator calls are
replaced by a recorder of which state each rank's device ends with."""
import torch

from alexnet import checkpoint


def fake_cuda(monkeypatch):
    device_state = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: device_state.update(state=states[0]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: device_state.update(state=state))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: device_state.update(state=seed))
    return device_state


def saved_states(world_size):
    """A checkpoint's rng entry as ``world_size`` ranks write it: rank 0's views plus every rank's own state."""
    gens = [torch.Generator().manual_seed(100 + r) for r in range(world_size)]
    cuda = [torch.full((16,), r, dtype=torch.uint8) for r in range(world_size)]
    state = checkpoint.rng_state()
    return state | {"cuda": [cuda[0]], "torch_ranks": [g.get_state() for g in gens], "cuda_ranks": cuda}, gens, cuda


def test_each_rank_restores_its_own_cpu_and_cuda_streams(monkeypatch):
    device_state = fake_cuda(monkeypatch)
    state, gens, cuda = saved_states(3)
    for rank in range(3):
        checkpoint.set_rng_state(state, rank, torch.device("cuda", 0))
        assert torch.equal(device_state["state"], cuda[rank]), "the CUDA stream of this rank, not rank 0's"
        assert torch.equal(torch.rand(8), torch.rand(8, generator=gens[rank]))


def test_ranks_that_did_not_exist_get_streams_of_their_own_the_same_on_every_restart(monkeypatch):
    device_state = fake_cuda(monkeypatch)
    state, _, cuda = saved_states(1)
    draws, seeds = [], []
    for rank in (0, 1, 2, 1):
        checkpoint.set_rng_state(state, rank, torch.device("cuda", 0))
        draws.append(torch.rand(8))
        seeds.append(device_state["state"])
    assert torch.equal(seeds[0], cuda[0]) and isinstance(seeds[1], int) and seeds[1] != seeds[2]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[1], draws[3]) and seeds[1] == seeds[3], "a restart gives rank 1 the same stream"
