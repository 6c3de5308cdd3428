"""Pixel statistics of a training split: mean RGB, std, and the RGB covariance's PCA (paper Sec. 4.1).

Sums are kept as exact integers (pixel count, per-channel sum, the 3×3 sum of products, and optionally
the per-pixel sum image), so partial results from workers, shards, resumed builds or other machines
merge exactly and in any order. Only ``summary`` turns them into floats.
"""
import cv2
import numpy as np


class PixelStats:
    """Exact running sums over 8-bit RGB pixels; ``add`` takes OpenCV BGR images."""

    def __init__(self, mean_image_shape=None):
        self.count = 0
        self.sum = np.zeros(3, np.int64)
        self.gram = np.zeros((3, 3), np.int64)
        self.image_sum = None if mean_image_shape is None else np.zeros(mean_image_shape, np.int64)
        self.images = 0

    def add(self, bgr):
        """Add one H×W×3 BGR uint8 image. OpenCV's sums are exact here: products of 8-bit values fit
        exactly in float32, and OpenCV sums float32 in float64, exact far beyond these totals."""
        swapped = np.empty_like(bgr)
        cv2.mixChannels([bgr], [swapped], [1, 0, 2, 1, 0, 2])  # (G, R, B) against (B, G, R)
        sq = cv2.sumElems(cv2.multiply(bgr, bgr, dtype=cv2.CV_32F))  # BB, GG, RR
        cross = cv2.sumElems(cv2.multiply(bgr, swapped, dtype=cv2.CV_32F))  # BG, GR, RB
        b, g, r = (int(v) for v in cv2.sumElems(bgr)[:3])
        bb, gg, rr = (int(v) for v in sq[:3])
        bg, gr, rb = (int(v) for v in cross[:3])
        self.sum += (r, g, b)
        self.gram += np.array([[rr, gr, rb], [gr, gg, bg], [rb, bg, bb]], np.int64)
        self.count += bgr.shape[0] * bgr.shape[1]
        self.images += 1
        if self.image_sum is not None:
            self.image_sum += bgr[..., ::-1]

    def merge(self, other):
        self.count += other.count
        self.images += other.images
        self.sum += other.sum
        self.gram += other.gram
        if self.image_sum is not None:
            self.image_sum += other.image_sum
        return self

    def to_dict(self, *, with_image=False):
        """Plain-types form (JSON or msgpack): exact integers."""
        d = {"images": self.images, "pixels": self.count, "sum": self.sum.tolist(), "sum_products": self.gram.tolist()}
        if with_image and self.image_sum is not None:
            d["image_sum"] = self.image_sum.astype("<i8").tobytes()
            d["image_shape"] = list(self.image_sum.shape)
        return d

    @classmethod
    def from_dict(cls, d):
        s = cls(tuple(d["image_shape"]) if "image_sum" in d else None)
        s.images, s.count = d["images"], d["pixels"]
        s.sum = np.array(d["sum"], np.int64)
        s.gram = np.array(d["sum_products"], np.int64)
        if "image_sum" in d:
            s.image_sum = np.frombuffer(d["image_sum"], "<i8").reshape(d["image_shape"]).astype(np.int64)
        return s

    def summary(self):
        """mean_rgb and std_rgb on 0–255; pca_eigval (descending, of the covariance on the 0–1 scale) and
        pca_eigvec (3×3, column i the unit eigenvector of eigenvalue i, rows R, G, B; sign fixed so the
        largest component of each column is positive)."""
        if self.count == 0:
            raise ValueError("no pixels: the split has no records")
        n = self.count
        mean = self.sum / n
        cov = self.gram / n - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov / 255.0 ** 2)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order]
        eigvec *= np.sign(eigvec[np.abs(eigvec).argmax(axis=0), range(3)])
        return {
            "mean_rgb": mean.tolist(),
            "std_rgb": np.sqrt(np.clip(np.diag(cov), 0, None)).tolist(),
            "pca_eigval": eigval.tolist(),
            "pca_eigvec": eigvec.tolist(),
        }

    def mean_image(self):
        """Per-pixel mean, H×W×3 float32 RGB on 0–255."""
        return (self.image_sum / max(self.images, 1)).astype(np.float32)
