"""distributed.setup in process, on the CPU: torchrun's environment, and torch's process-group calls recorded
instead of made (no NCCL, no GPU, no second process)."""
import pytest
import torch

from alexnet import distributed


@pytest.fixture
def calls(monkeypatch):
    """The calls setup makes to torch.cuda.set_device and torch.distributed.init_process_group, in order, under
    the environment torchrun gives the 4th process of a node in an 8-process job."""
    made = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: made.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *args, **kwargs: made.append(("init_process_group", args, kwargs)))
    for name, value in {"RANK": "7", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    return made


def test_nccl_is_bound_to_the_local_rank_gpu(calls):
    assert distributed.setup(torch.device("cuda")) == (7, 8)
    assert calls == [("set_device", 3), ("init_process_group", ("nccl",), {"device_id": torch.device("cuda", 3)})]


def test_gloo_on_the_cpu_has_no_device(calls):
    assert distributed.setup(torch.device("cpu")) == (7, 8)
    assert calls == [("init_process_group", ("gloo",), {})]
