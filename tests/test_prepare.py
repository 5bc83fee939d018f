"""prepare_resisc45.py on a generated 45-class tree; prepare_fashion_mnist.py on generated IDX files."""

import gzip
import io
import json
import shutil
import struct

import numpy as np
import pytest
from conftest import assert_user_error, class_image, run_script
from PIL import Image

from myrtle_vision.prepare import FASHION_MNIST_CLASSES, RESISC45_CLASSES


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def resisc_tree(tmp_path_factory):
    """45 class folders of 700 small JPEGs at the top of NWPU-RESISC45/, as the .rar extracts."""
    root = tmp_path_factory.mktemp("resisc") / "NWPU-RESISC45"
    buf = io.BytesIO()
    class_image(0, 0, 8).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    for cls in RESISC45_CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(1, 701):
            (root / cls / f"{cls}_{i:03d}.jpg").write_bytes(jpeg)
    return root


def test_lays_out_splits_labels_and_is_idempotent(resisc_tree, tmp_path):
    root = tmp_path / "NWPU-RESISC45"
    shutil.copytree(resisc_tree, root)
    proc = run_script("prepare_resisc45.py", root, check=True)
    assert "22005 train, 3195 validation, 6300 test" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["images", "label_map.json", "test_imagepaths.txt",
                                                     "train_imagepaths.txt", "val_imagepaths.txt"]
    label_map = json.loads((root / "label_map.json").read_text())
    assert list(label_map) == sorted(RESISC45_CLASSES) and list(label_map.values()) == list(range(45))
    assert label_map["airplane"] == 0 and label_map["wetland"] == 44
    val = (root / "val_imagepaths.txt").read_text().splitlines()
    assert val[0] == "images/airplane/airplane_490.jpg" and val[70] == "images/airplane/airplane_560.jpg"
    train = (root / "train_imagepaths.txt").read_text().splitlines()
    test = (root / "test_imagepaths.txt").read_text().splitlines()
    assert train[0] == "images/airplane/airplane_001.jpg" and train[488] == "images/airplane/airplane_489.jpg"
    assert test[0] == "images/airplane/airplane_561.jpg" and test[-1] == "images/wetland/wetland_700.jpg"
    assert len(set(train) | set(val) | set(test)) == 31500
    before = _snapshot(root)
    run_script("prepare_resisc45.py", root, check=True)
    assert _snapshot(root) == before  # a second run changes nothing


def test_already_under_images_works_too(resisc_tree, tmp_path):
    root = tmp_path / "R"
    shutil.copytree(resisc_tree, root / "images")
    run_script("prepare_resisc45.py", root, check=True)
    assert (root / "val_imagepaths.txt").read_text().startswith("images/airplane/airplane_490.jpg\n")


@pytest.mark.parametrize("case", ["incomplete", "unexpected folder", "missing class", "stray file"])
def test_bad_tree_is_an_error_and_nothing_moves(resisc_tree, tmp_path, case):
    root = tmp_path / "NWPU-RESISC45"
    shutil.copytree(resisc_tree, root)
    if case == "incomplete":
        (root / "river" / "river_700.jpg").unlink()
        needle = "has 699 images, expected 700"
    elif case == "unexpected folder":
        (root / "volcano").mkdir()
        needle = "unexpected folder 'volcano'"
    elif case == "missing class":
        shutil.rmtree(root / "wetland")
        needle = "no folder for wetland"
    else:
        (root / "beach" / "notes.txt").write_text("hi")
        needle = "unexpected entry 'notes.txt'"
    before = _snapshot(root)
    assert_user_error(run_script("prepare_resisc45.py", root), str(root), needle)
    assert _snapshot(root) == before


def test_missing_folder(tmp_path):
    assert_user_error(run_script("prepare_resisc45.py", tmp_path / "nowhere"), "nowhere", "not found")


def _idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "idx"
    src.mkdir()
    train_labels, test_labels = np.repeat(np.arange(10), 4), np.repeat(np.arange(10), 2)
    train_images = rng.integers(0, 256, (40, 28, 28))
    _idx(src / "train-images-idx3-ubyte.gz", train_images)
    _idx(src / "train-labels-idx1-ubyte.gz", train_labels)
    _idx(src / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    _idx(src / "t10k-labels-idx1-ubyte.gz", test_labels)
    out = tmp_path / "fm"
    proc = run_script("prepare_fashion_mnist.py", "--idx-dir", src, "--out", out, "--val-per-class", 1, check=True)
    assert "30 train, 10 validation, 20 test" in proc.stdout
    label_map = json.loads((out / "label_map.json").read_text())
    assert set(label_map) == set(FASHION_MNIST_CLASSES) and sorted(label_map.values()) == list(range(10))
    train = (out / "train_imagepaths.txt").read_text().split()
    val = (out / "val_imagepaths.txt").read_text().split()
    test = (out / "test_imagepaths.txt").read_text().split()
    assert not set(train) & set(val) and all(p.split("/")[-1].startswith("train_") for p in train + val)
    assert all(p.split("/")[-1].startswith("test_") for p in test)
    # an image's pixels and class survive the trip
    first_bag = int(np.flatnonzero(train_labels == FASHION_MNIST_CLASSES.index("bag"))[0])
    path = out / f"images/bag/train_{first_bag:05d}.png"
    assert np.array_equal(np.asarray(Image.open(path)), train_images[first_bag])
    before = _snapshot(out)
    run_script("prepare_fashion_mnist.py", "--idx-dir", src, "--out", out, "--val-per-class", 1, check=True)
    assert _snapshot(out) == before
    # a smaller training set: the first N training images of each class, the same validation images
    small = tmp_path / "small"
    proc = run_script("prepare_fashion_mnist.py", "--idx-dir", src, "--out", small, "--val-per-class", 1,
                      "--train-per-class", 2, check=True)
    assert "20 train, 10 validation, 20 test images, 10 extra" in proc.stdout
    small_train = (small / "train_imagepaths.txt").read_text().split()
    extra = (small / "extra_imagepaths.txt").read_text().split()
    assert set(small_train) < set(train) and (small / "val_imagepaths.txt").read_text().split() == val
    assert sorted(small_train + extra) == sorted(train)  # the rest of training, for the demo teacher's pretraining
    for cls in FASHION_MNIST_CLASSES:
        mine = sorted(p for p in train if p.startswith(f"images/{cls}/"))
        assert sorted(p for p in small_train if p.startswith(f"images/{cls}/")) == mine[:2]
        assert sorted(p for p in extra if p.startswith(f"images/{cls}/")) == mine[2:]
    written = {str(p.relative_to(small)) for p in small.rglob("*.png")}
    assert written == set(small_train) | set(extra) | set(val) | set(test)  # nothing unlisted is written
    run_script("prepare_fashion_mnist.py", "--idx-dir", src, "--out", small, "--val-per-class", 1, check=True)
    assert not (small / "extra_imagepaths.txt").exists()  # all training images train again: no extra list
    assert (small / "train_imagepaths.txt").read_text().split() == train
    assert_user_error(run_script("prepare_fashion_mnist.py", "--idx-dir", src, "--out", small, "--train-per-class", 0),
                      "--train-per-class")


def test_fashion_mnist_without_the_files(tmp_path):
    assert_user_error(run_script("prepare_fashion_mnist.py", "--idx-dir", tmp_path), str(tmp_path),
                      "dataset-fashion-mnist")
