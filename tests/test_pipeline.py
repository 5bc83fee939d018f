"""The data pipeline: the decoded-image cache, transforms of a whole batch on its device against
torchvision's per-image transforms, and a training step that waits for the device once per update."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CLASSES, data_config, make_dataset, script_env, train_config
from PIL import Image
from torchvision.transforms import v2 as T

import myrtle_vision
from myrtle_vision.config import load_config, load_data_config
from myrtle_vision.data import ImageListDataset, cache, eval_loader, open_split
from myrtle_vision.data.augment import InWorkers, OnDevice, PerImage, pipeline_for
from myrtle_vision.errors import UserError
from myrtle_vision.training import Trainer
from myrtle_vision.transforms import parse_ops

CPU = torch.device("cpu")


# --- the decoded-image cache ----------------------------------------------------------------------


@pytest.fixture
def varied(tmp_path):
    """Three classes of images of several sizes and modes (grayscale and palette too), and a data config."""
    ds = make_dataset(tmp_path / "ds", CLASSES, counts=(4, 2, 2))
    for k, path in enumerate(sorted(ds.glob("images/*/*.png"))):
        img = Image.open(path).resize((20 + 3 * (k % 4), 18 + 5 * (k % 3)))
        (img.convert("L") if k % 5 == 0 else img.convert("P") if k % 7 == 0 else img).save(path)
    return ds, data_config(tmp_path / "d.json", ds, 3, cache_dir=str(tmp_path / "cache"))


def _decoded(split) -> list[torch.Tensor]:
    """Every image of the split decoded from its file now, without the cache."""
    return [torch.from_numpy(split.decode(i).copy()).permute(2, 0, 1) for i in range(len(split))]


def test_cache_is_built_once_reused_and_gives_the_decoded_pixels(varied, capsys):
    ds, cfg_path = varied
    cfg = load_data_config(cfg_path)
    first = open_split(cfg, "train")
    assert "decoding its 12 images once" in capsys.readouterr().out
    pixels = sorted((ds.parent / "cache").glob("*.u8"))
    assert len(pixels) == 1 and pixels[0].stat().st_size == sum(i.numel() for i in _decoded(first))
    built = pixels[0].stat().st_mtime_ns
    again = open_split(cfg, "train")
    assert capsys.readouterr().out == "" and pixels[0].stat().st_mtime_ns == built  # reused, not rebuilt
    for a, b in zip(_decoded(first), (again.image(i) for i in range(len(again)))):
        assert torch.equal(a, b)  # the same pixels as decoding the file, every size and mode
    assert again.decoded is not None and again.decoded.size(3) == tuple(_decoded(first)[3].shape[-2:])


def test_cache_is_rebuilt_when_an_image_or_the_split_file_changes(varied, capsys):
    ds, cfg_path = varied
    cfg = load_data_config(cfg_path)
    split = open_split(cfg, "train")
    capsys.readouterr()
    victim = split.paths[5]
    Image.fromarray(np.full((9, 11, 3), 200, dtype=np.uint8)).save(victim)
    changed = open_split(cfg, "train")
    assert f"cannot be reused ({victim} changed); decoding again" in capsys.readouterr().out
    assert changed.image(5).shape == (3, 9, 11) and bool((changed.image(5) == 200).all())
    listing = ds / "train_imagepaths.txt"
    listing.write_text("\n".join(listing.read_text().split()[:-1]) + "\n")
    shorter = open_split(cfg, "train")
    assert "decoding again" in capsys.readouterr().out and len(shorter) == 11
    assert all(torch.equal(a, shorter.image(i)) for i, a in enumerate(_decoded(shorter)))


def test_a_cache_missing_its_pixels_or_with_a_broken_index_is_built_again(varied, capsys):
    cfg = load_data_config(varied[1])
    split = open_split(cfg, "train")
    expected = _decoded(split)
    for spoil, why in (
        (lambda: split.decoded.pixels_path.unlink(), "its pixels file is missing"),
        (lambda: split.decoded.pixels_path.write_bytes(b"short"), "its pixels file is incomplete"),
        (lambda: split.decoded.index_path.write_text("{"), "its index cannot be read"),
        (lambda: split.decoded.index_path.write_text("{}"), "made by another version of myrtle_vision or Pillow"),
    ):
        spoil()
        capsys.readouterr()
        again = open_split(cfg, "train")
        out = capsys.readouterr().out
        assert f"cannot be reused ({why}); decoding again" in out, out
        assert all(torch.equal(a, again.image(i)) for i, a in enumerate(expected))


def test_cache_problems_are_one_line_errors(varied, tmp_path):
    ds, cfg_path = varied
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    cfg = load_data_config(data_config(tmp_path / "d2.json", ds, 3, cache_dir=str(blocked / "cache")))
    with pytest.raises(UserError, match="cannot write the decoded-image cache .* set .*: cache_dir"):
        open_split(cfg, "train")
    victim = sorted(ds.glob("images/dog/*.png"))[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match=f"{victim}: cannot read image"):  # found when the cache is built
        open_split(load_data_config(cfg_path), "train")
    assert not list((ds.parent / "cache").glob(".*.tmp*"))  # the unfinished build left nothing behind


def test_without_the_cache_images_are_decoded_as_they_are_read(varied, tmp_path):
    ds, _ = varied
    cfg = load_data_config(data_config(tmp_path / "d3.json", ds, 3, decode_cache=False))
    split = open_split(cfg, "test")
    assert split.decoded is None and all(torch.equal(a, split.image(i)) for i, a in enumerate(_decoded(split)))


# --- what the cache promises (see the docstring of myrtle_vision.data.cache) -----------------------


def _stat(**changed) -> SimpleNamespace:
    """An image file's stat result (the fields cache.stamp may read), with ``changed`` fields changed."""
    fields = dict(
        st_size=1234,
        st_mtime_ns=1_700_000_000_123_456_789,
        st_ctime_ns=1_700_000_000_223_456_789,
        st_ino=98765,
        st_atime_ns=1_700_000_500_000_000_000,
        st_nlink=1,
        st_mode=0o100644,
        st_dev=2049,
    )
    return SimpleNamespace(**{**fields, **changed})


@pytest.mark.parametrize("field", ["st_size", "st_mtime_ns", "st_ctime_ns", "st_ino"])
def test_each_part_of_an_image_s_stamp_alone_changes_it(field):
    assert cache.stamp(_stat(**{field: getattr(_stat(), field) + 1})) != cache.stamp(_stat())


def test_reading_an_image_does_not_change_its_stamp():
    """Reading a file changes its access time: that must not make the cache decode it again."""
    assert cache.stamp(_stat(st_atime_ns=_stat().st_atime_ns + 10**9)) == cache.stamp(_stat())


def _png(value: int, shape=(9, 11)) -> bytes:
    """An uncompressed PNG of one grey level: its size in bytes depends on its shape alone."""
    out = io.BytesIO()
    Image.fromarray(np.full((*shape, 3), value, dtype=np.uint8)).save(out, "PNG", compress_level=0)
    return out.getvalue()


@pytest.fixture
def stamps_only(monkeypatch):
    """No image counts as racy, so none is hashed: whatever the cache sees, the stamps alone saw."""
    monkeypatch.setattr(cache, "RACY_NS", -(1 << 62))


def _cached_victim(varied, capsys) -> tuple:
    """The data config, and its sixth training image made a 9 x 11 uncompressed PNG of level 100 and then decoded
    into the cache; a moment later (past the tick of its last change, on any clock)."""
    cfg = load_data_config(varied[1])
    victim = Path(open_split(cfg, "train").paths[5])
    victim.write_bytes(_png(100))
    assert bool((open_split(cfg, "train").image(5) == 100).all())
    capsys.readouterr()
    time.sleep(0.05)
    return cfg, victim


def _decoded_again(cfg, capsys, victim, level: int):
    split = open_split(cfg, "train")
    out = capsys.readouterr().out
    assert f"cannot be reused ({victim} changed); decoding again" in out, out
    assert split.image(5).shape == (3, 9, 11) and bool((split.image(5) == level).all())
    assert open_split(cfg, "train").image(5).equal(split.image(5)) and capsys.readouterr().out == ""  # then reused


def _same(before, victim, *fields):
    after = os.stat(victim)
    for field in fields:
        assert getattr(after, field) == getattr(before, field), field


def test_a_same_size_edit_in_place_with_its_modification_time_restored_is_seen(varied, capsys, stamps_only):
    cfg, victim = _cached_victim(varied, capsys)
    before = os.stat(victim)
    with open(victim, "r+b") as f:  # other pixels, the same number of bytes, the same file
        f.write(_png(200))
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    _same(before, victim, "st_size", "st_mtime_ns", "st_ino")  # only its status-change time tells
    _decoded_again(cfg, capsys, victim, 200)


def test_a_copy_keeping_the_modification_time_over_an_image_is_seen(varied, capsys, stamps_only, tmp_path):
    """``cp -p`` (shutil.copy2) of another image of the same size, whose modification time is the victim's."""
    cfg, victim = _cached_victim(varied, capsys)
    before = os.stat(victim)
    other = tmp_path / "other.png"
    other.write_bytes(_png(200))
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    shutil.copy2(other, victim)
    _same(before, victim, "st_size", "st_mtime_ns", "st_ino")
    _decoded_again(cfg, capsys, victim, 200)


def test_an_image_renamed_over_another_is_seen(varied, capsys, stamps_only):
    """Written beside it (an editor's or rsync's way), given its modification time, renamed over it."""
    cfg, victim = _cached_victim(varied, capsys)
    before = os.stat(victim)
    incoming = victim.with_name(".incoming.png")
    incoming.write_bytes(_png(200))
    os.utime(incoming, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(incoming, victim)
    _same(before, victim, "st_size", "st_mtime_ns")
    assert os.stat(victim).st_ino != before.st_ino
    _decoded_again(cfg, capsys, victim, 200)


def test_an_image_changed_during_the_build_is_decoded_again(varied, capsys, stamps_only, monkeypatch):
    """The stamps are taken before anything is decoded: an image rewritten just after its bytes were decoded
    (the cache holds the old pixels) is decoded again when the split is next opened."""
    cfg, victim = _cached_victim(varied, capsys)
    listing = varied[0] / "train_imagepaths.txt"
    listing.write_text(listing.read_text() + "\n")  # the split file changed: the cache is built again
    decode, rewritten = ImageListDataset.decode, []

    def decode_then_rewrite(self, index, *args):
        pixels = decode(self, index, *args)
        if self.paths[index] == str(victim) and not rewritten:
            victim.write_bytes(_png(200))
            rewritten.append(index)
        return pixels

    monkeypatch.setattr(ImageListDataset, "decode", decode_then_rewrite)
    during = open_split(cfg, "train")
    assert rewritten == [5] and bool((during.image(5) == 100).all())  # decoded before the change
    monkeypatch.setattr(ImageListDataset, "decode", decode)
    capsys.readouterr()
    _decoded_again(cfg, capsys, victim, 200)


@pytest.mark.slow
def test_the_split_file_s_order_and_text_decide_too(varied, capsys):
    ds, cfg_path = varied
    cfg = load_data_config(cfg_path)
    first = open_split(cfg, "train")
    listing = ds / "train_imagepaths.txt"
    listing.write_text("\n".join(reversed(listing.read_text().split())) + "\n")
    capsys.readouterr()
    backwards = open_split(cfg, "train")
    assert "(the split file changed); decoding again" in capsys.readouterr().out
    assert backwards.paths == first.paths[::-1]
    assert all(torch.equal(backwards.image(i), a) for i, a in enumerate(_decoded(first)[::-1]))
    # a split opened before, and its loader workers, still read the pixels it was opened with (a file held open,
    # not the one now at the path)
    assert all(torch.equal(first.image(i), a) for i, a in enumerate(_decoded(first)))
    through_a_worker = [images[0] for images in eval_loader(first.decoded, 1, num_workers=1)]
    assert all(torch.equal(b, a) for a, b in zip(_decoded(first), through_a_worker, strict=True))
    listing.write_text(listing.read_text() + "\n\n")  # the same paths, other text
    spaced = open_split(cfg, "train")
    assert spaced.paths == backwards.paths and "(the split file changed)" in capsys.readouterr().out


def test_a_racy_image_is_checked_by_the_hash_of_the_bytes_decoded(varied, capsys, monkeypatch):
    """On a file system whose clock did not tick between the build and an edit (frozen here: every stamp's times
    are one moment, within the build's racy window), a same-size edit in place leaves the stamp as it was, and
    only the hash of the bytes decoded sees it."""
    frozen = time.time_ns()
    monkeypatch.setattr(cache, "stamp", lambda st: [st.st_size, frozen, frozen, st.st_ino])
    monkeypatch.setattr(cache, "RACY_NS", 3600 * 10**9)  # (however slow this machine is today)
    cfg, victim = _cached_victim(varied, capsys)
    index_path = open_split(cfg, "train").decoded.index_path
    assert capsys.readouterr().out == ""  # racy, unchanged: reused (after hashing)
    hashes = json.loads(index_path.read_text())["hashes"]
    assert len(hashes) == 12 and hashes["5"] == hashlib.sha256(victim.read_bytes()).hexdigest()
    with open(victim, "r+b") as f:
        f.write(_png(200))
    _decoded_again(cfg, capsys, victim, 200)
    # found unchanged by a check that began more than the racy window after their last change, the hashes go
    monkeypatch.setattr(cache, "RACY_NS", 0)  # (the window ends at the moment of the frozen stamps)
    assert bool((open_split(cfg, "train").image(5) == 200).all()) and capsys.readouterr().out == ""
    assert json.loads(index_path.read_text())["hashes"] == {}


_OPEN_THE_SPLIT = r"""
import hashlib, json, os, sys, time
from PIL import Image

opened, real_open = [], Image.open

def counted_slow_open(*args, **kwargs):  # every decode starts here; slow, so that the processes overlap
    opened.append(args[0])
    time.sleep(0.05)
    return real_open(*args, **kwargs)

Image.open = counted_slow_open
from myrtle_vision.config import load_data_config
from myrtle_vision.data import open_split

ready, go, cfg_path = sys.argv[1:4]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
split = open_split(load_data_config(cfg_path), "train")
pixels = hashlib.sha256(b"".join(split.image(i).numpy().tobytes() for i in range(len(split)))).hexdigest()
print(json.dumps({"decoded": len(opened), "pixels": pixels}))
"""


@pytest.mark.slow
def test_processes_started_together_decode_the_images_once(varied, tmp_path):
    """Three processes open the same split at the same moment: one decodes each image once, the others wait
    for it, and all read the pixels PIL gives (counted and checked outside the package)."""
    ds, cfg_path = varied
    expected = hashlib.sha256(
        b"".join(
            np.asarray(Image.open(ds / line).convert("RGB")).transpose(2, 0, 1).tobytes()
            for line in (ds / "train_imagepaths.txt").read_text().split()
        )
    ).hexdigest()
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{k}" for k in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_THE_SPLIT, str(r), str(go), str(cfg_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=script_env(),
        )
        for r in ready
    ]
    try:
        deadline = time.monotonic() + 300
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not start"
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    reports = [json.loads(out.splitlines()[-1]) for out, _ in results]
    assert sorted(r["decoded"] for r in reports) == [0, 0, 12], reports  # 12 images, decoded once in all
    assert sum("decoding its 12 images once" in out for out, _ in results) == 1
    assert [r["pixels"] for r in reports] == [expected] * 3


# --- transforms of a whole batch on its device ---------------------------------------------------

CHAINS = {
    "Resisc45 training": {"RandomResizedCrop": 24, "RandomHorizontalFlip": None},
    "Resisc45 evaluation": {"Resize": 28, "CenterCrop": 24},
    "shorter side, vertical flip": {"Resize": {"shorter_side": 26}, "CenterCrop": 22, "RandomVerticalFlip": 0.5},
    "padded random crop": {"RandomCrop": {"size": 24, "padding": 3}, "RandomHorizontalFlip": 0.3},
    "crop larger than the image": {"CenterCrop": 40},
    "two resizes": {
        "Resize": [20, 30],
        "RandomResizedCrop": {"size": [12, 14], "scale": [0.2, 1.0], "ratio": [0.5, 2.0]},
    },
    "shrinking a lot": {"RandomResizedCrop": {"size": 8, "scale": [0.5, 1.0]}},
    # quarter turns and transposes: on the device a transposed image's rows come from its decoded columns
    "aerial training: quarter turns and a flip": {
        "RandomResizedCrop": 24,
        "RandomRotation90": None,
        "RandomHorizontalFlip": None,
    },
    "all eight symmetries, non-square before the crop": {
        "Resize": {"shorter_side": 26},
        "RandomTranspose": None,
        "RandomRotation90": None,
        "RandomVerticalFlip": 0.5,
        "CenterCrop": 22,
    },
    "quarter turns, then a non-square resize": {"RandomRotation90": None, "Resize": [20, 30], "CenterCrop": [18, 26]},
    "transpose, then a padded non-square random crop": {
        "RandomTranspose": 0.5,
        "RandomCrop": {"size": [20, 26], "padding": 2},
        "RandomVerticalFlip": 0.5,
    },
    "quarter turns between crops": {"CenterCrop": [20, 24], "RandomRotation90": None, "RandomCrop": 18},
    "transpose, then a non-square crop": {"RandomTranspose": 0.5, "CenterCrop": [20, 26]},
    "symmetries last": {
        "RandomResizedCrop": {"size": 16, "scale": [0.3, 1.0]},
        "RandomTranspose": 0.7,
        "RandomRotation90": None,
    },
}


class _QuarterTurns:
    """The reference RandomRotation90, from its definition: k drawn by torch.randint(4) at the op's place in
    the chain, then torch.rot90 (counter-clockwise)."""

    def __call__(self, image):
        return torch.rot90(image, int(torch.randint(4, ())), (-2, -1))


class _Transpose:
    """The reference RandomTranspose: torchvision's flips' coin (rand < p), then the tensor's transpose."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image):
        return image.transpose(-2, -1) if torch.rand(1) < self.p else image


def _reference(ops):
    """torchvision's per-image pipeline for ``ops``, as a function of (image, seed): torchvision's transforms
    by name, and the two torchvision lacks written here, none of them the package's."""
    written_here = {"RandomRotation90": _QuarterTurns, "RandomTranspose": _Transpose}
    compose = T.Compose(
        [T.ToImage()]
        + [
            (written_here[name] if name in written_here else getattr(T, name))(**kwargs)
            for name, kwargs in parse_ops(ops)
        ]
    )

    def sample(image, seed):
        torch.manual_seed(seed)
        return compose(image)

    return sample


def _images(sizes, dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g).to(dtype) for h, w in sizes]


def _both(ops, images, seeds):
    """(the batch transformed on the device, the reference per-image pipeline's images) for the same seeds."""
    on_device, reference = OnDevice(parse_ops(ops)), _reference(ops)
    batch = on_device.collate([(on_device.sample(img, s), 0) for img, s in zip(images, seeds)])
    out, _ = on_device.finish(batch, CPU)
    return out, torch.stack([reference(img, s).float() for img, s in zip(images, seeds)])


@pytest.mark.parametrize("chain", CHAINS)
def test_a_batch_on_the_device_gives_torchvision_s_images(chain):
    ops = CHAINS[chain]
    sizes = [(32, 32), (30, 36), (33, 31), (32, 40), (36, 30), (32, 32)] * 2
    if "RandomCrop" in ops:  # a random crop needs every image at least as large as the crop (after padding)
        sizes = [(24, 24), (26, 25), (30, 28), (24, 31), (27, 27), (25, 24)] * 2
    seeds = [11 * i for i in range(1, 13)]  # images turned every way, and transposed or not, in one batch
    out, reference = _both(ops, _images(sizes), seeds)
    assert out.shape == reference.shape and out.dtype == torch.float32
    levels = (out * 255 - reference).abs()
    # torchvision's CPU kernel for uint8 rounds after each of its two passes, and after each resize; the batch
    # rounds once: at most a level apart per resize (two resizes do differ by 2 somewhere: measured), and a
    # chain without a resize (crops, padding, flips, quarter turns, transposes) moves pixels only: exactly equal
    resizes = sum(op in ("Resize", "RandomResizedCrop") for op in ops)
    assert levels.max() <= resizes + 1e-3 and levels.mean() < 0.35
    # on float images torchvision rounds nothing: the same function to float rounding
    out_f, reference_f = _both(ops, _images(sizes, torch.float32), seeds)
    assert out_f.shape == reference_f.shape
    # (the batch rounds to uint8 levels, as the per-image path does for uint8 images)
    assert ((out_f * 255 - reference_f).abs() <= 0.5 + 1e-3).all()


@pytest.mark.parametrize("chain", CHAINS)
def test_the_lean_per_image_path_is_exactly_torchvision_s_pipeline(chain):
    """In the workers, geometric ops are applied with the functional kernels torchvision's transforms call,
    skipping their per-call overhead: the same images, bit for bit, as torchvision's Compose (and the
    package's per-image pipeline is that Compose)."""
    ops = CHAINS[chain]
    sizes = (
        [(24, 24), (26, 25), (30, 28), (24, 31)] if "RandomCrop" in ops else [(32, 32), (30, 36), (33, 31), (40, 32)]
    )
    parsed = parse_ops(ops)
    lean, per_image, reference = InWorkers(parsed), PerImage(parsed), _reference(ops)
    for image, seed in zip(_images(sizes * 2), range(7, 15)):
        expected = reference(image, seed)
        assert torch.equal(lean.sample(image, seed), expected) and torch.equal(per_image.sample(image, seed), expected)


@pytest.mark.parametrize("op, reference", [("RandomRotation90", _QuarterTurns()), ("RandomTranspose", _Transpose())])
def test_quarter_turns_and_transposes_of_a_non_square_image_move_its_pixels(op, reference):
    """On a 5 x 7 image every path gives torch.rot90 (or the transpose) of the pixels, with the parameter the
    reference draws from the same seed; the batch of one image on the device too, 7 x 5 where it turned."""
    image = _images([(5, 7)])[0]
    parsed = parse_ops({op: None})
    on_device = OnDevice(parsed)
    shapes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        expected = reference(image)
        shapes.add(tuple(expected.shape))
        for pipeline in (PerImage(parsed), InWorkers(parsed)):
            assert torch.equal(pipeline.sample(image, seed), expected), (pipeline, seed)
        out, _ = on_device.finish(on_device.collate([(on_device.sample(image, seed), 0)]), CPU)
        assert out.shape[1:] == expected.shape and ((out[0] * 255 - expected).abs() < 1e-3).all(), seed
    assert shapes == {(3, 5, 7), (3, 7, 5)}


def test_resampling_matrices_are_torch_s_antialiased_interpolation():
    from myrtle_vision.data.augment import resample_weights

    for n_in, n_out in ((37, 11), (11, 37), (64, 64), (256, 224), (57, 224)):
        x = torch.randn(1, 1, n_in, 5, dtype=torch.float64)
        w = resample_weights(torch.tensor([n_in]), torch.tensor([n_out]), n_out, n_in).double()
        expected = torch.nn.functional.interpolate(
            x, size=(n_out, 5), mode="bilinear", antialias=True, align_corners=False
        )
        torch.testing.assert_close(torch.matmul(w[0], x[0, 0]), expected[0, 0], rtol=1e-5, atol=1e-5)


def test_parameters_are_drawn_as_torchvision_draws_them():
    """Over many seeds the crops and flips drawn for the batch path have torchvision's distribution: the
    same transforms' own make_params, called in the order their forward calls them."""
    ops = {"RandomResizedCrop": {"size": 24, "scale": [0.08, 1.0]}, "RandomHorizontalFlip": 0.3}
    on_device = OnDevice(parse_ops(ops))
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    ours = np.array([on_device.sample(image, seed)[1] for seed in range(4000)])
    crop = T.RandomResizedCrop(24, scale=(0.08, 1.0))
    torch.manual_seed(12345)  # torchvision's own draws, from other random numbers
    theirs = []
    for _ in range(4000):
        p = crop.make_params([image])
        theirs.append([p["top"], p["left"], p["height"], p["width"], float(torch.rand(1) < 0.3)])
    theirs = np.array(theirs)
    for column in range(5):  # mean and spread of top, left, height, width and the flip, within a few standard errors
        se = theirs[:, column].std() / math.sqrt(len(theirs)) * math.sqrt(2)
        assert abs(ours[:, column].mean() - theirs[:, column].mean()) < 4 * se + 1e-9, column
        assert abs(ours[:, column].std() - theirs[:, column].std()) < 0.1 * theirs[:, column].std() + 1e-9, column
    area = ours[:, 2] * ours[:, 3] / (40 * 60)
    assert 0.05 < area.min() and area.max() <= 1.0 and abs(ours[:, 4].mean() - 0.3) < 0.03


@pytest.mark.slow
def test_quarter_turns_and_transposes_are_drawn_uniformly_and_with_probability_p():
    """k is uniform over 0..3 and the transpose's coin comes up with probability p, drawn seed by seed
    exactly as the reference draws them: in the chain's order, from torch seeded with the sample's seed."""
    ops = {"RandomRotation90": None, "RandomTranspose": 0.3}
    on_device = OnDevice(parse_ops(ops))
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    ours = np.array([on_device.sample(image, seed)[1] for seed in range(4000)])
    counts = np.bincount(ours[:, 0].astype(int))
    assert len(counts) == 4 and (abs(counts - 1000) < 4 * math.sqrt(4000 * 0.25 * 0.75)).all(), counts
    assert set(ours[:, 1]) == {0.0, 1.0} and abs(ours[:, 1].mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    theirs = []
    for seed in range(4000):
        torch.manual_seed(seed)
        theirs.append([int(torch.randint(4, ())), float(torch.rand(1) < 0.3)])
    assert np.array_equal(ours, np.array(theirs))


def test_which_ops_run_on_the_device():
    batchable = {"RandomResizedCrop": 16, "RandomHorizontalFlip": None}
    symmetries = {"RandomRotation90": None, "RandomTranspose": 0.5, "CenterCrop": 16}
    assert isinstance(pipeline_for(symmetries, "auto", torch.device("cuda")), OnDevice)
    assert isinstance(pipeline_for(symmetries, "auto", CPU), InWorkers)
    assert isinstance(pipeline_for(batchable, "auto", torch.device("cuda")), OnDevice)
    assert isinstance(pipeline_for(batchable, "auto", CPU), InWorkers)
    assert isinstance(pipeline_for(batchable, "device", CPU), OnDevice)
    assert isinstance(pipeline_for({**batchable, "ColorJitter": 0.4}, "auto", torch.device("cuda")), PerImage)
    assert isinstance(pipeline_for(batchable, "workers", torch.device("cuda")), InWorkers)


def test_augment_on_errors_name_the_field(tmp_path, dataset):
    from myrtle_vision.errors import ConfigError

    jitter = data_config(tmp_path / "j.json", dataset, 3, train_ops={"ColorJitter": 0.4}, augment_on="device")
    with pytest.raises(
        ConfigError, match="augment_on: device: transform_ops_train has ColorJitter, which runs per image only"
    ):
        load_data_config(jitter)
    with pytest.raises(ConfigError, match="augment_on: 'gpu' is not one of auto, device, workers"):
        load_data_config(data_config(tmp_path / "g.json", dataset, 3, augment_on="gpu"))


@pytest.mark.slow
def test_device_augmentation_with_workers_feeds_the_same_batches(varied, tmp_path):
    """A split loaded by workers and transformed on the device equals the per-image loader's batches."""
    ds, _ = varied
    ops = {"Resize": [20, 20], "CenterCrop": 16, "Normalize": {"Mean": [0.5] * 3, "Std": [0.25] * 3}}
    results = {}
    for where in ("device", "workers"):
        cfg = load_data_config(
            data_config(
                tmp_path / f"{where}.json", ds, 3, val_ops=ops, augment_on=where, cache_dir=str(tmp_path / "cache")
            )
        )
        loader = eval_loader(open_split(cfg, "val"), 4, num_workers=2)
        # workers come from a fork server, never from forking this (threaded) process: see loaders._worker_context
        assert loader.loader.multiprocessing_context.get_start_method() == "forkserver"
        results[where] = list(loader)
    for (a, la), (b, lb) in zip(results["device"], results["workers"]):
        assert torch.equal(la, lb) and ((a - b).abs() * 255 * 0.25 <= 1 + 1e-3).all()


# --- the training step ---------------------------------------------------------------------------


@pytest.mark.parametrize("clip_grad", [None, 0.5])
def test_the_step_reads_the_device_once_per_update(tmp_path, data_cfg, monkeypatch, clip_grad):
    """Four micro-batches per update, and one reading of a tensor's value by the host, after them. On the
    CPU this is counted by wrapping every way a tensor's value reaches Python: no read at all happens
    before the update's statistics are read, and the package reads nothing else (after it, the optimizer
    reads its own step counts, which live on the CPU on every device)."""
    cfg = load_config(
        train_config(
            tmp_path / "t.json",
            data_cfg,
            tmp_path / "out",
            train={"global_batch_size": 8, "local_batch_size": 2, "clip_grad": clip_grad},
        )
    )
    trainer = Trainer(cfg)
    batches = iter(trainer.train_loader)
    trainer.train_update(batches, 0)  # warm-up (lazy initialisations)
    micro = [next(batches) for _ in range(4)]  # the loader's work is not the step's
    reads = []
    package = str(Path(myrtle_vision.__file__).parent)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            reads.append((_name, sys._getframe(1).f_code.co_filename.startswith(package)))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    result = trainer.train_update(iter(micro), 1)
    monkeypatch.undo()
    assert trainer.plan.num_micro_batches(1) == 4
    assert reads[0] == ("tolist", True), reads  # the first read of all: the statistics, after the micro-batches
    assert [r for r in reads if r[1]] == [("tolist", True)], reads  # and the package's only one
    assert result.images == 8 and math.isfinite(result.loss)
