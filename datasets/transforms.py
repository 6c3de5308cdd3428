"""What happens to a uint8 batch on the model's device: the paper's colour shift, mean subtraction, ten crops.

Train and eval transforms side by side: ``Normalize`` in training mode adds ``pca_lighting``; in eval mode
it only subtracts the mean. ``ten_crop`` is the paper's test-time view (Sec. 4.1).
"""
import numpy as np
import torch
from torch import nn

MEANS = ("rgb", "image")


def pca_lighting(batch_size, eigval, eigvec, pca_std, *, device=None, generator=None):
    """The paper's colour shift (Sec. 4.1) on 0–255 pixels, one RGB offset per image, shape [B, 3].

    α ~ N(0, pca_std) per image and eigenvalue; shift = 255 · eigvec · (α · eigval), with eigval on the
    0–1 scale (so the shift is on 0–255) and eigvec's columns the eigenvectors.
    """
    alpha = torch.randn(batch_size, 3, device=device, generator=generator) * pca_std
    return 255.0 * (alpha * eigval) @ eigvec.T


class Normalize(nn.Module):
    """uint8 [B, 3, H, W] batch -> float (float32, or the autocast dtype), mean-subtracted, channels-last.

    Training mode adds ``pca_lighting`` first (``pca_std=0`` turns it off). ``mean="rgb"`` subtracts the
    per-channel mean; ``"image"`` the per-pixel mean image of the split (its centre crop when the batch is
    smaller: the mean image is smooth, so the offset of a random crop matters little). ``std=True`` also
    divides by the per-channel std. One fused multiply-add per batch.
    """

    def __init__(self, meta, *, pca_std=0.1, mean="rgb", std=False, mean_image=None):
        super().__init__()
        if mean not in MEANS:
            raise ValueError(f"mean={mean!r}: one of {', '.join(MEANS)}")
        if mean == "image" and mean_image is None:
            raise ValueError("mean='image' needs the split's mean image (build it with --mean-image and pass "
                             "mean_image=datasets.format.read_mean_image(root, meta))")
        self.pca_std = float(pca_std)
        scale = 1.0 / np.asarray(meta["std_rgb"], np.float32) if std else np.ones(3, np.float32)
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1))
        if mean == "image":
            m = torch.from_numpy(np.ascontiguousarray(np.asarray(mean_image, np.float32).transpose(2, 0, 1)))
        else:
            m = torch.tensor(meta["mean_rgb"], dtype=torch.float32).view(3, 1, 1)
        self.register_buffer("mean", m[None])
        self.register_buffer("eigval", torch.tensor(meta["pca_eigval"], dtype=torch.float32))
        self.register_buffer("eigvec", torch.tensor(meta["pca_eigvec"], dtype=torch.float32))

    def _mean_for(self, h, w):
        m = self.mean
        if m.shape[-2:] == (1, 1) or m.shape[-2:] == (h, w):
            return m
        top, left = (m.shape[-2] - h) // 2, (m.shape[-1] - w) // 2
        return m[..., top:top + h, left:left + w]

    def forward(self, images):
        b, _, h, w = images.shape
        offset = -self._mean_for(h, w)
        if self.training and self.pca_std > 0:
            shift = pca_lighting(b, self.eigval, self.eigvec, self.pca_std, device=images.device)
            offset = offset + shift.view(b, 3, 1, 1)
        x = torch.addcmul(offset * self.scale, images.to(torch.float32), self.scale)  # (x + offset) · scale
        x = x.contiguous(memory_format=torch.channels_last)
        kind = images.device.type
        if torch.is_autocast_enabled(kind):
            x = x.to(torch.get_autocast_dtype(kind))
        return x


def ten_crop(images, crop):
    """The paper's ten test patches of each image: [B, C, S, S] -> [B, 10, C, crop, crop].

    Order: top-left, top-right, bottom-left, bottom-right, centre, then the same five flipped horizontally.
    """
    s_h, s_w = images.shape[-2:]
    c_top, c_left = (s_h - crop) // 2, (s_w - crop) // 2
    corners = [(0, 0), (0, s_w - crop), (s_h - crop, 0), (s_h - crop, s_w - crop), (c_top, c_left)]
    five = torch.stack([images[..., t:t + crop, l:l + crop] for t, l in corners], dim=1)
    return torch.cat([five, five.flip(-1)], dim=1)
