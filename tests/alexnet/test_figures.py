"""alexnet.figures: the PNGs exist with their pixel sizes; Figure 3's tiles are the conv1 kernels, rescaled by the
test itself; Figure 4's rows are the validation crops and their nearest training crops, found by the test."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet import evaluation
from alexnet.figures import make_figures
from datasets import LMDBDataset
from tests.conftest import run_cli


def rescaled(w):
    """A kernel [3, 11, 11] -> 44×44×3 uint8, as the paper's figure shows it: each kernel stretched to 0–255."""
    w = w.astype(np.float64)
    t = np.rint((w - w.min()) / (w.max() - w.min()) * 255).astype(np.uint8).transpose(1, 2, 0)
    return t.repeat(4, axis=0).repeat(4, axis=1)


@pytest.fixture(scope="module")
def figures(trained, tmp_path_factory):
    run = tmp_path_factory.mktemp("figs")
    shutil.copy(trained / "last.pt", run / "last.pt")
    proc = run_cli("alexnet.figures", run, "--quiet")
    assert proc.returncode == 0
    return run


def test_figure3_tiles_are_the_conv1_kernels(figures):
    img = np.asarray(Image.open(figures / "figure3.png").convert("RGB"))
    assert img.shape == (2 + 6 * 44 + 5 * 2 + 2, 2 + 16 * 44 + 15 * 2 + 2, 3)
    w = torch.load(figures / "last.pt", weights_only=True)["model"]["features.conv1.weight"].numpy()
    for k in (0, 17, 47, 48, 95):
        row, col = divmod(k, 16)
        top, left = 2 + row * 46, 2 + col * 46
        assert np.array_equal(img[top:top + 44, left:left + 44], rescaled(w[k])), k


def test_figure3_splits_the_towers_with_two_groups(figures, tmp_path):
    from alexnet.figures import figure3
    w = np.random.default_rng(0).normal(size=(96, 3, 11, 11))
    img = figure3(w, groups=2)
    assert img.shape == (2 + 6 * 44 + 5 * 2 + 6 + 2, 2 + 16 * 44 + 15 * 2 + 2, 3)
    top = 2 + 3 * 46 + 6  # kernel 48, the second tower's first, below a wider gap
    assert np.array_equal(img[top:top + 44, 2:46], rescaled(w[48]))
    assert (img[top - 8:top] == 255).all()


def test_figure4_rows_are_the_nearest_training_images(figures, trained, tiny):
    img = np.asarray(Image.open(figures / "figure4.png").convert("RGB"))
    crop = 64
    assert img.shape == (2 + 5 * crop + 4 * 4 + 2, 2 + 7 * crop + 5 * 4 + 12 + 2, 3)
    model, normalize, _ = evaluation.load_model(figures / "last.pt", torch.device("cpu"))
    val, train = LMDBDataset(tiny / "val"), LMDBDataset(tiny / "train")

    def centre(i, ds):
        image = ds[i][0]
        c = (image.shape[0] - crop) // 2
        return image[c:c + crop, c:c + crop]

    def features(images):  # fc7 after its ReLU, by hand from the named layers
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        with torch.no_grad():
            h = torch.flatten(model.features(normalize(x)), 1)
            return model.classifier.relu7(model.classifier.fc7(model.classifier.relu6(model.classifier.fc6(h))))

    train_f = features([centre(j, train) for j in range(len(train))])
    for r, i in enumerate(np.linspace(0, len(val) - 1, 5).round().astype(int)):
        q = centre(int(i), val)
        top = 2 + r * (crop + 4)
        assert np.array_equal(img[top:top + crop, 2:2 + crop], q)
        d = ((train_f - features([q])) ** 2).sum(1)
        j = int(d.argmin())
        left = 2 + crop + 12
        assert np.array_equal(img[top:top + crop, left:left + crop], centre(j, train)), (r, j)


def test_confusion_matrix_png(figures):
    assert Image.open(figures / "confusion.png").size == (800, 800)


def test_too_few_training_images_and_a_split_of_another_size_are_refused(figures, tiny, tmp_path):
    proc = run_cli("alexnet.figures", figures, "--train-limit", 3, check=False)
    assert proc.returncode == 2 and "at least 6 training images" in proc.stderr
    from preprocess.build_lmdb import build
    build(str(tiny / "images" / "val"), str(tmp_path / "v60"), size=60, quiet=True, classes_from=str(tiny / "train"))
    proc = run_cli("alexnet.figures", figures, "--data", tmp_path / "v60", check=False)
    assert proc.returncode == 2 and "--size 72" in proc.stderr and "Traceback" not in proc.stderr
