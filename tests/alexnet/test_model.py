"""The network against the paper: shapes per stage, parameter counts, LRN's formula, initial statistics."""
import numpy as np
import pytest
import torch
from torch import nn

from alexnet.model import AlexNet, _LRNFunction, lrn, lrn_formula
from alexnet.summary import layer_table

PAPER_224 = {  # Sec. 3 / Fig. 2: output of each stage at 224×224
    "conv1": (96, 55, 55), "pool1": (96, 27, 27), "conv2": (256, 27, 27), "pool2": (256, 13, 13),
    "conv3": (384, 13, 13), "conv4": (384, 13, 13), "conv5": (256, 13, 13), "pool5": (256, 6, 6),
    "fc6": (4096,), "fc7": (4096,), "fc8": (1000,),
}


def shapes(model, size):
    return {name.split(".")[-1]: shape for name, shape, _, _ in layer_table(model, size)}


def test_stage_shapes_at_224_match_the_paper():
    got = shapes(AlexNet(groups=2), 224)
    for name, shape in PAPER_224.items():
        assert got[name] == shape, name


def test_stage_shapes_at_64():
    got = shapes(AlexNet(10, image_size=64), 64)
    assert got["conv1"] == (96, 15, 15) and got["pool1"] == (96, 7, 7) and got["pool2"] == (256, 3, 3)
    assert got["pool5"] == (256, 1, 1) and got["fc8"] == (10,)
    assert AlexNet(10, image_size=64).classifier.fc6.in_features == 256


def test_parameter_counts_from_the_paper():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(AlexNet(groups=2)) == 60_965_224
    assert count(AlexNet(groups=1)) == 62_378_344


def test_multiply_adds_with_two_groups():
    total = sum(r[3] for r in layer_table(AlexNet(groups=2), 224))
    assert abs(total / 1e9 - 0.724) < 0.01


def test_too_small_input_names_the_smallest_that_works():
    AlexNet(image_size=63)
    with pytest.raises(ValueError, match="smallest that works is 63"):
        AlexNet(image_size=62)
    with pytest.raises(ValueError, match="smallest that works is 63"):
        AlexNet(image_size=32)


def lrn_by_the_formula(a, n=5, k=2.0, alpha=1e-4, beta=0.75):
    """b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta, written out per channel."""
    a = a.astype(np.float64)
    out = np.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi + 1] ** 2).sum(axis=1)) ** beta
    return out


def test_lrn_is_the_papers_formula_including_the_edge_channels(rng):
    a = rng.uniform(0, 60, (2, 9, 4, 3)).astype(np.float32)  # large enough that the sum matters
    expected = lrn_by_the_formula(a)
    got = lrn(torch.from_numpy(a)).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(lrn_formula(torch.from_numpy(a)).double().numpy(), expected, rtol=1e-5)
    torch_lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)  # alpha × n, as the reference notes
    np.testing.assert_allclose(torch_lrn(torch.from_numpy(a)).numpy(), got, rtol=1e-4)


def test_lrn_hand_written_backward(rng):
    a = torch.from_numpy(rng.uniform(0, 60, (2, 7, 3, 3))).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _LRNFunction.apply(t, 5, 1e-4, 0.75, 2.0), (a,))
    for beta in (0.75, 0.5):
        x1, x2 = a.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
        g = torch.randn(2, 7, 3, 3, dtype=torch.float64)
        _LRNFunction.apply(x1, 5, 1e-3, beta, 2.0).backward(g)
        lrn_formula(x2, 5, 1e-3, beta, 2.0).backward(g)  # autograd of the plain formula
        torch.testing.assert_close(x1.grad, x2.grad)


def test_lrn_runs_in_float32_under_autocast(rng):
    a = torch.from_numpy(rng.uniform(0, 60, (2, 96, 5, 5)).astype(np.float32))
    ref = lrn(a)
    model_lrn = AlexNet().features.norm1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model_lrn(a.bfloat16())
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().numpy(), ref.numpy(), rtol=2e-2)  # only the bf16 rounding of in/out


def test_paper_init_statistics():
    torch.manual_seed(0)
    model = AlexNet(groups=2)
    layers = {**dict(model.features.named_children()), **dict(model.classifier.named_children())}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        w, b = layers[name].weight, layers[name].bias
        assert abs(w.std().item() - 0.01) < 0.001 and abs(w.mean().item()) < 0.001, name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(b == expected_bias), name


def test_kaiming_init_statistics():
    torch.manual_seed(0)
    model = AlexNet(10, image_size=64, init="kaiming")
    conv3 = model.features.conv3
    fan_in = conv3.in_channels * 9
    assert abs(conv3.weight.std().item() - np.sqrt(2 / fan_in)) < 0.002
    assert torch.all(conv3.bias == 0) and torch.all(model.classifier.fc6.bias == 0)


def test_eval_is_deterministic_and_train_drops_half():
    torch.manual_seed(0)
    model = AlexNet(10, image_size=64, init="kaiming")
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    assert torch.equal(model(x), model(x))
    drop = model.classifier.drop6.train()
    h = torch.ones(200, 4096)
    out = drop(h)
    assert abs((out == 0).float().mean().item() - 0.5) < 0.01
    assert torch.all((out == 0) | (out == 2.0)), "inverted dropout: survivors scaled by 1/(1-p)"


def test_compiles_without_graph_breaks():
    model = AlexNet(10, image_size=64, init="kaiming")
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    model = AlexNet(10, image_size=64, init="kaiming").eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_summary_command_prints_the_totals():
    from tests.conftest import run_cli
    out = run_cli("alexnet.summary", "--groups", "2").stdout
    assert "60,965,224" in out and "0.724 G multiply-adds" in out and "256x6x6" in out
