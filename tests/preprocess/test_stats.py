"""PixelStats against numpy's mean, covariance and eigen-decomposition of the same pixels."""
import json

import numpy as np

from preprocess.stats import PixelStats


def numpy_reference(images_rgb):
    px = np.concatenate([im.reshape(-1, 3) for im in images_rgb]).astype(np.float64)
    cov = np.cov(px, rowvar=False, bias=True)
    return px.mean(0), px.std(0), cov


def test_summary_matches_numpy(rng):
    images = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(5)]
    images = [(im * np.array([1.0, 0.6, 0.3]) + 20).astype(np.uint8) for im in images]  # distinct channels
    s = PixelStats()
    for im in images:
        s.add(np.ascontiguousarray(im[..., ::-1]))  # add takes BGR
    mean, std, cov = numpy_reference(images)
    out = s.summary()
    np.testing.assert_allclose(out["mean_rgb"], mean, rtol=1e-12)
    np.testing.assert_allclose(out["std_rgb"], std, rtol=1e-9)
    val, vec = np.array(out["pca_eigval"]), np.array(out["pca_eigvec"])
    assert np.all(np.diff(val) <= 0), "eigenvalues descending"
    np.testing.assert_allclose(np.linalg.norm(vec, axis=0), 1, rtol=1e-9)
    np.testing.assert_allclose(255.0**2 * vec @ np.diag(val) @ vec.T, cov, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(sorted(np.linalg.eigvalsh(cov / 255.0**2))[::-1], val, rtol=1e-9)
    for i in range(3):  # column i is the eigenvector of eigenvalue i
        np.testing.assert_allclose(cov / 255.0**2 @ vec[:, i], val[i] * vec[:, i], atol=1e-12)


def test_merge_is_exact_in_any_order(rng):
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(6)]
    whole = PixelStats((16, 16, 3))
    parts = [PixelStats((16, 16, 3)) for _ in range(3)]
    for k, im in enumerate(images):
        whole.add(im)
        parts[k % 3].add(im)
    merged = PixelStats((16, 16, 3))
    for p in reversed(parts):
        merged.merge(PixelStats.from_dict(p.to_dict(with_image=True)))
    assert merged.to_dict(with_image=True) == whole.to_dict(with_image=True)
    px = np.stack([im[..., ::-1] for im in images]).astype(np.int64)
    assert merged.sum.tolist() == px.reshape(-1, 3).sum(0).tolist()
    np.testing.assert_allclose(merged.mean_image(), px.mean(0), rtol=1e-6)


def test_plain_dict_is_json_and_exact():
    s = PixelStats()
    s.add(np.full((256, 256, 3), 255, np.uint8))
    d = json.loads(json.dumps(s.to_dict()))
    assert d["sum_products"][0][0] == 255 * 255 * 256 * 256
    assert PixelStats.from_dict(d).to_dict() == s.to_dict()
