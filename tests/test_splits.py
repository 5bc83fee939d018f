"""Split protocols (myrtle_vision/splits.py) and prepare_folders.py: the papers' 10% and 20% of each class, published
split lists, any folder-per-class dataset, and split_protocol.json."""

import json
import os
import shutil
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import REPO, assert_user_error, class_image, make_resisc45_tree, run_in_process, train_config

from myrtle_vision import prepare
from myrtle_vision.config import load_config, load_data_config
from myrtle_vision.data import open_split
from myrtle_vision.errors import UserError
from myrtle_vision.prepare import PROTOCOL_FILE, RESISC45_CLASSES, SPLIT_FILES
from myrtle_vision.splits import fraction_counts, split_by_fraction, split_by_lists

SPLITS = ("train", "val", "test")


def _names(n=700, classes=RESISC45_CLASSES):
    return {cls: [f"{cls}_{i:03d}.jpg" for i in range(1, n + 1)] for cls in classes}


# --- the protocols themselves (no files) -------------------------------------------------------------------------


@pytest.mark.parametrize("fraction, share, val", [("0.1", 70, 7), ("0.2", 140, 14)])
def test_the_papers_fractions_give_exact_counts_per_class_disjoint_and_seeded(fraction, share, val):
    files = _names()
    out = split_by_fraction(files, Fraction(fraction), Fraction("0.1"), seed=0)
    for cls, split in out.items():
        train, vals, test = (split[s] for s in SPLITS)
        assert (len(train) + len(vals), len(vals), len(test)) == (share, val, 700 - share), cls
        assert not set(train) & set(vals) and not set(train) & set(test) and not set(vals) & set(test)
        assert sorted(train + vals + test) == files[cls]
    assert split_by_fraction(files, Fraction(fraction), Fraction("0.1"), seed=0) == out  # same seed, same split
    other = split_by_fraction(files, Fraction(fraction), Fraction("0.1"), seed=1)
    assert all(other[cls]["test"] != out[cls]["test"] for cls in files)  # another seed: another split, every class
    # the test split depends on the seed and the training fraction alone, not on how much of the share validates
    assert {c: s["test"] for c, s in split_by_fraction(files, Fraction(fraction), Fraction("0.3"), 0).items()} == {
        c: s["test"] for c, s in out.items()
    }


def test_with_one_seed_the_20_percent_share_holds_the_10_percent_share():
    files = _names()
    ten, twenty = (split_by_fraction(files, Fraction(f), Fraction("0.1"), 5) for f in ("0.1", "0.2"))
    for cls in files:
        assert set(ten[cls]["train"] + ten[cls]["val"]) < set(twenty[cls]["train"] + twenty[cls]["val"])


@pytest.mark.parametrize(
    "n, train_fraction, val_fraction, expected",
    [
        (700, "0.1", "0.1", (63, 7, 630)),
        (700, "0.2", "0.1", (126, 14, 560)),
        (10, "0.8", "0.25", (6, 2, 2)),  # the 60/20/20 default
        (7, "0.5", "0.25", (3, 1, 3)),  # share 3.5 -> 4 (half up, not to even), val 1.0 -> 1
        (5, "0.5", "0.1", (3, 0, 2)),  # share 2.5 -> 3, val 0.3 -> 0
        (3, "0.6", "0.25", (1, 1, 1)),  # share 1.8 -> 2, val 0.5 -> 1
        (13, "0.8", "0.25", (7, 3, 3)),  # share 10.4 -> 10, val 2.5 -> 3
        (90, "0.35", "0.25", (24, 8, 58)),  # share 31.5 -> 32: 0.35 as written, not the float below it (31.4999...)
    ],
)
def test_fractions_round_half_up_per_class_on_the_decimal_written(n, train_fraction, val_fraction, expected):
    assert fraction_counts(n, Fraction(train_fraction), Fraction(val_fraction)) == expected
    assert sum(expected) == n


@pytest.mark.parametrize(
    "sizes, fraction, needle",
    [
        ({"a": 10, "b": 1}, "0.8", "b: 1 image gives 1 train, 0 validation and 0 test"),
        ({"a": 10, "b": 10}, "0.95", "a: 10 images give 7 train, 3 validation and 0 test"),
    ],
)
def test_a_class_without_a_training_or_a_test_image_is_an_error(sizes, fraction, needle):
    files = {cls: [f"{cls}{i}.png" for i in range(n)] for cls, n in sizes.items()}
    with pytest.raises(UserError, match="at least one training and one test image") as e:
        split_by_fraction(files, Fraction(fraction), Fraction("0.25"), 0, shown="DATA/images")
    assert f"DATA/images/{needle}" in str(e.value)


def test_no_validation_image_in_any_class_is_an_error():
    files = {"a": ["1.jpg", "2.jpg", "3.jpg", "4.jpg"], "b": ["5.jpg", "6.jpg"]}
    with pytest.raises(UserError, match="--val-fraction 0.1 leaves no class a validation image"):
        split_by_fraction(files, Fraction("0.5"), Fraction("0.1"), 0)


def _lists(folder: Path, train, val, test) -> tuple[Path, Path, Path]:
    paths = tuple(folder / f"resisc45-{s}.txt" for s in SPLITS)
    for path, names in zip(paths, (train, val, test)):
        path.write_text("".join(f"{n}\n" for n in names))
    return paths


def test_lists_match_by_file_name_or_class_and_name(tmp_path):
    files = {"a": ["x.jpg", "y.jpg", "z.jpg"], "b": ["u.jpg", "x.jpg", "w.jpg"]}  # x.jpg in both classes
    # a byte-order mark (as Windows editors write), blank lines and spaces are not part of a name
    lists = _lists(tmp_path, ["\ufeffy.jpg", "a/x.jpg", "images/b/x.jpg"], ["", "z.jpg", "  u.jpg  "], ["w.jpg"])
    assert split_by_lists(files, lists) == {
        "a": {"train": ["x.jpg", "y.jpg"], "val": ["z.jpg"], "test": []},
        "b": {"train": ["x.jpg"], "val": ["u.jpg"], "test": ["w.jpg"]},
    }
    lists = _lists(tmp_path, ["y.jpg", "x.jpg"], ["z.jpg", "u.jpg"], ["w.jpg", "b/x.jpg"])
    with pytest.raises(UserError) as e:
        split_by_lists(files, lists)
    assert str(e.value) == (
        f"{lists[0]}:2: x.jpg: ambiguous: classes 'a' and 'b' both hold an image of that name; write the line as "
        "CLASS/x.jpg"
    )


# --- flags -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, args, needle",
    [
        ("prepare_resisc45.py", ["--train-fraction", "1.5"], "--train-fraction: expected a number between 0 and 1"),
        ("prepare_resisc45.py", ["--train-fraction", "ten"], "got 'ten'"),
        ("prepare_resisc45.py", ["--train-fraction", "0.1", "--val-fraction", "0"], "--val-fraction: expected"),
        ("prepare_resisc45.py", ["--val-fraction", "0.2"], "--val-fraction: only with --train-fraction"),
        ("prepare_resisc45.py", ["--seed", "3"], "--seed: only with --train-fraction"),
        ("prepare_resisc45.py", ["--train-fraction", "0.1", "--seed", "-1"], "--seed: must be 0 or more"),
        ("prepare_resisc45.py", ["--split-lists", "a", "b", "c", "--seed", "1"], "cannot be combined with --seed"),
        ("prepare_folders.py", ["--split-lists", "a", "b", "c", "--train-fraction", "0.2"], "with --train-fraction"),
        ("prepare_folders.py", ["--train-fraction", "1"], "--train-fraction: expected"),
    ],
)
def test_bad_flags_are_one_line_before_the_folder_is_read(tmp_path, script, args, needle):
    missing = tmp_path / "not there"  # never reached: the flags are checked first
    assert_user_error(run_in_process(script, missing, *args), needle)


# --- a folder-per-class dataset ----------------------------------------------------------------------------------

# class -> (number of images, their formats in turn); unequal classes, upper- and lower-case extensions
TREE = {
    "beach": (10, ["jpg", "png", "tif"]),
    "forest": (7, ["JPEG", "png"]),
    "harbor": (13, ["tiff", "JPG"]),
    "river": (30, ["png"]),
}
# what 60/20/20 (share round(0.8 n), val round(0.25 share), half up) gives them
EXPECTED = {"beach": (6, 2, 2), "forest": (4, 2, 1), "harbor": (7, 3, 3), "river": (18, 6, 6)}


def _folder_tree(root: Path) -> Path:
    """TREE's classes at the top of ``root``, with strays: a .txt, a subfolder, a .json (skipped: 3), a .DS_Store and
    a hidden folder (ignored)."""
    for c, (cls, (n, formats)) in enumerate(TREE.items()):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            ext = formats[i % len(formats)]
            fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}.get(ext.lower(), ext.upper())
            class_image(c, i, 8).save(root / cls / f"{cls}{i:02d}.{ext}", format=fmt)
    (root / "beach" / "notes.txt").write_text("not an image")
    (root / "forest" / "more").mkdir()
    (root / "forest" / "more" / "x.jpg").write_bytes(b"")
    (root / "river" / "meta.json").write_text("{}")
    (root / "river" / ".DS_Store").write_bytes(b"\0")
    (root / ".cache").mkdir()
    (root / "README.txt").write_text("a file at the top is not a class")
    return root


def _split_files(root: Path) -> dict[str, list[str]]:
    return {s: (root / SPLIT_FILES[s]).read_text().splitlines() for s in SPLITS}


def _per_class(splits: dict[str, list[str]]) -> dict[str, tuple[int, int, int]]:
    counts = {s: Counter(p.split("/")[1] for p in paths) for s, paths in splits.items()}
    classes = sorted(set().union(*counts.values()))
    return {cls: tuple(counts[s][cls] for s in SPLITS) for cls in classes}


def test_a_folder_per_class_dataset_is_laid_out_and_its_data_config_trains(tmp_path):
    root = _folder_tree(tmp_path / "scenes")
    cfg_path = tmp_path / "data_configs" / "scenes.json"
    proc = run_in_process("prepare_folders.py", root, "--data-config", cfg_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{root}: ready: 35 train, 13 validation, 12 test images"
    assert "label map (label_map.json): beach 0, forest 1, harbor 2, river 3" in lines
    assert (
        "skipped 3 entries of class folders that are not images: images/beach/notes.txt, images/forest/more, "
        "images/river/meta.json" in lines
    )
    assert "  harbor: 7 / 3 / 3" in lines
    assert sorted(p.name for p in root.iterdir()) == [
        ".cache",
        "README.txt",
        "images",
        "label_map.json",
        PROTOCOL_FILE,
        "test_imagepaths.txt",
        "train_imagepaths.txt",
        "val_imagepaths.txt",
    ]
    assert json.loads((root / "label_map.json").read_text()) == {"beach": 0, "forest": 1, "harbor": 2, "river": 3}
    splits = _split_files(root)
    assert _per_class(splits) == EXPECTED
    everything = splits["train"] + splits["val"] + splits["test"]
    images = sorted(
        str(p.relative_to(root)) for p in (root / "images").rglob("*") if p.parent.parent == root / "images"
    )
    images = [p for p in images if Path(p).suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff")]
    assert sorted(everything) == images and len(set(everything)) == 60  # each image in exactly one split
    record = json.loads((root / PROTOCOL_FILE).read_text())
    assert record["protocol"] == "fraction" and record["train_fraction"] == 0.8 and record["val_fraction"] == 0.25
    assert record["seed"] == 0 and record["skipped"] == 3 and record["images"] == {"train": 35, "val": 13, "test": 12}
    assert {cls: tuple(c.values()) for cls, c in record["per_class"].items()} == EXPECTED
    # the data config: the data config loader's, and a train config naming it, accept it; every split opens
    data = load_data_config(cfg_path)
    assert data.number_of_classes == 4 and data.dataset_path == str(root)
    shipped = json.loads((REPO / "data_configs" / "data_config.json").read_text())
    assert (data.transform_ops_train, data.transform_ops_val) == (
        shipped["transform_ops_train"],
        shipped["transform_ops_val"],
    )
    cfg = load_config(train_config(tmp_path / "train.json", cfg_path, tmp_path / "runs"))
    for split, n in zip(SPLITS, (35, 13, 12)):
        opened = open_split(cfg.data_config, split, evaluation=True)
        assert len(opened) == n
        image, label = opened[0]  # a JPEG, a PNG or a TIFF, decoded
        assert tuple(image.shape[-2:]) == (224, 224) and label == 0
    assert {Path(p).suffix for p in everything} == {".jpg", ".png", ".tif", ".JPEG", ".tiff", ".JPG"}
    # run again: nothing changes; another seed rewrites the splits (ours) and leaves the data config as it was
    before = {p: p.read_bytes() for p in [*root.iterdir(), cfg_path] if p.is_file()}
    proc = run_in_process("prepare_folders.py", root, "--data-config", cfg_path)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "wrote nothing: already prepared so"
    assert {p: p.read_bytes() for p in before} == before
    proc = run_in_process("prepare_folders.py", root, "--seed", "1", "--data-config", cfg_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == (
        "wrote: train_imagepaths.txt, val_imagepaths.txt, test_imagepaths.txt, split_protocol.json"
    )
    assert _per_class(_split_files(root)) == EXPECTED and _split_files(root) != splits


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    "case",
    [
        "data config exists",
        "data config is a folder",
        "a split file of the user's",
        "a class too small",
        "one class",
        "a class of folders",
        "no folder",
    ],
)
def test_a_bad_folder_or_output_is_one_line_and_nothing_moves(tmp_path, case):
    root = _folder_tree(tmp_path / "scenes")
    args = []
    if case == "data config exists":
        (tmp_path / "mine.json").write_text("{}")
        args, needles = ["--data-config", tmp_path / "mine.json"], ["--data-config", "already exists", "--force"]
    elif case == "data config is a folder":
        args, needles = ["--data-config", tmp_path], ["--data-config", "is a folder"]
    elif case == "a split file of the user's":
        (root / "test_imagepaths.txt").write_text("images/beach/beach00.jpg\n")
        needles = [f"{root / 'test_imagepaths.txt'}: already exists and is not a file this tool wrote", "--force"]
    elif case == "a class too small":
        (root / "lake").mkdir()
        class_image(0, 0, 8).save(root / "lake" / "only.png")
        needles = [f"{root / 'images' / 'lake'}: 1 image gives 1 train, 0 validation and 0 test", "one test image"]
    elif case == "one class":
        for cls in list(TREE)[1:]:
            shutil.rmtree(root / cls)
        needles = [f"{root}: found 1 class folder; a dataset needs at least 2"]
    elif case == "a class of folders":  # UC Merced's zip: UCMerced_LandUse/Images/<class>/
        (root / "Images" / "agricultural").mkdir(parents=True)
        needles = [f"{root / 'Images'}: no images", "it holds 1 folder:", f"pass {root / 'Images'} itself"]
    else:
        root = tmp_path / "nowhere"
        needles = [f"{root}: folder not found"]
    before = _snapshot(tmp_path)
    assert_user_error(run_in_process("prepare_folders.py", root, *args), *needles)
    assert _snapshot(tmp_path) == before
    if case in ("data config exists", "a split file of the user's"):  # --force replaces it
        assert run_in_process("prepare_folders.py", root, *args, "--force").returncode == 0
        assert (root / "test_imagepaths.txt").read_text() != "images/beach/beach00.jpg\n"


def test_published_lists_on_a_folder_dataset(tmp_path):
    """Lists as TorchGeo writes them (file names alone), an image missing from them, and one in two of them."""
    root = _folder_tree(tmp_path / "scenes")
    names = {cls: sorted(p.name for p in (root / cls).iterdir() if p.name.startswith(cls)) for cls in TREE}
    train = [n for cls in TREE for n in names[cls][2:]]
    val = [names[cls][0] for cls in TREE]
    test = [names[cls][1] for cls in TREE]
    lists = _lists(tmp_path, train, val, test)
    proc = run_in_process("prepare_folders.py", root, "--split-lists", *lists)
    assert proc.returncode == 0, proc.stderr
    assert _per_class(_split_files(root)) == {cls: (n - 2, 1, 1) for cls, (n, _) in TREE.items()}
    record = json.loads((root / PROTOCOL_FILE).read_text())
    assert record["protocol"] == "lists" and record["lists"]["val"]["path"] == str(lists[1])
    assert f"protocol: the split lists {lists[0]}, {lists[1]} and {lists[2]}, matched by file name" in proc.stdout
    before = _snapshot(root)
    _lists(tmp_path, train[1:], val, test)  # one image in no list
    assert_user_error(
        run_in_process("prepare_folders.py", root, "--split-lists", *lists),
        f"{root / 'images'}/beach/{train[0]}: an image in none of the split lists ({lists[0]}, {lists[1]}, {lists[2]})",
    )
    _lists(tmp_path, train, val, [*test, train[5]])
    assert_user_error(
        run_in_process("prepare_folders.py", root, "--split-lists", *lists),
        f"{lists[2]}:5: {train[5]}: already listed at {lists[0]}:6; an image belongs to one split",
    )
    assert _snapshot(root) == before


# --- NWPU-RESISC45: 45 classes of 700 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resisc(tmp_path_factory):
    """A generated NWPU-RESISC45, prepared once (the earlier split); each test leaves its index files as it likes."""
    root = make_resisc45_tree(tmp_path_factory.mktemp("resisc") / "NWPU-RESISC45")
    prepare.prepare_resisc45(root)
    return root


def _resisc(root, *args):
    proc = run_in_process("prepare_resisc45.py", root, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.slow
def test_resisc45_10_and_20_percent_protocols(resisc):
    lines = _resisc(resisc, "--train-fraction", "0.1")
    assert lines[:3] == [
        f"{resisc}: ready: 2835 train, 315 validation, 28350 test images",
        "protocol: per class, shuffled with seed 0: 10% train and validate (10% of that share validates), "
        "the rest test",
        "per class: 63 train, 7 validation, 630 test (each of the 45 classes)",
    ]
    ten = _split_files(resisc)
    assert set(_per_class(ten).values()) == {(63, 7, 630)} and len(_per_class(ten)) == 45  # train + val = 70
    assert len(set(ten["train"]) | set(ten["val"]) | set(ten["test"])) == 31500
    record = json.loads((resisc / PROTOCOL_FILE).read_text())
    assert record["dataset"] == "NWPU-RESISC45" and record["protocol"] == "fraction"
    assert (record["train_fraction"], record["val_fraction"], record["seed"]) == (0.1, 0.1, 0)
    assert record["per_class"]["wetland"] == {"train": 63, "val": 7, "test": 630}
    assert _resisc(resisc, "--train-fraction", "0.1", "--seed", "0")[-1] == "wrote nothing: already prepared so"
    assert _split_files(resisc) == ten  # the same seed, the same split
    _resisc(resisc, "--train-fraction", "0.1", "--seed", "1")
    assert _split_files(resisc)["test"] != ten["test"]  # another seed, another split
    lines = _resisc(resisc, "--train-fraction", "0.2", "--val-fraction", "0.25")
    assert lines[2] == "per class: 105 train, 35 validation, 560 test (each of the 45 classes)"  # train + val = 140
    twenty = _split_files(resisc)
    assert set(_per_class(twenty).values()) == {(105, 35, 560)}
    assert not set(twenty["train"]) & set(twenty["test"]) and not set(twenty["val"]) & set(twenty["test"])
    # back to the default: the earlier release's split, and split_protocol.json says so
    _resisc(resisc)
    assert _split_files(resisc)["val"][0] == "images/airplane/airplane_490.jpg"
    assert json.loads((resisc / PROTOCOL_FILE).read_text())["protocol"] == "earlier"


@pytest.mark.slow
def test_resisc45_lists_written_from_a_protocol_reproduce_it(resisc, tmp_path):
    _resisc(resisc, "--train-fraction", "0.2", "--seed", "7")
    made = {name: (resisc / name).read_bytes() for name in [*(SPLIT_FILES[s] for s in SPLITS), "label_map.json"]}
    # TorchGeo's form: file names alone, in any order
    names = {s: [p.rsplit("/", 1)[1] for p in paths][::-1] for s, paths in _split_files(resisc).items()}
    lists = _lists(tmp_path, names["train"], names["val"], names["test"])
    _resisc(resisc)  # another split in between
    lines = _resisc(resisc, "--split-lists", *lists)
    assert lines[2] == "per class: 126 train, 14 validation, 560 test (each of the 45 classes)"
    assert {name: (resisc / name).read_bytes() for name in made} == made
    assert json.loads((resisc / PROTOCOL_FILE).read_text())["lists"]["test"]["path"] == str(lists[2])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "extra", "in two lists", "no such list"])
def test_resisc45_lists_that_do_not_match_the_images_are_one_line(resisc, tmp_path, case):
    root = resisc
    names = {cls: [f"{cls}_{i:03d}.jpg" for i in range(1, 701)] for cls in RESISC45_CLASSES}
    train = [n for cls in sorted(names) for n in names[cls][:420]]
    val = [n for cls in sorted(names) for n in names[cls][420:560]]
    test = [n for cls in sorted(names) for n in names[cls][560:]]
    if case == "missing":
        test.insert(3, "airplane_701.jpg")
        needle = "resisc45-test.txt:4: airplane_701.jpg: listed but no class folder in"
    elif case == "extra":
        del val[140]
        needle = f"{root / 'images'}/airport/airport_421.jpg: an image in none of the split lists ("
    elif case == "in two lists":
        val.append("wetland_001.jpg")
        needle = "resisc45-val.txt:6301: wetland_001.jpg: already listed at"
    lists = _lists(tmp_path, train, val, test)
    if case == "no such list":
        os.unlink(lists[1])
        needle = f"{lists[1]}: split list not found"
    before = _snapshot(root)
    assert_user_error(run_in_process("prepare_resisc45.py", root, "--split-lists", *lists), needle)
    assert _snapshot(root) == before


@pytest.mark.slow
def test_resisc45_split_files_of_an_earlier_version_are_ours_and_a_users_are_not(resisc):
    """A folder an earlier version prepared (the earlier split, no split_protocol.json) takes another protocol; a
    split file the user edited is refused, naming it, until --force."""
    _resisc(resisc)
    (resisc / PROTOCOL_FILE).unlink()
    _resisc(resisc, "--train-fraction", "0.1")
    (resisc / "val_imagepaths.txt").write_text("images/airplane/airplane_001.jpg\n")  # the user's own
    before = _snapshot(resisc)
    assert_user_error(
        run_in_process("prepare_resisc45.py", resisc),
        f"{resisc / 'val_imagepaths.txt'}: already exists and is not a file this tool wrote",
    )
    assert _snapshot(resisc) == before
    _resisc(resisc, "--force")
    assert _split_files(resisc)["val"][0] == "images/airplane/airplane_490.jpg"
