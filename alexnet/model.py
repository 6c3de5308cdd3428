"""AlexNet exactly as in the paper (Krizhevsky, Sutskever, Hinton 2012, Sec. 3, Fig. 2).

Read top to bottom like the paper's table. Choices a reader could doubt:
- Input 224×224 with padding 2 in conv1 gives the paper's 55×55 maps (the often-quoted 227 input with no
  padding gives the same; the paper's "224" and its 55 only agree with this padding).
- ``groups=2`` reproduces the two-GPU connectivity: conv2, conv4 and conv5 see only the maps on their own
  GPU (60,965,224 parameters at 1000 classes); ``groups=1`` is one tower (62,378,344), the default.
- LRN is the paper's formula (Sec. 3.3): b = a / (k + α Σ a²)^β over n=5 neighbouring channels, k=2,
  α=1e-4, β=0.75, α *not* divided by n (``torch.nn.LocalResponseNorm`` and Caffe divide it by n, five
  times too weak). It follows the ReLU of conv1 and conv2, before pooling; it runs in float32 under
  autocast.
- Overlapping max pooling, 3×3 windows, stride 2.
- Dropout 0.5 on the outputs of fc6 and fc7. PyTorch's inverted dropout scales by 2 while training instead
  of the paper's ×0.5 at test time: the same expected activations, nothing to do at test.
- ``image_size`` sets the flatten size: 224 → 256×6×6; 64 → 256×1×1 (the 64×64 mode for CIFAR-sized data);
  below 63 the maps vanish.
- ``init="paper"``: weights N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7 (ReLUs start
  positive), 0 elsewhere (Sec. 5). ``init="kaiming"``: He-normal weights and zero biases, which start far
  faster on small data from scratch when inputs are standardised (``data.std``).
"""
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

INITS = ("paper", "kaiming")


def lrn_formula(x, size=5, alpha=1e-4, beta=0.75, k=2.0):
    """The paper's formula in plain tensor operations: what ``torch.compile`` fuses into one kernel."""
    sq = F.pad(x * x, (0, 0, 0, 0, size // 2, (size - 1) // 2))  # zero channels beyond both edges
    c = x.shape[1]
    window = sq[:, 0:c]
    for j in range(1, size):
        window = window + sq[:, j:j + c]
    return x * (k + alpha * window).pow(-beta)


def _window_sum(a, size):
    """Each channel's sum over its window of ``size`` channels (zeros beyond the edges): one new tensor."""
    w = a.clone()
    c = a.shape[1]
    for off in range(1, size // 2 + 1):
        w[:, off:] += a[:, :c - off]
        w[:, :c - off] += a[:, off:]
    return w


class _LRNFunction(torch.autograd.Function):
    """Eager LRN with a hand-written backward, in place where it can be: autograd of the plain formula
    makes ~25 full-size temporaries per call, and on the CPU each costs more in page faults than in
    arithmetic (4× slower, measured in docs/BENCHMARKS.md).

    With d = k + α·Σ_window a² and b = a·d^-β:  ∂L/∂a = g·d^-β − 2αβ·a·Σ_window(g·b/d)."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        d = _window_sum(x * x, size).mul_(alpha).add_(k)
        s = torch.sqrt(d).rsqrt_().mul_(torch.rsqrt(d)) if beta == 0.75 else d.pow(-beta)
        ctx.save_for_backward(x, d, s)
        ctx.constants = size, alpha, beta
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, d, s = ctx.saved_tensors
        size, alpha, beta = ctx.constants
        t = (g * x).mul_(s).div_(d)
        grad = (g * s).addcmul_(x, _window_sum(t, size), value=-2 * alpha * beta)
        return grad, None, None, None, None


def lrn(x, size=5, alpha=1e-4, beta=0.75, k=2.0):
    """Local response normalisation across channels, the paper's formula (alpha not divided by size),
    computed in float32 whatever the input dtype."""
    dtype = x.dtype
    x = x.float()
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # exports record the formula, not a Python call
        out = lrn_formula(x, size, alpha, beta, k)
    else:
        out = _LRNFunction.apply(x, size, alpha, beta, k)
    return out.to(dtype)


class LRN(nn.Module):
    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=2.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x):
        if not torch.is_autocast_enabled(x.device.type):  # no autocast region: torch 2.4's export cannot hold one
            return lrn(x, self.size, self.alpha, self.beta, self.k)
        with torch.autocast(x.device.type, enabled=False):
            return lrn(x, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self):
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


def feature_size(image_size):
    """Side of the last pooled map: conv1 (11, stride 4, pad 2), then three 3/2 poolings."""
    n = (image_size + 4 - 11) // 4 + 1
    for _ in range(3):
        n = (n - 3) // 2 + 1 if n >= 3 else 0
    return n


class AlexNet(nn.Module):
    def __init__(self, num_classes=1000, *, image_size=224, groups=1, lrn=True, dropout=0.5, init="paper"):
        super().__init__()
        side = feature_size(image_size)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small: the feature maps vanish after the third "
                             f"pooling; the smallest that works is 63 (the 64×64 mode)")
        if init not in INITS:
            raise ValueError(f"init={init!r}: one of {', '.join(INITS)}")
        norm = LRN if lrn else nn.Identity
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 96, 11, stride=4, padding=2)), ("relu1", nn.ReLU(inplace=True)),
            ("norm1", norm()), ("pool1", nn.MaxPool2d(3, 2)),
            ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=groups)), ("relu2", nn.ReLU(inplace=True)),
            ("norm2", norm()), ("pool2", nn.MaxPool2d(3, 2)),
            ("conv3", nn.Conv2d(256, 384, 3, padding=1)), ("relu3", nn.ReLU(inplace=True)),
            ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=groups)), ("relu4", nn.ReLU(inplace=True)),
            ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=groups)), ("relu5", nn.ReLU(inplace=True)),
            ("pool5", nn.MaxPool2d(3, 2)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc6", nn.Linear(256 * side * side, 4096)), ("relu6", nn.ReLU(inplace=True)), ("drop6", nn.Dropout(dropout)),
            ("fc7", nn.Linear(4096, 4096)), ("relu7", nn.ReLU(inplace=True)), ("drop7", nn.Dropout(dropout)),
            ("fc8", nn.Linear(4096, num_classes)),
        ]))
        self.image_size, self.groups = image_size, groups
        self.reset_parameters(init)

    def reset_parameters(self, init="paper"):
        ones = {"conv2", "conv4", "conv5", "fc6", "fc7"} if init == "paper" else set()
        for name, m in [*self.features.named_children(), *self.classifier.named_children()]:
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            if init == "paper" or name == "fc8":
                nn.init.normal_(m.weight, 0.0, 0.01)
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.constant_(m.bias, 1.0 if name in ones else 0.0)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))
