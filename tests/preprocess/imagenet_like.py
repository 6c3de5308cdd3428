"""ImageNet as it ships, in miniature, written by the tests themselves: a train tar of per-class tars, a flat
val folder or tar of ``ILSVRC2012_val_%08d.JPEG``, Kaggle's ``LOC_val_solution.csv`` and
``LOC_synset_mapping.txt``, and the devkit's ground truth with a ``meta.mat`` whose ILSVRC2012_IDs are *not* in
sorted-WNID order. Every writer also returns what the files say, computed here, independently of the builder."""
import io
import os
import tarfile

import numpy as np

from tests.conftest import encode, random_rgb

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark", "n01491361": "tiger shark, Galeocerdo cuvieri"}
DEVKIT_IDS = {"n01484850": 1, "n01440764": 2, "n01491361": 3, "n01443537": 4}  # not in sorted-WNID order


def add_bytes(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def train_images(rng, per_class=5, size=(80, 64)):
    """{WNID: {file name: JPEG bytes}}."""
    return {w: {f"{w}_{k}.JPEG": encode(random_rgb(rng, size[1], size[0])) for k in range(per_class)} for w in WNIDS}


def write_folder(root, images):
    """ImageFolder tree root/WNID/file of ``images``."""
    for w, files in images.items():
        os.makedirs(os.path.join(root, w), exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(root, w, name), "wb") as f:
                f.write(data)


def write_train_tar(path, images):
    """ILSVRC2012_img_train.tar's layout: an outer tar of WNID.tar, each a flat tar of its images. Members are
    written in reverse order, inner and outer, so nothing can rely on the archive's order."""
    with tarfile.open(path, "w") as outer:
        for w in reversed(list(images)):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for name in reversed(sorted(images[w])):
                    add_bytes(inner, name, images[w][name])
            add_bytes(outer, f"{w}.tar", buf.getvalue())


def val_images(rng, n=10, size=(72, 90)):
    """[(file name, WNID, JPEG bytes)] for ILSVRC2012_val_00000001.JPEG…, classes drawn at random."""
    return [(f"ILSVRC2012_val_{i:08d}.JPEG", WNIDS[int(rng.integers(len(WNIDS)))],
             encode(random_rgb(rng, size[1], size[0]))) for i in range(1, n + 1)]


def write_val_flat(root, vals):
    os.makedirs(root, exist_ok=True)
    for name, _, data in vals:
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)


def write_val_sorted(root, vals):
    """The val images sorted into WNID folders, as users do today with a script from elsewhere."""
    for name, w, data in vals:
        os.makedirs(os.path.join(root, w), exist_ok=True)
        with open(os.path.join(root, w, name), "wb") as f:
            f.write(data)


def write_val_tar(path, vals):
    with tarfile.open(path, "w") as tf:
        for name, _, data in reversed(vals):
            add_bytes(tf, name, data)


def write_kaggle(folder, vals):
    """LOC_val_solution.csv (rows in no particular order, boxes after the WNID) and LOC_synset_mapping.txt."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "LOC_val_solution.csv"), "w") as f:
        f.write("ImageId,PredictionString\n")
        for name, w, _ in reversed(vals):
            f.write(f"{os.path.splitext(name)[0]},{w} 12 30 200 180 {w} 1 2 3 4 \n")
    with open(os.path.join(folder, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"{w} {WORDS[w]}\n" for w in WNIDS)
    return os.path.join(folder, "LOC_val_solution.csv")


def write_devkit(folder, vals):
    """The devkit's data/ folder: ILSVRC2012_validation_ground_truth.txt (line i: the ILSVRC2012_ID of val image
    i) and meta.mat's synsets (the leaves with their IDs, plus an inner node, as in the real file)."""
    from scipy.io import savemat
    os.makedirs(folder, exist_ok=True)
    ids = {int(name[15:23]): DEVKIT_IDS[w] for name, w, _ in vals}
    with open(os.path.join(folder, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
        f.writelines(f"{ids[i]}\n" for i in range(1, max(ids) + 1))
    dtype = [(k, "O") for k in ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                                "wordnet_height", "num_train_images")]
    rows = [(i, w, WORDS[w], "a fish", 0, np.zeros((1, 0)), 0, 1300) for w, i in DEVKIT_IDS.items()]
    rows.append((len(rows) + 1, "n01440000", "fish", "any fish", 4, np.arange(1, 5), 1, 0))
    savemat(os.path.join(folder, "meta.mat"), {"synsets": np.array(rows, dtype=dtype).reshape(-1, 1)})
    return os.path.join(folder, "ILSVRC2012_validation_ground_truth.txt")
