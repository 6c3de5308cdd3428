"""alexnet.checkpoint's per-rank random streams, CUDA included: no GPU here, so torch.cuda's generator calls are
replaced by a recorder of which state each rank's device ends with."""
import pytest
import torch

from alexnet import checkpoint


def fake_cuda(monkeypatch, devices=1):
    """A node with ``devices`` GPUs; returns {device index: the state its generator was last given}."""
    device_state = {}

    def set_rng_state(state, device=0):
        index = torch.device("cuda", device).index if isinstance(device, int) else device.index
        assert index < devices, f"cuda:{index} does not exist on this node"
        device_state[index] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [set_rng_state(s, i) for i, s in enumerate(states)])
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: device_state.update({0: seed}))
    return device_state


def saved_states(world_size):
    """A checkpoint's rng entry as ``world_size`` ranks write it: rank 0's views plus every rank's own state."""
    gens = [torch.Generator().manual_seed(100 + r) for r in range(world_size)]
    cuda = [torch.full((16,), r, dtype=torch.uint8) for r in range(world_size)]
    state = checkpoint.rng_state()  # its "cuda": rank 0's view of every GPU of its node (here: 8)
    return state | {"cuda": [cuda[0]] * 8, "torch_ranks": [g.get_state() for g in gens], "cuda_ranks": cuda}, gens, cuda


def test_each_rank_restores_its_own_cpu_and_cuda_streams_on_a_node_with_fewer_gpus(monkeypatch):
    """Saved on a node of 8 GPUs, resumed on nodes of 1 GPU (a requeue gets what the cluster has)."""
    device_state = fake_cuda(monkeypatch, devices=1)
    state, gens, cuda = saved_states(3)
    for rank in range(3):
        checkpoint.set_rng_state(state, rank, torch.device("cuda", 0))
        assert torch.equal(device_state[0], cuda[rank]), "the CUDA stream of this rank, not rank 0's"
        assert torch.equal(torch.rand(8), torch.rand(8, generator=gens[rank]))


def test_ranks_that_did_not_exist_get_streams_of_their_own_the_same_on_every_restart(monkeypatch):
    device_state = fake_cuda(monkeypatch)
    state, _, cuda = saved_states(1)
    draws, seeds = [], []
    for rank in (0, 1, 2, 1):
        checkpoint.set_rng_state(state, rank, torch.device("cuda", 0))
        draws.append(torch.rand(8))
        seeds.append(device_state[0])
    assert torch.equal(seeds[0], cuda[0]) and isinstance(seeds[1], int) and seeds[1] != seeds[2]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[1], draws[3]) and seeds[1] == seeds[3], "a restart gives rank 1 the same stream"


@pytest.mark.parametrize("content", [b"", b"\x00", b"PK\x03\x04 cut"])
def test_an_empty_or_cut_checkpoint_is_one_error_naming_it(tmp_path, content):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=r"last.pt: not a readable checkpoint \(truncated"):
        checkpoint.load(path)
