"""predict.py, run as a user runs it: every file named gets a row in order (folders walked recursively, list
files, single paths), unreadable files become error rows, and the probabilities are the independent
computation's logits softmaxed, in FP32 and in a number format."""

import csv
import shutil

import numpy as np
import pytest
from conftest import (
    CLASSES,
    assert_user_error,
    class_image,
    data_config,
    near_tie_checkpoint,
    reference_logits,
    run_dir_of,
    run_in_process,
    run_script,
    train_config,
)
from PIL import Image


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("predict")
    data_cfg = data_config(tmp / "data.json", dataset, 3)
    cfg = train_config(tmp / "vit.json", data_cfg, tmp / "out", train={"epochs": 3})
    return tmp, cfg, run_dir_of(run_script("train.py", "-c", cfg, check=True)) / "last.pt", dataset


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_folder_with_nested_folders_a_corrupt_file_and_a_non_image(run, tmp_path):
    _, cfg, ckpt, _ = run
    folder = tmp_path / "scenes"
    (folder / "a" / "b").mkdir(parents=True)
    class_image(0, 1).save(folder / "z_top.png")
    class_image(1, 2).save(folder / "a" / "middle.jpg", quality=95)
    class_image(2, 3).save(folder / "a" / "b" / "deep.png")
    (folder / "a" / "broken.png").write_bytes((folder / "z_top.png").read_bytes()[:60])  # truncated
    (folder / "a" / "notes.txt").write_text("not an image")
    (folder / ".hidden").mkdir()
    class_image(0, 4).save(folder / ".hidden" / "skipped.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "wrong_size.png")  # no Resize in the ops
    single = tmp_path / "single.png"
    class_image(1, 5).save(single)
    proc = run_script(
        "predict.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt,
        folder,
        single,
        "--topk",
        "2",
        "--output",
        tmp_path / "p.csv",
        check=True,
    )
    rows = _rows(tmp_path / "p.csv")
    expected = [
        folder / "a" / "b" / "deep.png",
        folder / "a" / "broken.png",
        folder / "a" / "middle.jpg",
        folder / "a" / "notes.txt",
        folder / "wrong_size.png",
        folder / "z_top.png",
        single,
    ]
    assert [r["path"] for r in rows] == [str(p) for p in expected]
    assert list(rows[0]) == ["path", "top1", "prob1", "top2", "prob2", "error"]
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {
        str(folder / "a" / "broken.png"),
        str(folder / "a" / "notes.txt"),
        str(folder / "wrong_size.png"),
    }
    assert "cannot read image" in errors[str(folder / "a" / "notes.txt")]
    assert "makes it 40x40, the model takes 32x32" in errors[str(folder / "wrong_size.png")]
    for row in rows:
        if not row["error"]:
            assert row["top1"] in CLASSES and row["top2"] in CLASSES and row["top1"] != row["top2"]
            assert 1 >= float(row["prob1"]) >= float(row["prob2"]) > 0
        else:
            assert row["top1"] == row["prob1"] == ""
    assert "4 images predicted, top-2 each; 3 files could not be used" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("q_format", [None, "FP16_16"])
def test_probabilities_are_the_independent_logits_softmaxed(run, tmp_path, q_format):
    """A list file of the test split: FP32 (and FP16_16, bit for bit the independent reference) probabilities
    against the reference logits softmaxed; on a near-tie checkpoint, so that FP16 changes top-1s."""
    _, cfg, ckpt, dataset = run
    listed = tmp_path / "list.txt"
    shutil.copy(dataset / "test_imagepaths.txt", listed)  # paths relative to the list's folder: copy the images
    shutil.copytree(dataset / "images", tmp_path / "images")
    if q_format:
        ckpt = near_tie_checkpoint(ckpt, tmp_path / "near_tie.pt")
    flags = ["--q_format", q_format] if q_format else []
    run_script(
        "predict.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt,
        listed,
        "--topk",
        "3",
        *flags,
        "--output",
        tmp_path / "p.csv",
        check=True,
    )
    rows = _rows(tmp_path / "p.csv")
    assert [r["path"] for r in rows] == [str(tmp_path / line) for line in listed.read_text().split()]
    names = sorted(CLASSES)
    for fmt, prefix in [("FP32", "")] + ([(q_format, f"{q_format}_")] if q_format else []):
        logits, _ = reference_logits(cfg, ckpt, fmt)
        probs = logits.softmax(1)
        for row, p in zip(rows, probs):
            order = p.argsort(descending=True).tolist()
            got = [float(row[f"{prefix}prob{i}"]) for i in (1, 2, 3)]
            assert got == pytest.approx(p[order].tolist(), abs=2e-6)
            if (p[order[0]] - p[order[1]]).abs() > 1e-5:  # a tie may fall either way in the last bit
                assert row[f"{prefix}top1"] == names[order[0]]
    if q_format:
        fp32, _ = reference_logits(cfg, ckpt, "FP32")
        q, _ = reference_logits(cfg, ckpt, q_format)
        changed = (fp32.argmax(1) != q.argmax(1)).tolist()
        assert sum(changed) >= 2 and [bool(int(r["top1_changed"])) for r in rows] == changed


@pytest.mark.slow
def test_bad_input_is_one_line(run, tmp_path):
    _, cfg, ckpt, _ = run
    (tmp_path / "empty").mkdir()
    assert_user_error(
        run_in_process("predict.py", "-c", cfg, "--checkpoint", ckpt, tmp_path / "empty"),
        str(tmp_path / "empty"),
        "no files",
    )
    assert_user_error(
        run_in_process("predict.py", "-c", cfg, "--checkpoint", ckpt, tmp_path, "--q_format", "PyTorchINT8"),
        "--q_format",
        "test_quantize.py",
    )
    missing = run_script(
        "predict.py", "-c", cfg, "--checkpoint", ckpt, tmp_path / "gone.png", "--output", tmp_path / "p.csv", check=True
    )
    assert "1 files could not be used" in missing.stdout and "No such file" in _rows(tmp_path / "p.csv")[0]["error"]
