"""ten_crop against hand slicing; Normalize against numpy and against the PCA shift's own distribution."""
import numpy as np
import pytest
import torch

from datasets import Normalize, ten_crop

META = {
    "mean_rgb": [120.0, 110.0, 100.0],
    "std_rgb": [60.0, 55.0, 50.0],
    "pca_eigval": [0.2175, 0.0188, 0.0045],
    "pca_eigvec": [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
}


def test_ten_crop_order_by_hand():
    x = torch.arange(2 * 3 * 6 * 7, dtype=torch.float32).view(2, 3, 6, 7)
    out = ten_crop(x, 4)
    assert out.shape == (2, 10, 3, 4, 4)
    n = x.numpy()
    expected = [n[..., 0:4, 0:4], n[..., 0:4, 3:7], n[..., 2:6, 0:4], n[..., 2:6, 3:7], n[..., 1:5, 1:5]]
    expected += [e[..., ::-1] for e in expected]
    for k, e in enumerate(expected):
        assert np.array_equal(out[:, k].numpy(), e), k


def test_eval_mode_is_mean_subtraction_and_optional_std(rng):
    x = torch.from_numpy(rng.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8))
    n = x.numpy().astype(np.float64)
    mean = np.array(META["mean_rgb"]).reshape(1, 3, 1, 1)
    std = np.array(META["std_rgb"]).reshape(1, 3, 1, 1)
    plain = Normalize(META).eval()(x)
    assert plain.dtype == torch.float32 and plain.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(plain.numpy(), n - mean, atol=1e-4)
    np.testing.assert_allclose(Normalize(META, std=True).eval()(x).numpy(), (n - mean) / std, atol=1e-5)


def test_mean_image_is_subtracted_per_pixel_centre_cropped(rng):
    mean_image = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    x = torch.from_numpy(rng.integers(0, 256, (2, 3, 6, 6), dtype=np.uint8))
    out = Normalize(META, mean="image", mean_image=mean_image).eval()(x)
    expected = x.numpy() - mean_image[1:7, 1:7].transpose(2, 0, 1)[None]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)
    with pytest.raises(ValueError, match="--mean-image"):
        Normalize(META, mean="image")


def test_pca_shift_statistics():
    """Over many draws the shift has mean 0 and covariance 255² · V · diag((σλ)²) · Vᵀ (paper Sec. 4.1)."""
    torch.manual_seed(0)
    n, sigma = 200_000, 0.1
    zeros = torch.zeros(n, 3, 1, 1, dtype=torch.uint8)
    out = Normalize(META, pca_std=sigma).train()(zeros)
    shift = out.view(n, 3).double().numpy() + np.array(META["mean_rgb"])  # output = shift − mean
    vec, val = np.array(META["pca_eigvec"]), np.array(META["pca_eigval"])
    expected = 255.0**2 * vec @ np.diag((sigma * val) ** 2) @ vec.T
    assert np.abs(shift.mean(0)).max() < 0.05
    np.testing.assert_allclose(np.cov(shift, rowvar=False), expected, rtol=0.02, atol=0.02)
    # one shift per image, the same at every pixel of it
    img = Normalize(META, pca_std=sigma).train()(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    assert torch.allclose(img, img[..., :1, :1].expand_as(img))
    assert not torch.allclose(img[0], img[1])
    assert torch.equal(Normalize(META, pca_std=0.0).train()(zeros[:4]), Normalize(META).eval()(zeros[:4]))


def test_autocast_dtype():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Normalize(META).eval()(x).dtype == torch.bfloat16
    assert Normalize(META).eval()(x).dtype == torch.float32


def test_preview_writes_a_labelled_grid(jpeg_split, tmp_path):
    from PIL import Image

    from tests.conftest import run_cli
    run_cli("datasets.preview", jpeg_split, "--out", tmp_path / "p.png", "--count", 6, "--columns", 3, "--crop", 32)
    im = Image.open(tmp_path / "p.png")
    assert im.format == "PNG" and im.width > 3 * 2 * 160 and im.height > 2 * 160
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
