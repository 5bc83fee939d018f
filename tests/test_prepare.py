"""prepare_resisc45.py on a generated 45-class tree; prepare_fashion_mnist.py on generated IDX files."""

import errno
import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, make_resisc45_tree, run_in_process, run_script
from PIL import Image

from myrtle_vision import files, prepare
from myrtle_vision.errors import UserError
from myrtle_vision.prepare import FASHION_MNIST_CLASSES, RESISC45_CLASSES


def _snapshot(root):
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def resisc_tree(tmp_path_factory):
    """45 class folders of 700 small JPEGs at the top of NWPU-RESISC45/, as the .rar extracts."""
    return make_resisc45_tree(tmp_path_factory.mktemp("resisc") / "NWPU-RESISC45")


def _copy(tree, dst):
    """A copy of the generated tree whose images are hard links (fast; the tests never write into an image)."""
    shutil.copytree(tree, dst, copy_function=os.link)
    return dst


@pytest.mark.slow
def test_lays_out_splits_labels_and_is_idempotent(resisc_tree, tmp_path):
    root = tmp_path / "NWPU-RESISC45"
    _copy(resisc_tree, root)
    proc = run_script("prepare_resisc45.py", root, check=True)
    assert "22005 train, 3195 validation, 6300 test" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == [
        "images",
        "label_map.json",
        "split_protocol.json",
        "test_imagepaths.txt",
        "train_imagepaths.txt",
        "val_imagepaths.txt",
    ]
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


@pytest.mark.slow
def test_already_under_images_works_too(resisc_tree, tmp_path):
    root = tmp_path / "R"
    _copy(resisc_tree, root / "images")
    run_script("prepare_resisc45.py", root, check=True)
    assert (root / "val_imagepaths.txt").read_text().startswith("images/airplane/airplane_490.jpg\n")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["incomplete", "unexpected folder", "missing class", "stray file"])
def test_bad_tree_is_an_error_and_nothing_moves(resisc_tree, tmp_path, case):
    root = tmp_path / "NWPU-RESISC45"
    _copy(resisc_tree, root)
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
    assert_user_error(run_in_process("prepare_resisc45.py", root), str(root), needle)
    assert _snapshot(root) == before


@pytest.mark.slow
def test_missing_folder(tmp_path):
    assert_user_error(run_in_process("prepare_resisc45.py", tmp_path / "nowhere"), "nowhere", "not found")


# --- a folder that cannot be written, a move that fails or was stopped part-way ------------------------


def _layout(root):
    """Where every file is and what it holds (folders' times left out: moving a folder away and back
    changes its parent's)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else "folder"
        for p in sorted(root.rglob("*"))
    }


def _prepare_as_a_user(root):
    return run_script("prepare_resisc45.py", root, unprivileged=True)


@pytest.mark.slow
@pytest.mark.parametrize("read_only", ["dataset folder", "class folder"])
def test_a_folder_that_cannot_be_written_is_one_line_and_nothing_changes(resisc_tree, tmp_path, read_only):
    """A class folder moved to another folder needs write permission itself (for its ".." entry), so both
    are checked before anything moves."""
    root = _copy(resisc_tree, tmp_path / "NWPU-RESISC45")
    folder = root if read_only == "dataset folder" else root / "lake"
    before = _snapshot(root)
    folder.chmod(0o555)
    try:
        proc = _prepare_as_a_user(root)
        after = _snapshot(root)
    finally:
        folder.chmod(0o755)
    assert_user_error(proc, f"{folder}: cannot write in this folder (permission denied); nothing was changed")
    assert after == before


@pytest.mark.slow
def test_a_prepared_read_only_folder_prepares_again_without_writing(resisc_tree, tmp_path):
    root = _copy(resisc_tree, tmp_path / "NWPU-RESISC45")
    prepare.prepare_resisc45(root)
    before = _snapshot(root)
    root.chmod(0o555)
    try:
        proc = _prepare_as_a_user(root)
    finally:
        root.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(root) == before


def _failing_rename(monkeypatch, fail: dict):
    """os.rename (prepare.py's move) raising OSError(errno) for the sources in ``fail``; the others move."""
    rename = os.rename

    def failing(src, dst):
        if str(src) in fail:
            code = fail[str(src)]
            raise OSError(code, os.strerror(code), str(src))
        return rename(src, dst)

    monkeypatch.setattr(prepare.os, "rename", failing)


def _assert_prepared(root, stdout=None):
    assert sorted(p.name for p in root.iterdir()) == [
        "images",
        "label_map.json",
        "split_protocol.json",
        "test_imagepaths.txt",
        "train_imagepaths.txt",
        "val_imagepaths.txt",
    ]
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(RESISC45_CLASSES)
    assert all(len(list((root / "images" / cls).iterdir())) == 700 for cls in RESISC45_CLASSES)
    assert list(json.loads((root / "label_map.json").read_text())) == sorted(RESISC45_CLASSES)
    val = (root / "val_imagepaths.txt").read_text().splitlines()
    assert val[0] == "images/airplane/airplane_490.jpg" and len(val) == 3195
    test = (root / "test_imagepaths.txt").read_text().splitlines()
    assert test[-1] == "images/wetland/wetland_700.jpg" and len(test) == 6300
    assert all((root / p).is_file() for p in val + test)
    if stdout is not None:
        assert "22005 train, 3195 validation, 6300 test" in stdout


@pytest.mark.slow
def test_a_class_folder_that_cannot_be_moved_moves_nothing(resisc_tree, tmp_path, monkeypatch):
    """The move is all or nothing: the 21 class folders moved before 'lake' failed (EBUSY, as a mount point
    gives) are moved back, images/ is removed, and a run once the cause is gone prepares the folder."""
    root = _copy(resisc_tree, tmp_path / "NWPU-RESISC45")
    before = _layout(root)
    _failing_rename(monkeypatch, {str(root / "lake"): errno.EBUSY})
    with pytest.raises(UserError) as e:
        prepare.prepare_resisc45(root)
    assert str(e.value) == (
        f"{root / 'lake'}: cannot move it to {root / 'images'}/ (Device or resource busy); nothing was changed"
    )
    assert _layout(root) == before
    monkeypatch.undo()
    _assert_prepared(root, run_script("prepare_resisc45.py", root, check=True).stdout)


@pytest.mark.slow
def test_a_move_back_that_fails_too_leaves_a_layout_that_a_second_run_finishes(resisc_tree, tmp_path, monkeypatch):
    root = _copy(resisc_tree, tmp_path / "NWPU-RESISC45")
    _failing_rename(monkeypatch, {str(root / "lake"): errno.EBUSY, str(root / "images" / "beach"): errno.EIO})
    with pytest.raises(UserError) as e:
        prepare.prepare_resisc45(root)
    assert str(e.value) == (
        f"{root / 'lake'}: cannot move it to {root / 'images'}/ (Device or resource busy), and "
        "moving beach back failed too (Input/output error): 5 of the 45 class folders are under "
        "images/ and the others at the top; once the cause is fixed, run prepare_resisc45.py "
        "again: it finishes the move"
    )
    moved = sorted(RESISC45_CLASSES)[:5]  # airplane ... beach: moved back newest first, until beach failed
    assert sorted(p.name for p in (root / "images").iterdir()) == moved
    assert sorted(p.name for p in root.iterdir() if p.name != "images") == sorted(set(RESISC45_CLASSES) - set(moved))
    monkeypatch.undo()
    _assert_prepared(root, run_script("prepare_resisc45.py", root, check=True).stdout)


@pytest.mark.slow
@pytest.mark.parametrize("moved", [0, 10, 44])
def test_a_move_stopped_part_way_is_finished_by_running_again(resisc_tree, tmp_path, moved):
    """A kill during the move (simulated: images/ made and some class folders moved by hand) leaves classes
    in both places, each in one of them; running again finishes the job."""
    root = _copy(resisc_tree, tmp_path / "NWPU-RESISC45")
    (root / "images").mkdir()
    for cls in RESISC45_CLASSES[:moved]:
        (root / cls).rename(root / "images" / cls)
    _assert_prepared(root, run_script("prepare_resisc45.py", root, check=True).stdout)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["class in both places", "class missing", "unexpected folder", "stray file"])
def test_an_ambiguous_split_layout_is_refused_and_nothing_moves(resisc_tree, tmp_path, case):
    root = _copy(resisc_tree, tmp_path / "NWPU-RESISC45")
    (root / "images").mkdir()
    for cls in RESISC45_CLASSES[:10]:
        (root / cls).rename(root / "images" / cls)
    if case == "class in both places":  # e.g. an extraction repeated over a half-prepared folder
        _copy(root / "images" / "beach", root / "beach")
        needles = (str(root), "class 'beach' is both at the top and under images/")
    elif case == "class missing":
        shutil.rmtree(root / "wetland")
        needles = (str(root), "incomplete: no folder for wetland")
    elif case == "unexpected folder":
        (root / "images" / "volcano").mkdir()
        needles = (str(root / "images"), "unexpected folder 'volcano'")
    else:
        (root / "images" / "beach" / "notes.txt").write_text("hi")
        needles = (str(root / "images" / "beach"), "unexpected entry 'notes.txt'")
    before = _snapshot(root)
    if case == "class in both places":  # through the script: one line, exit 2
        assert_user_error(run_in_process("prepare_resisc45.py", root), *needles)
    else:
        with pytest.raises(UserError) as e:
            prepare.prepare_resisc45(root)
        assert all(needle in str(e.value) for needle in needles), str(e.value)
    assert _snapshot(root) == before


def test_the_index_files_are_written_atomically(tmp_path, monkeypatch):
    """Each file is written to a temporary file, flushed to disk, renamed over its name, then its folder is
    flushed; a rename that fails leaves the earlier file as it was, no temporary file, and one line."""
    (tmp_path / "label_map.json").write_text("earlier\n")
    events, fsync, replace = [], os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst), Path(src).read_text()))
        return replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", logged_fsync)
    monkeypatch.setattr(files.os, "replace", logged_replace)
    prepare.write_index(tmp_path, ["b", "a"], {"train": ["images/a/1.jpg"], "val": [], "test": ["images/b/2.jpg"]})
    label_map = '{\n  "a": 0,\n  "b": 1\n}\n'
    folder, pid = str(tmp_path), os.getpid()
    assert events == [
        ("fsync", f"{folder}/.label_map.json.tmp{pid}"),
        ("replace", f".label_map.json.tmp{pid}", "label_map.json", label_map),
        ("fsync", folder),
        ("fsync", f"{folder}/.train_imagepaths.txt.tmp{pid}"),
        ("replace", f".train_imagepaths.txt.tmp{pid}", "train_imagepaths.txt", "images/a/1.jpg\n"),
        ("fsync", folder),
        ("fsync", f"{folder}/.val_imagepaths.txt.tmp{pid}"),
        ("replace", f".val_imagepaths.txt.tmp{pid}", "val_imagepaths.txt", ""),
        ("fsync", folder),
        ("fsync", f"{folder}/.test_imagepaths.txt.tmp{pid}"),
        ("replace", f".test_imagepaths.txt.tmp{pid}", "test_imagepaths.txt", "images/b/2.jpg\n"),
        ("fsync", folder),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "label_map.json",
        "test_imagepaths.txt",
        "train_imagepaths.txt",
        "val_imagepaths.txt",
    ]
    # a second write of the same text writes nothing; a failing rename keeps the file there
    events.clear()
    prepare.write_index(tmp_path, ["b", "a"], {"train": ["images/a/1.jpg"]})
    assert events == []

    def failing_replace(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(
        UserError,
        match=rf"^{tmp_path}/label_map.json: cannot write the index file \(No space left "
        r"on device\); nothing was written over label_map.json$",
    ):
        prepare.write_index(tmp_path, ["c"], {})
    assert (tmp_path / "label_map.json").read_text() == label_map
    assert not list(tmp_path.glob(".*"))


def _idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.slow
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
    proc = run_script(
        "prepare_fashion_mnist.py",
        "--idx-dir",
        src,
        "--out",
        small,
        "--val-per-class",
        1,
        "--train-per-class",
        2,
        check=True,
    )
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
    assert_user_error(
        run_script("prepare_fashion_mnist.py", "--idx-dir", src, "--out", small, "--train-per-class", 0),
        "--train-per-class",
    )


@pytest.mark.slow
def test_fashion_mnist_into_a_read_only_folder_is_one_line(tmp_path):
    from conftest import run_script_read_only

    src = tmp_path / "idx"
    src.mkdir()
    for name, shape in (
        ("train-images-idx3-ubyte.gz", (10, 28, 28)),
        ("train-labels-idx1-ubyte.gz", (10,)),
        ("t10k-images-idx3-ubyte.gz", (10, 28, 28)),
        ("t10k-labels-idx1-ubyte.gz", (10,)),
    ):
        _idx(src / name, np.arange(10).reshape(-1, *[1] * (len(shape) - 1)) * np.ones(shape))
    locked = tmp_path / "locked"
    locked.mkdir()
    proc = run_script_read_only(
        locked, "prepare_fashion_mnist.py", "--idx-dir", src, "--out", locked / "fm", "--val-per-class", 0
    )
    assert_user_error(proc, str(locked / "fm"), "cannot write the dataset there")
    assert list(locked.iterdir()) == []


@pytest.mark.slow
def test_fashion_mnist_without_the_files(tmp_path):
    assert_user_error(
        run_in_process("prepare_fashion_mnist.py", "--idx-dir", tmp_path), str(tmp_path), "dataset-fashion-mnist"
    )
