"""The data pipeline: image lists, labels, transforms, image modes, and every dataset check."""

import io
import json
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import (
    CLASSES,
    NORMALIZE,
    assert_user_error,
    class_image,
    data_config,
    make_dataset,
    run_in_process,
    run_script,
    train_config,
)
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from myrtle_vision.config import load_data_config
from myrtle_vision.data import TrainPlan, eval_loader, open_split, read_label_map, stop_workers, train_loader
from myrtle_vision.data.augment import pipeline_for
from myrtle_vision.data.images import ImageFiles, read_rgb
from myrtle_vision.errors import ConfigError, UserError
from myrtle_vision.transforms import build_transform, parse_ops

CPU = torch.device("cpu")


def test_labels_come_from_class_folders_through_the_label_map(dataset, data_cfg):
    cfg = load_data_config(data_cfg)
    train = open_split(cfg, "train")
    label_map = json.loads((dataset / "label_map.json").read_text())
    for path, label in zip(train.paths, train.labels):
        assert label == label_map[path.split("/")[-2]]
    img, label = train[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    val = open_split(cfg, "val")  # no random ops, so the image and the batch can be compared
    images, labels = next(iter(eval_loader(val, 4, 0)))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32) and labels.tolist() == val.labels[:4]
    # the batch step is ToDtype(scale) then Normalize(0.5, 0.25), exactly
    torch.testing.assert_close(images[0], (val[0][0].float() / 255 - 0.5) / 0.25, rtol=0, atol=1e-6)
    assert len(open_split(cfg, "val")) == 12 and len(open_split(cfg, "test")) == 15


@pytest.mark.slow
def test_label_map_is_read_once_not_per_sample(tmp_path):
    ds = make_dataset(tmp_path / "ds", CLASSES)
    cfg = load_data_config(data_config(tmp_path / "d.json", ds, 3))
    split = open_split(cfg, "train")
    (ds / "label_map.json").unlink()  # workers must not need it any more
    batches = list(eval_loader(split, 5, num_workers=2))
    assert sum(len(y) for _, y in batches) == 24


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    """Opaque modes here; transparency and 16 bits below, value by value."""
    ds = make_dataset(tmp_path / "ds", CLASSES)
    target = ds / "images" / "cat" / "cat_000.png"
    img = class_image(0, 0)
    if mode == "CMYK":
        target = target.with_suffix(".jpg")
        img.convert("CMYK").save(target)
        (ds / "train_imagepaths.txt").write_text("images/cat/cat_000.jpg\n")
    else:
        img.convert(mode).save(target)
        (ds / "train_imagepaths.txt").write_text("images/cat/cat_000.png\n")
    split = open_split(load_data_config(data_config(tmp_path / "d.json", ds, 3)), "train")
    assert split.load_image(0).mode == "RGB"
    assert split[0][0].shape == (3, 32, 32)


def _dataset_of(tmp_path, images: dict[str, bytes]) -> tuple:
    """A dataset whose training split is exactly ``images`` (file name -> bytes, in the cat folder), and the split
    opened with the decoded-image cache."""
    ds = make_dataset(tmp_path / "ds", CLASSES)
    for name, data in images.items():
        (ds / "images" / "cat" / name).write_bytes(data)
    (ds / "train_imagepaths.txt").write_text("".join(f"images/cat/{name}\n" for name in images))
    split = open_split(
        load_data_config(data_config(tmp_path / "d.json", ds, 3, cache_dir=str(tmp_path / "cache"))), "train"
    )
    assert split.decoded is not None
    return ds, split


def _saved(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def _composited(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """On black, by hand: each channel times alpha / 255, rounded to nearest (never a tie: 255 is odd)."""
    return np.floor(rgb.astype(np.float64) * alpha[..., None].astype(np.float64) / 255 + 0.5).astype(np.uint8)


def test_transparent_pixels_are_composited_on_black(tmp_path):
    """Fully and partly transparent pixels, with an alpha channel (RGBA, LA), a palette's transparent index or its
    per-entry alpha (P), and a transparent colour (RGB): the exact values, through the cache and without it."""
    alpha = np.array([[0, 0, 1, 64, 127], [128, 200, 254, 255, 255], [0, 90, 255, 17, 230]], dtype=np.uint8)
    rgb = np.random.default_rng(5).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    rgb[0, 0] = rgb[2, 0] = 255  # white where fully transparent: black it must become
    grey = rgb[..., 0]
    palette = np.array([[250, 20, 30], [40, 200, 60], [255, 255, 255], [7, 8, 250]], dtype=np.uint8)
    index = np.array([[0, 1, 2, 3, 2], [2, 2, 1, 0, 3], [3, 0, 1, 2, 1]], dtype=np.uint8)

    def paletted(transparency):
        img = Image.fromarray(index, "P")
        img.putpalette(palette.flatten().tolist())
        return _saved(img, transparency=transparency)

    key = tuple(int(v) for v in rgb[1, 1])
    cases = {  # file -> (bytes, the mode PIL opens it in, the RGB image expected)
        "rgba.png": (_saved(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")), "RGBA", _composited(rgb, alpha)),
        "la.png": (
            _saved(Image.fromarray(np.dstack([grey, alpha]), "LA")),
            "LA",
            _composited(np.dstack([grey] * 3), alpha),
        ),
        "index.png": (paletted(2), "P", np.where((index == 2)[..., None], 0, palette[index]).astype(np.uint8)),
        "entries.png": (
            paletted(bytes([255, 128, 0, 37])),
            "P",
            _composited(palette[index], np.array([255, 128, 0, 37], dtype=np.uint8)[index]),
        ),
        "colour.png": (
            _saved(Image.fromarray(rgb), transparency=key),
            "RGB",
            np.where((rgb == key).all(-1)[..., None], 0, rgb).astype(np.uint8),
        ),
    }
    for name, (data, mode, _) in cases.items():
        with Image.open(io.BytesIO(data)) as img:  # the files are what they claim to be
            assert img.mode == mode and (mode in ("RGBA", "LA") or "transparency" in img.info), name
    _, split = _dataset_of(tmp_path, {name: data for name, (data, _, _) in cases.items()})
    for i, (name, (data, _, expected)) in enumerate(cases.items()):
        with warnings.catch_warnings():  # (Pillow's advice on converting such palettes: RGBA first, as read_rgb does)
            warnings.simplefilter("ignore")
            assert not np.array_equal(expected, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))), name
        assert np.array_equal(split.image(i).permute(1, 2, 0).numpy(), expected), name  # from the cache
        assert np.array_equal(np.asarray(read_rgb(split.paths[i])), expected), name  # decoded from the file


def _png_rgb16(levels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (colour type 2, depth 16) with R = G = B = ``levels``, written by hand: PIL cannot."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = levels.shape
    rows = b"".join(b"\0" + np.repeat(levels[y].astype(">u2")[:, None], 3, 1).tobytes() for y in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16_bit_images_are_scaled_to_8_bits(tmp_path):
    """A 16-bit grey image keeps the high byte of each level (v >> 8): what Pillow itself does with 16-bit RGB,
    RGBA and grey-with-alpha PNGs, so a grey picture saved as 16-bit RGB gives the same pixels; and an 8-bit image
    widened to 16 bits (v * 257) comes back exactly. Not clipped: the earlier reading made a ramp nearly white."""
    levels = (
        np.concatenate(
            [
                [0, 1, 255, 256, 257, 32767, 32768, 65279, 65280, 65534, 65535, 128 * 257],
                np.random.default_rng(3).integers(0, 65536, 36),
            ]
        )
        .astype(np.uint16)
        .reshape(6, 8)
    )
    expected = np.repeat((levels >> 8).astype(np.uint8)[..., None], 3, -1)
    pgm = b"P5\n8 6\n65535\n" + levels.astype(">u2").tobytes()
    cases = {  # file -> (bytes, the mode PIL opens it in)
        "png16.png": (_saved(Image.fromarray(levels)), "I;16"),
        "big.tif": (_saved(Image.fromarray(levels.astype(">u2")), "TIFF"), "I;16B"),
        "little.tif": (_saved(Image.fromarray(levels), "TIFF"), "I;16"),
        "grey.pgm": (pgm, "I"),  # Pillow reads a 16-bit PGM as 32-bit integers in 0..65535
        "rgb16.png": (_png_rgb16(levels), "RGB"),  # Pillow's own reading of 16 bits
    }
    for name, (data, mode) in cases.items():
        assert Image.open(io.BytesIO(data)).mode == mode, name
    _, split = _dataset_of(tmp_path, {name: data for name, (data, _) in cases.items()})
    for i, name in enumerate(cases):
        assert np.array_equal(split.image(i).permute(1, 2, 0).numpy(), expected), name
    widened = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257
    assert np.array_equal(
        np.asarray(read_rgb(io.BytesIO(_saved(Image.fromarray(widened)))))[..., 0],
        np.arange(256, dtype=np.uint8).reshape(16, 16),
    )
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1)))
    assert 126 < np.asarray(read_rgb(io.BytesIO(_saved(ramp)))).mean() < 129


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, values, kind",
    [
        ("I", np.array([[0, 70000, -5]], dtype=np.int32), "32-bit integer"),
        ("F", np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "floating-point"),
    ],
)
def test_32_bit_integer_and_float_images_are_refused_naming_the_file(tmp_path, mode, values, kind):
    image = _saved(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(image)).mode == mode
    ds = make_dataset(tmp_path / "ds", CLASSES)
    victim = sorted(ds.glob("images/dog/*.png"))[2]
    victim.write_bytes(image)
    cfg = train_config(tmp_path / "t.json", data_config(tmp_path / "d.json", ds, 3), tmp_path / "out")
    assert_user_error(
        run_in_process("train.py", "-c", cfg),
        str(victim),
        "cannot read image",
        f"{kind} pixels (mode {mode})",
        "8 or 16 bits",
    )


@pytest.mark.parametrize(
    "ops", [{"RandomCrop": 16}, {"RandomCrop": {"size": 16, "padding": 6}}, {"RandomCrop": 16, "ColorJitter": 0.2}]
)
def test_an_image_smaller_than_a_random_crop_is_named_wherever_the_crop_runs(tmp_path, ops):
    """Per image in the workers (the lean path, or torchvision's pipeline with ColorJitter), on the device, and
    predicting: the same problem, naming the op, the image and its size."""
    padding = ops["RandomCrop"]["padding"] if isinstance(ops["RandomCrop"], dict) else 0
    small = _saved(Image.fromarray(np.zeros((2, 3, 3), dtype=np.uint8)))
    problem = (
        f"the image is 2x3{f' ({2 + 2 * padding}x{3 + 2 * padding} with its padding)' if padding else ''}, "
        "smaller than the crop 16x16"
    )
    ds = make_dataset(tmp_path / "ds", CLASSES)
    victim = ds / "images" / "cat" / "cat_003.png"
    victim.write_bytes(small)
    for where in ("workers", "device") if "ColorJitter" not in ops else ("workers",):
        cfg = data_config(tmp_path / f"{where}.json", ds, 3, train_ops=ops, augment_on=where)
        split = open_split(load_data_config(cfg), "train")
        assert split[(0, 1)][0] is not None  # a 32 x 32 image crops
        with pytest.raises(UserError) as e:
            split[(3, 1)]
        assert str(e.value) == (
            f"{cfg}: transform_ops_train.RandomCrop: {victim}: {problem}; add padding, or a Resize before it"
        )
    files = ImageFiles(
        [str(victim), str(ds / "images" / "cat" / "cat_000.png")],
        pipeline_for(ops, "workers", CPU),
        16,
        "transform_ops_train",
    )
    assert files[0][1:] == (0, f"transform_ops_train.RandomCrop: {problem}; add padding, or a Resize before it")
    assert files[1][2] is None and files[1][0].shape == (3, 16, 16)


def test_every_transform_op_builds_and_gives_the_asked_size():
    ops = {
        "Resize": 40,
        "RandomResizedCrop": {"size": 24, "scale": [0.3, 1.0], "ratio": [0.8, 1.25]},
        "RandomCrop": {"size": 20, "padding": 2},
        "RandomHorizontalFlip": 0.5,
        "RandomVerticalFlip": None,
        "RandomRotation90": None,
        "RandomTranspose": 0.25,
        "RandAugment": {"num_ops": 2, "magnitude": 9},
        "ColorJitter": {"brightness": 0.4, "hue": 0.1},
        "CenterCrop": 16,
        "Normalize": {"Mean": [0.5, 0.5, 0.5], "Std": [0.2, 0.2, 0.2]},
    }
    per_image, collate = build_transform(parse_ops(ops))
    out = per_image(class_image(1, 2, 48))
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    names = [type(s).__name__ for s in per_image.transforms]
    assert names == [
        "ToImage",
        "Resize",
        "RandomResizedCrop",
        "RandomCrop",
        "RandomHorizontalFlip",
        "RandomVerticalFlip",
        "RandomRotation90",
        "RandomTranspose",
        "RandAugment",
        "ColorJitter",
        "CenterCrop",
    ]
    assert per_image.transforms[7].p == 0.25
    images = collate(torch.stack([out, out]))
    assert images.dtype == torch.float32 and collate.std == [0.2, 0.2, 0.2]
    # exactly torchvision's per-image ToDtype then Normalize, computed in place for the batch
    expected = TF.normalize(TF.to_dtype(out, torch.float32, scale=True), [0.5] * 3, [0.2] * 3)
    assert torch.equal(images[1], expected)


@pytest.mark.parametrize("field", ["transform_ops_train", "transform_ops_val"])
@pytest.mark.parametrize(
    "op, value, hint",
    [
        ("RandomRotation90", 2, "expected null (a rotation by k quarter turns, k uniform in 0..3), got 2"),
        ("RandomRotation90", {"p": 0.5}, "expected null"),
        ("RandomTranspose", 1.5, "expected null or a probability in [0, 1], got 1.5"),
        ("RandomTranspose", True, "got True"),
    ],
)
def test_a_bad_rotation_or_transpose_is_one_line_naming_the_file_and_field(tmp_path, dataset, field, op, value, hint):
    """Like every op's, in either list (validation takes the random ops too, as it takes the flips)."""
    ops = {"CenterCrop": 32, op: value, "Normalize": NORMALIZE}
    which = {"train_ops": ops} if field == "transform_ops_train" else {"val_ops": ops}
    path = data_config(tmp_path / "d.json", dataset, 3, **which)
    with pytest.raises(ConfigError) as e:
        load_data_config(path)
    assert e.value.field == f"{field}.{op}" and "\n" not in str(e.value)
    assert str(e.value) == f"{path}: {field}.{op}: {e.value.problem}" and hint in e.value.problem


def test_normalize_must_come_last():
    with pytest.raises(ValueError, match="Normalize: must be the last op"):
        parse_ops({"Normalize": {"Mean": [0, 0, 0], "Std": [1, 1, 1]}, "CenterCrop": 8})


def test_val_transform_is_deterministic_and_train_augmentation_follows_the_seed(dataset, data_cfg):
    raw = json.loads(data_cfg.read_text())
    raw["transform_ops_train"] = {"RandomResizedCrop": 32, "RandAugment": None, "ColorJitter": 0.4}
    data_cfg.write_text(json.dumps(raw))
    train = open_split(load_data_config(data_cfg), "train")
    a, b, c = train[(3, 11)][0], train[(3, 11)][0], train[(3, 12)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_train_plan_covers_each_sample_once_per_epoch_and_depends_only_on_the_seed():
    plan = TrainPlan(50, global_batch=8, local_batch=4, seed=3, drop_last=False)
    assert plan.updates_per_epoch == 7
    seen = [i for b in plan.batches(0) for i, _ in b]
    assert sorted(seen) == list(range(50))
    assert [plan.num_micro_batches(u) for u in range(7)] == [2, 2, 2, 2, 2, 2, 1]
    again = TrainPlan(50, global_batch=8, local_batch=4, seed=3, drop_last=False)
    assert list(again.batches(1, start_update=2)) == list(plan.batches(1))[4:]
    assert [i for b in plan.batches(1) for i, _ in b] != seen  # a new order every epoch
    assert TrainPlan(50, global_batch=8, local_batch=4, seed=3, drop_last=True).updates_per_epoch == 6


# --- every problem found when a split is opened: one line, exit 2, naming the file ---------------


def _break(ds, case):
    if case == "count":
        return "number_of_classes", 4
    if case == "missing file":
        (ds / "images" / "dog" / "dog_002.png").unlink()
        return str(ds / "train_imagepaths.txt") + ":", None
    if case == "escape":
        with open(ds / "train_imagepaths.txt", "a") as f:
            f.write("../outside/secret.png\n")
        (ds.parent / "outside").mkdir(exist_ok=True)
        class_image(0, 0).save(ds.parent / "outside" / "secret.png")
        return "outside the dataset folder", None
    if case == "empty split":
        (ds / "val_imagepaths.txt").write_text("\n")
        return "lists no images", None
    if case == "label map ids":
        (ds / "label_map.json").write_text(json.dumps({"cat": 0, "dog": 2, "fox": 3}))
        return "class ids must be 0..2", None
    if case == "extra folder":
        (ds / "images" / "wolf").mkdir()
        return "not in the label map: wolf", None
    if case == "unlisted class":
        (ds / "label_map.json").write_text(json.dumps({"cat": 0, "dog": 1, "owl": 2}))
        return "'fox'", None
    raise AssertionError(case)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["count", "missing file", "escape", "empty split", "label map ids", "extra folder", "unlisted class"]
)
def test_dataset_problems_are_one_line_errors(tmp_path, case):
    ds = make_dataset(tmp_path / "ds", CLASSES)
    needle, classes = _break(ds, case)
    data_cfg = data_config(tmp_path / "d.json", ds, classes or 3)
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out")
    line = assert_user_error(run_in_process("train.py", "-c", cfg), needle)
    assert str(ds) in line


def test_label_map_disagreeing_with_number_of_classes(tmp_path):
    ds = make_dataset(tmp_path / "ds", CLASSES)
    cfg = load_data_config(data_config(tmp_path / "d.json", ds, 4))
    with pytest.raises(UserError, match="has 3 classes but .*d.json: number_of_classes is 4"):
        read_label_map(cfg)


@pytest.mark.slow
def test_split_smaller_than_a_global_batch(tmp_path, data_cfg):
    cfg = train_config(
        tmp_path / "t.json", data_cfg, tmp_path / "out", train={"global_batch_size": 32, "local_batch_size": 8}
    )
    assert_user_error(run_script("train.py", "-c", cfg), "fewer than one global batch")


@pytest.mark.slow
@pytest.mark.parametrize("field", ["transform_ops_train", "transform_ops_val"])
def test_transform_size_must_match_the_model(tmp_path, dataset, field):
    ops = {"Resize": 24, "Normalize": {"Mean": [0.5] * 3, "Std": [0.2] * 3}}
    which = {"train_ops": ops} if field == "transform_ops_train" else {"val_ops": ops}
    data_cfg = data_config(tmp_path / "d.json", dataset, 3, **which)
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out")
    assert_user_error(run_script("train.py", "-c", cfg), str(data_cfg), field, "24x24", "image_size is 32")


def test_images_decode_identically_through_workers(dataset, data_cfg):
    split = open_split(load_data_config(data_cfg), "test")
    serial = torch.cat([x for x, _ in eval_loader(split, 4, 0)])
    parallel = torch.cat([x for x, _ in eval_loader(split, 4, 2)])
    assert torch.equal(serial, parallel) and len(serial) == 15
    assert np.isfinite(serial.numpy()).all()


class _Keys(torch.utils.data.Dataset):
    """Returns what the sampler asked for, and which process loaded it."""

    def __len__(self):
        return 20

    def __getitem__(self, key):
        index, seed = key
        return torch.tensor([index, seed, os.getpid()])


def test_persistent_training_workers_serve_each_epoch_its_own_plan():
    plan = TrainPlan(20, global_batch=8, local_batch=4, seed=3, drop_last=False)
    loader = train_loader(_Keys(), plan, epoch=0, num_workers=2, persistent=True)
    pids = set()
    try:
        for epoch, start in ((0, 0), (1, 0), (2, 1)):
            loader.batch_sampler.set_epoch(epoch, start)
            batches = list(loader)
            assert [b[:, :2].tolist() for b in batches] == [[list(k) for k in mb] for mb in plan.batches(epoch, start)]
            pids.update(int(p) for b in batches for p in b[:, 2])
        assert len(pids) == 2 and os.getpid() not in pids  # the same two workers served every epoch
    finally:
        stop_workers(loader)
    assert loader.loader._iterator is None


# --- train_config.repeated_augmentation and class_balanced_sampler: the plan ---------------------


def _seed(*parts: int) -> int:
    """The sample-seed derivation, written out (what derive_seed does)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(_seed(seed, 0, epoch)).permutation(n)


def _stream(make_plan, epoch: int) -> list[tuple[int, int, int]]:
    """The epoch's whole order, as ``(index, sample seed, rank)`` at each position, put together from every
    process's share (``make_plan(rank)``): process r's t-th sample of update u sits at position
    u * global_batch + r + t * world_size."""
    plan, slots = make_plan(0), {}
    for rank in range(plan.world_size):
        share = make_plan(rank)
        for u in range(share.updates_per_epoch):
            mine = [key for micro in share.micro_batches(epoch, u) for key in micro]
            for t, (index, seed) in enumerate(mine):
                position = u * plan.global_batch + rank + t * plan.world_size
                assert position not in slots, f"position {position} served twice"
                slots[position] = (index, seed, rank)
    assert sorted(slots) == list(range(plan.num_samples)), "the shares do not cover the epoch's positions"
    return [slots[p] for p in range(plan.num_samples)]


def test_without_the_switches_the_plan_is_the_earlier_one():
    """repeated_augmentation 1 and no class balance: every process's micro-batches as the earlier release
    made them (the formula written out here), so existing configs train exactly as before."""
    n, g, local, seed, world = 50, 12, 3, 11, 2
    for rank in range(world):
        plan = TrainPlan(
            n, global_batch=g, local_batch=local, seed=seed, drop_last=False, rank=rank, world_size=world, repeats=1
        )
        for epoch in range(3):
            order = _permutation(seed, epoch, n)
            expected = []
            for u in range(plan.updates_per_epoch):
                mine = [(int(i), _seed(seed, 1, epoch, int(i))) for i in order[u * g : (u + 1) * g][rank::world]]
                expected += [mine[s : s + local] for s in range(0, len(mine), local)]
            assert list(plan.batches(epoch)) == expected


def test_repeated_augmentation_repeats_each_image_on_different_processes():
    # 51 images, k = 3 copies, 3 processes, updates of 12 (a multiple of k: a group of copies is never split)
    n, k, world, seed = 51, 3, 3, 5

    def make_plan(rank):
        return TrainPlan(
            n, global_batch=12, local_batch=2, seed=seed, drop_last=False, rank=rank, world_size=world, repeats=k
        )

    assert make_plan(0).updates_per_epoch == 5  # the epoch is still n images long: 4 full updates and one of 3
    for epoch in range(2):
        stream = _stream(make_plan, epoch)
        indices = [i for i, _, _ in stream]
        # the epoch's permutation, each image k times in a row, cut to the n positions: 17 images, 3 times each
        assert indices == np.repeat(_permutation(seed, epoch, n), k)[:n].tolist()
        groups = [stream[j : j + k] for j in range(0, n, k)]
        assert len({g[0][0] for g in groups}) == len(groups) == 17
        for group in groups:
            assert len({i for i, _, _ in group}) == 1
            assert len({r for _, _, r in group}) == k, f"copies on the same process: {group}"
            assert len({s for _, s, _ in group}) == k, f"copies with the same augmentation seed: {group}"


def test_repeated_copies_are_augmented_differently_through_the_loader(tmp_path, dataset):
    ops = {
        "RandomResizedCrop": {"size": 32, "scale": [0.3, 1.0]},
        "ColorJitter": 0.4,
        "Normalize": {"Mean": [0.5] * 3, "Std": [0.25] * 3},
    }
    split = open_split(load_data_config(data_config(tmp_path / "d.json", dataset, 3, train_ops=ops)), "train")
    plan = TrainPlan(len(split), global_batch=6, local_batch=6, seed=3, drop_last=True, repeats=3)
    images, labels = next(iter(train_loader(split, plan, epoch=0, num_workers=0)))
    keys = plan.micro_batches(0, 0)[0]
    for j in (0, 3):  # two images, three copies each
        assert keys[j][0] == keys[j + 1][0] == keys[j + 2][0]
        assert labels[j] == labels[j + 1] == labels[j + 2]
        for a, b in ((j, j + 1), (j, j + 2), (j + 1, j + 2)):
            assert not torch.equal(images[a], images[b]), f"copies {a} and {b} of image {keys[j][0]} look the same"


def test_class_balanced_draws_every_class_equally_often():
    labels = [0] * 90 + [1] * 10  # 9 : 1
    plan = TrainPlan(100, global_batch=10, local_batch=5, seed=2, drop_last=True, balance_labels=labels)
    drawn = [labels[i] for epoch in range(50) for micro in plan.batches(epoch) for i, _ in micro]
    assert len(drawn) == 5000  # N draws each epoch
    # each class with probability 1/2: the count of class 1 is Binomial(5000, 0.5), sd ~35; allow 5 sd
    assert abs(drawn.count(1) - 2500) < 180, drawn.count(1)
    # deterministic given (seed, epoch): a fresh plan, asked in another order, draws the same
    again = TrainPlan(100, global_batch=10, local_batch=5, seed=2, drop_last=True, balance_labels=labels)
    assert list(again.batches(7)) == list(plan.batches(7)) and list(again.batches(3)) == list(plan.batches(3))
    assert list(plan.batches(7)) != list(plan.batches(8))
    # drawn with replacement: an image drawn twice in an epoch still gets two different augmentations
    keys = [key for micro in plan.batches(0) for key in micro]
    assert len({i for i, _ in keys}) < 100 and len({s for _, s in keys}) == 100


def test_class_balanced_draws_are_repeated_with_repeated_augmentation():
    labels = [0] * 27 + [1] * 3
    drawn = TrainPlan(30, global_batch=6, local_batch=6, seed=4, drop_last=True, balance_labels=labels)
    repeated = TrainPlan(30, global_batch=6, local_batch=6, seed=4, drop_last=True, balance_labels=labels, repeats=3)
    for epoch in range(3):
        once = [i for micro in drawn.batches(epoch) for i, _ in micro]
        thrice = [key for micro in repeated.batches(epoch) for key in micro]
        assert [i for i, _ in thrice] == np.repeat(once, 3)[:30].tolist()
        assert len({s for _, s in thrice}) == 30
