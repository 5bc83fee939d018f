"""Test-time augmentation (--tta of test.py, test_quantize.py and predict.py): the figures, the changed predictions
and the probabilities against an independent average of the softmax over the views (the views made here with
torch.flip, torch.rot90 and a transpose, the ViT computed from the checkpoint's deploy entry by
conftest.reference_forward); ``none`` is the plain evaluation bit for bit; the flag's errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_user_error,
    data_config,
    reference_images,
    reference_vit,
    run_dir_of,
    run_in_process,
    run_script,
    train_config,
)
from PIL import Image

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision import tta
from myrtle_vision.config import load_config
from myrtle_vision.weights.io import save_atomic

# seven classes, so that top-5 is not every class
CLASSES7 = ["beach", "bridge", "desert", "forest", "harbor", "meadow", "river"]
NAMES = sorted(CLASSES7)
SHARPEN = 4.0  # the class head's logits x 4: averaged probabilities then differ from averaged logits on some images


def oriented_image(cls: int, i: int, size: int = 32) -> Image.Image:
    """Pictures whose class is where a bright band lies (no colour tells them apart), so that turning or flipping
    one makes it look like another class, or none: classes 0-3 a horizontal band at rows 0, 8, 16 or 24, classes
    4-6 a vertical one at columns 0, 8 or 16 (a horizontal flip swaps 5 and 6), on noise."""
    rng = np.random.default_rng(7000 + 100 * cls + i)
    arr = rng.integers(0, 110, (size, size, 3), dtype=np.uint8)
    band = size // 4
    start = (cls % 4 if cls < 4 else cls - 4) * band + int(rng.integers(-1, 2))
    start = max(0, start)
    if cls < 4:
        arr[start : start + band] += 90
    else:
        arr[:, start : start + band] += 90
    return Image.fromarray(arr)


def oriented_dataset(root: Path, counts=(10, 4, 5)) -> Path:
    """conftest.make_dataset's layout (images/<class>/, label_map.json, the split lists) of oriented_image's."""
    splits = {"train": [], "val": [], "test": []}
    for c, name in enumerate(CLASSES7):
        (root / "images" / name).mkdir(parents=True)
        i = 0
        for split, n in zip(splits, counts):
            for _ in range(n):
                rel = f"images/{name}/{name}_{i:03d}.png"
                oriented_image(c, i).save(root / rel)
                splits[split].append(rel)
                i += 1
    (root / "label_map.json").write_text(json.dumps({n: i for i, n in enumerate(NAMES)}))
    for split, names in splits.items():
        (root / f"{split}_imagepaths.txt").write_text("\n".join(names) + "\n")
    return root


def independent_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views as the docs define them, written without the package: flip, the width reversed; dihedral, the 8
    symmetries of the square as the 4 quarter turns of the image and of its transpose (the same 8 images as the
    quarter turns of the horizontal flip, reached the other way)."""
    if mode == "none":
        return [images]
    if mode == "flip":
        return [images, images[..., torch.arange(images.shape[-1] - 1, -1, -1)]]
    assert mode == "dihedral"
    return [torch.rot90(x, k, dims=(2, 3)) for x in (images, images.transpose(2, 3)) for k in range(4)]


def squeezed_checkpoint(src: Path, dst: Path) -> Path:
    """``src`` with its class head's logits squeezed near 30 (weights x 0.02, bias x 0.02 + 30), where FP16 holds
    numbers every 1/64 only: FP16_16 then changes predictions under the views too, without making exact ties
    (conftest.near_tie_checkpoint's logits near 100 round to ties in FP16_16 here)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["model"]["mlp_head.1.weight"] *= 0.02
    ckpt["model"]["mlp_head.1.bias"] = ckpt["model"]["mlp_head.1.bias"] * 0.02 + 30
    torch.save(ckpt, dst)
    return dst


def reference_view_logits(cfg_path: Path, ckpt_path: Path, mode: str, q_format: str = "FP32", split: str = "test"):
    """Each view's logits (views x images x classes) and the labels, without the package (conftest.reference_vit on
    the images read and normalized by hand, each view made here)."""
    images, labels = reference_images(cfg_path, split)
    vit = reference_vit(cfg_path, ckpt_path)
    return torch.stack([vit(view, q_format) for view in independent_views(images, mode)]), torch.tensor(labels)


def reference_probs(cfg_path, ckpt_path, mode, q_format="FP32", split="test"):
    """The probabilities averaged over the views (the mean of each view's softmax), and the labels."""
    logits, labels = reference_view_logits(cfg_path, ckpt_path, mode, q_format, split)
    return logits.softmax(2).mean(0), labels


def counts(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """Per class: (images of it, of them predicted right, images predicted as it)."""
    return {
        name: (int((labels == c).sum()), int(((pred == c) & (labels == c)).sum()), int((pred == c).sum()))
        for c, name in enumerate(NAMES)
    }


def report_counts(per_class: dict) -> dict[str, tuple[int, int, int | None]]:
    """The same counts read back from a report's per-class support, recall and precision (the images predicted as
    a class: None where none of them is right, which precision 0 does not tell)."""
    out = {}
    for name, m in per_class.items():
        hits = round(m["recall"] * m["support"] / 100)
        out[name] = (m["support"], hits, round(100 * hits / m["precision"]) if hits else None)
    return out


def known(counted: dict) -> dict:
    """:func:`counts` with what :func:`report_counts` cannot read back left out."""
    return {name: (n, hits, predicted if hits else None) for name, (n, hits, predicted) in counted.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A ViT trained on seven classes, and the same checkpoint with its class head sharpened (x SHARPEN)."""
    tmp = tmp_path_factory.mktemp("tta")
    dataset = oriented_dataset(tmp / "data")
    data_cfg = data_config(tmp / "data.json", dataset, len(CLASSES7))
    cfg = train_config(tmp / "vit.json", data_cfg, tmp / "out", train={"epochs": 15})
    ckpt = run_dir_of(run_script("train.py", "-c", cfg, check=True)) / "last.pt"
    sharp = torch.load(ckpt, map_location="cpu", weights_only=True)
    for name in ("mlp_head.1.weight", "mlp_head.1.bias"):
        sharp["model"][name] = sharp["model"][name] * SHARPEN
    torch.save(sharp, tmp / "sharp.pt")
    return tmp, cfg, ckpt, tmp / "sharp.pt", dataset


# the shared implementation, on its own


@pytest.mark.parametrize("mode", ["none", "flip", "dihedral"])
def test_views_are_the_documented_ones_in_order(mode):
    x = torch.randn(3, 2, 5, 5)
    got = tta.views(x, mode)
    assert len(got) == tta.MODES[mode]
    # as a set, the independent definition's views; in order, the documented one
    assert sorted(v.sum(0).flatten().tolist() for v in got) == sorted(
        v.sum(0).flatten().tolist() for v in independent_views(x, mode)
    )
    flipped = x[..., torch.arange(4, -1, -1)]
    expected = {
        "none": [x],
        "flip": [x, flipped],
        "dihedral": [torch.rot90(v, k, (2, 3)) for v in (x, flipped) for k in range(4)],
    }[mode]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    if mode == "dihedral":  # all 8 distinct on a generic image
        assert len({tuple(v.flatten().tolist()) for v in got}) == 8


def test_dihedral_views_need_square_images():
    with pytest.raises(ValueError, match="square"):
        tta.views(torch.zeros(1, 3, 4, 6), "dihedral")
    assert len(tta.views(torch.zeros(1, 3, 4, 6), "flip")) == 2


def test_the_average_is_of_probabilities_and_one_view_is_the_logits_themselves():
    logits = torch.randn(4, 6) * 5
    assert tta.average([logits]) is logits  # tta none: nothing computed, the logits passed on
    assert torch.allclose(tta.log_mean_softmax([logits]).softmax(1), logits.softmax(1), atol=1e-7)
    outputs = [torch.randn(4, 6) * 5 for _ in range(8)]
    probs = torch.stack([o.softmax(1) for o in outputs]).mean(0)
    averaged = tta.average(outputs)
    assert torch.allclose(averaged.exp(), probs, atol=1e-6) and torch.allclose(averaged.softmax(1), probs, atol=1e-6)
    # not the average of the logits: two views fairly sure of class 0, one extremely sure of class 1
    three = [torch.tensor([[4.0, 0.0]]), torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 20.0]])]
    assert tta.average(three).argmax(1).item() == 0 and (sum(three) / 3).argmax(1).item() == 1
    # a class no view gives any probability stays finite
    far = tta.average([torch.tensor([[0.0, -200.0]]), torch.tensor([[0.0, -300.0]])])
    assert torch.isfinite(far).all() and far[0, 1] < -150


# test.py


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["flip", "dihedral"])
def test_test_py_figures_are_the_independent_average_over_the_views(run, mode):
    tmp, cfg, _, sharp, _ = run
    plain, labels = reference_probs(cfg, sharp, "none")
    probs, _ = reference_probs(cfg, sharp, mode)
    # the checks can fail: the views change predictions (and the per-class counts), and averaging the
    # probabilities is not averaging the logits
    assert (probs.argmax(1) != plain.argmax(1)).any()
    assert counts(probs.argmax(1), labels) != counts(plain.argmax(1), labels)
    view_logits, _ = reference_view_logits(cfg, sharp, mode)
    if mode == "dihedral":
        assert (view_logits.mean(0).argmax(1) != probs.argmax(1)).any()
    proc = run_in_process(
        "test.py", "-c", cfg, "--checkpoint", sharp, "--tta", mode, "--json", tmp / f"{mode}.json", "--device", "cpu"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp / f"{mode}.json").read_text())
    assert (result["tta"], result["views"], result["num_images"]) == (mode, tta.MODES[mode], 35)
    top5 = (probs.topk(5, 1).indices == labels[:, None]).any(1)
    assert result["top1"] == pytest.approx(100 * (probs.argmax(1) == labels).double().mean().item())
    assert result["top5"] == pytest.approx(100 * top5.double().mean().item())
    assert report_counts(result["per_class"]) == known(counts(probs.argmax(1), labels))
    for c, name in enumerate(NAMES):  # precision, where report_counts cannot read the count back from it
        predicted = probs.argmax(1) == c
        if predicted.any() and not (predicted & (labels == c)).any():
            assert result["per_class"][name]["precision"] == 0
    assert f"test-time augmentation {mode}: {tta.MODES[mode]} views" in proc.stdout
    assert f"top-1 {result['top1']:.2f}%" in proc.stdout
    # beside the plain report, not over it
    assert (sharp.parent / f"test_tta_{mode}_{sharp.stem}" / "confusion_matrix.png").exists()


@pytest.mark.slow
def test_tta_none_is_no_tta_bit_for_bit(run):
    tmp, cfg, ckpt, _, _ = run
    for script in ("test.py", "test_quantize.py"):
        reports = []
        for flags in ([], ["--tta", "none"]):
            path = tmp / f"{script}_{len(flags)}.json"
            proc = run_in_process(script, "-c", cfg, "--checkpoint", ckpt, *flags, "--json", path, "--device", "cpu")
            assert proc.returncode == 0, proc.stderr
            assert "test-time augmentation" not in proc.stdout
            reports.append(path.read_bytes())
        assert reports[0] == reports[1]
        assert json.loads(reports[0])["tta"] == "none" and json.loads(reports[0])["views"] == 1


@pytest.mark.slow
def test_deit_average_of_heads_averages_over_the_views_too(run, tmp_path):
    """A DeiT checkpoint: both figures against the model's own heads run on the independent views, each the
    softmax averaged over the views (the average of the heads: of their logits, view by view)."""
    _, cfg, ckpt_path, _, _ = run
    ckpt = ckpt_io.load(ckpt_path)
    g = torch.Generator().manual_seed(0)
    ckpt["distillation"] = {
        "dist_token": torch.randn(1, 1, 32, generator=g),
        "head_dist.weight": 0.1 * torch.randn(7, 32, generator=g),  # the size of the class head's logits
        "head_dist.bias": torch.zeros(7),
    }
    deit = tmp_path / "deit.pt"
    save_atomic(ckpt, deit)
    proc = run_in_process(
        "test.py",
        "-c",
        cfg,
        "--checkpoint",
        deit,
        "--tta",
        "dihedral",
        "--json",
        tmp_path / "r.json",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    model = ckpt_io.ready_model(load_config(cfg), ckpt, deit, distilled=True)
    images, labels = reference_images(cfg)
    labels = torch.tensor(labels)
    with torch.no_grad():
        heads = [model.forward_heads(v) for v in independent_views(images, "dihedral")]
        plain_c, plain_d = model.forward_heads(images)
    class_probs = torch.stack([c.softmax(1) for c, _ in heads]).mean(0)
    avg_probs = torch.stack([((c + d) / 2).softmax(1) for c, d in heads]).mean(0)
    assert (avg_probs.argmax(1) != ((plain_c + plain_d) / 2).argmax(1)).any()  # the views matter here too
    top1 = lambda p: 100 * (p.argmax(1) == labels).double().mean().item()  # noqa: E731
    assert result["top1"] == pytest.approx(top1(class_probs))
    assert result["average_heads"]["top1"] == pytest.approx(top1(avg_probs))
    assert "(also averaged over the 8 views)" in proc.stdout


# test_quantize.py


@pytest.mark.slow
@pytest.mark.parametrize("mode, q_format", [("flip", "FP16_32"), ("dihedral", "FP16_32"), ("dihedral", "FP16_16")])
def test_test_quantize_py_both_models_on_the_same_views(run, tmp_path, mode, q_format):
    """FP32 and quantized top-1, the changed predictions (their rows and margins) and the largest difference
    against the independent averages over the views, in FP16_32 and in FP16_16 (which the quantized ViT equals bit
    for bit; on a squeezed checkpoint, so that FP16 changes predictions under the views too)."""
    _, cfg, ckpt, _, _ = run
    if q_format == "FP16_16":
        ckpt = squeezed_checkpoint(ckpt, tmp_path / "squeezed.pt")
    proc = run_in_process(
        "test_quantize.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt,
        "--q_format",
        q_format,
        "--tta",
        mode,
        "--json",
        tmp_path / "q.json",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "q.json").read_text())
    assert (result["tta"], result["views"]) == (mode, tta.MODES[mode])
    ref, labels = reference_probs(cfg, ckpt, mode, "FP32")
    q, _ = reference_probs(cfg, ckpt, mode, q_format)
    plain_ref, _ = reference_probs(cfg, ckpt, "none", "FP32")
    plain_q, _ = reference_probs(cfg, ckpt, "none", q_format)
    # the views change both models' predictions here
    assert (ref.argmax(1) != plain_ref.argmax(1)).any() and (q.argmax(1) != plain_q.argmax(1)).any()
    top1 = lambda p: 100 * (p.argmax(1) == labels).double().mean().item()  # noqa: E731
    assert result["fp32"]["top1"] == pytest.approx(top1(ref))
    assert result["quantized"]["top1"] == pytest.approx(top1(q))
    changed = (ref.argmax(1) != q.argmax(1)).nonzero().flatten().tolist()
    assert result["changed_predictions"] == len(changed)
    if q_format == "FP16_16":
        assert len(changed) >= 2
    assert result["max_logit_diff"] == pytest.approx((ref.log() - q.log()).abs().max().item(), rel=1e-2)
    out = Path(result["output_dir"])
    assert out.name == f"test_{q_format}_tta_{mode}_{ckpt.stem}"
    rows = json.loads((out / "changed_predictions.json").read_text())
    assert len(rows) == len(changed)
    for row, i in zip(rows, changed):
        assert (row["fp32_prediction"], row["quantized_prediction"]) == (NAMES[ref[i].argmax()], NAMES[q[i].argmax()])
        for model, p in (("fp32", ref), ("quantized", q)):
            top2 = p[i].log().topk(2).values
            assert row[f"{model}_margin"] == pytest.approx((top2[0] - top2[1]).item(), abs=1e-4)
    averaged = f"largest logit difference (of the log of the probabilities averaged over {tta.MODES[mode]} views)"
    assert averaged in proc.stdout and "both models see the same views" in proc.stdout


# predict.py


@pytest.mark.slow
def test_predict_py_probabilities_are_the_independent_averaged_softmax(run, tmp_path):
    """FP32 and FP16_16 (whose ViT is the reference's bit for bit) probabilities of every test image against the
    softmax averaged over the independent views."""
    _, cfg, _, sharp, dataset = run
    listed = tmp_path / "list.txt"
    shutil.copy(dataset / "test_imagepaths.txt", listed)
    shutil.copytree(dataset / "images", tmp_path / "images")
    proc = run_in_process(
        "predict.py",
        "-c",
        cfg,
        "--checkpoint",
        sharp,
        listed,
        "--topk",
        "3",
        "--q_format",
        "FP16_16",
        "--tta",
        "dihedral",
        "--output",
        tmp_path / "p.csv",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    assert "(the softmax averaged over 8 views, --tta dihedral)" in proc.stdout
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 35
    plain, _ = reference_probs(cfg, sharp, "none")
    for fmt, prefix in (("FP32", ""), ("FP16_16", "FP16_16_")):
        probs, _ = reference_probs(cfg, sharp, "dihedral", fmt)
        assert (probs - plain).abs().max() > 0.05  # what the views change is far above the tolerance below
        for row, p in zip(rows, probs, strict=True):
            order = p.argsort(descending=True).tolist()
            assert [float(row[f"{prefix}prob{i}"]) for i in (1, 2, 3)] == pytest.approx(p[order[:3]].tolist(), abs=2e-6)
            if p[order[0]] - p[order[1]] > 1e-5:
                assert row[f"{prefix}top1"] == NAMES[order[0]]


# bad input


@pytest.mark.parametrize("script", ["test.py", "test_quantize.py", "predict.py"])
def test_an_unknown_mode_is_argparses_error(script, tmp_path):
    extra = [str(tmp_path)] if script == "predict.py" else []
    proc = run_in_process(script, "-c", tmp_path / "none.json", *extra, "--tta", "rotate")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--tta: invalid choice: 'rotate'" in proc.stderr and "flip" in proc.stderr and "dihedral" in proc.stderr


def test_tta_with_per_layer_is_refused_in_one_line(tmp_path):
    assert_user_error(
        run_in_process("test_quantize.py", "-c", tmp_path / "none.json", "--per-layer", "--tta", "flip"),
        "--tta flip",
        "--per-layer",
    )
