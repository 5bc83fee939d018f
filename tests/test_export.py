"""export.py, run as a user runs it: the deploy file holds the checkpoint's ViT alone in the accelerator's layout,
an independently written forward pass of that layout reproduces the checkpoint's logits, the FP16 file holds the
IEEE rounding of the FP32 weights, the JSON describes the file, and ONNX Runtime agrees with the reference."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CLASSES,
    assert_user_error,
    data_config,
    reference_forward,
    reference_images,
    run_dir_of,
    run_in_process,
    run_script,
    train_config,
)

from myrtle_vision.config import load_config
from myrtle_vision.distributed import Processes
from myrtle_vision.evaluation import split_loader
from myrtle_vision.models import build_model
from myrtle_vision.weights.deploy import from_deploy


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("export")
    data_cfg = data_config(tmp / "data.json", dataset, 3)
    cfg = train_config(tmp / "vit.json", data_cfg, tmp / "out", train={"epochs": 2})
    return tmp, cfg, run_dir_of(run_script("train.py", "-c", cfg, check=True)) / "last.pt"


def _logits(cfg, weights: dict) -> torch.Tensor:
    """The independent forward pass of the deploy layout on the hand-read test images."""
    vit = json.loads(cfg.read_text())["vit_config"]
    images, _ = reference_images(cfg)
    return reference_forward(
        {k: v.float() for k, v in weights.items()},
        images,
        vit["heads"],
        vit["patch_size"],
        head_dim_scale=vit["embed_dim"] // vit["heads"],
    )


@pytest.mark.slow
def test_fp32_deploy_file_is_the_checkpoint_s_model_alone(run, tmp_path):
    _, cfg, ckpt_path = run
    out = tmp_path / "deploy" / "vit.pt"
    proc = run_script("export.py", "-c", cfg, "--checkpoint", ckpt_path, "--output", out, check=True)
    exported = torch.load(out, weights_only=True)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert set(exported) == {"model"}
    assert list(exported["model"]) == list(ckpt["model"])  # the layout's names, in the checkpoint's order
    assert all(
        torch.equal(exported["model"][k], v) and exported["model"][k].dtype == torch.float32
        for k, v in ckpt["model"].items()
    )
    assert torch.equal(_logits(cfg, exported["model"]), _logits(cfg, ckpt["model"]))  # exactly
    # and the package's own ViT from the checkpoint computes the same (up to summation order)
    c = load_config(cfg)
    model = build_model(c, distilled=False).eval()
    model.load_state_dict(from_deploy(ckpt["model"]))
    loader, _ = split_loader(c, Processes(), 4, 0, "test")
    with torch.no_grad():
        ours = torch.cat([model(x) for x, _ in loader])
    assert torch.allclose(ours, _logits(cfg, exported["model"]), atol=1e-5)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert info["source_sha256"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    assert (info["format"], info["class_names"], info["image_size"], info["source_checkpoint"]) == (
        "FP32",
        sorted(CLASSES),
        32,
        str(ckpt_path),
    )
    assert info["check"] == {"images": 15, "max_logit_diff": 0.0}  # 64 asked, the split has 15
    given = json.loads(cfg.read_text())["vit_config"]  # the saved config has every field, defaults included
    assert {k: info["config"]["vit_config"][k] for k in given} == given and info["weights"] == "raw"
    assert "differ from the checkpoint's by at most 0" in proc.stdout
    # the default name, beside the checkpoint
    run_script("export.py", "-c", cfg, "--checkpoint", ckpt_path, check=True)
    assert (ckpt_path.parent / "last_deploy.pt").is_file() and (ckpt_path.parent / "last_deploy.json").is_file()


@pytest.mark.slow
def test_fp16_deploy_file_holds_the_ieee_rounding_and_onnx_agrees(run, tmp_path):
    _, cfg, ckpt_path = run
    out, onnx_path = tmp_path / "vit16.pt", tmp_path / "vit16.onnx"
    proc = run_script(
        "export.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt_path,
        "--output",
        out,
        "--fp16",
        "--onnx",
        onnx_path,
        "--check-images",
        8,
        check=True,
    )
    exported = torch.load(out, weights_only=True)["model"]
    ckpt = torch.load(ckpt_path, weights_only=True)["model"]
    for name, value in ckpt.items():  # numpy's float16 cast: IEEE round to nearest, ties to even
        ieee = torch.from_numpy(value.numpy().astype(np.float16))
        assert exported[name].dtype == torch.float16 and torch.equal(exported[name], ieee), name
    assert any(not torch.equal(exported[k].float(), v) for k, v in ckpt.items())  # rounding did happen
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["format"] == "FP16" and info["check"]["images"] == 8
    expected = _logits(cfg, exported)
    assert 0 < info["check"]["max_logit_diff"] < 0.05
    assert info["onnx"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images, _ = reference_images(cfg)  # 15 images: another batch size than the file was exported with
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert got.shape == (15, 3) and (got - expected).abs().max().item() < 1e-4
    assert "ONNX Runtime's logits differ from PyTorch's by at most" in proc.stdout


@pytest.mark.slow
def test_mistakes_are_one_line(run, tmp_path):
    _, cfg, ckpt_path = run
    assert_user_error(
        run_in_process("export.py", "-c", cfg, "--checkpoint", ckpt_path, "--output", ckpt_path),
        "is the checkpoint itself",
    )
    assert_user_error(
        run_in_process(
            "export.py", "-c", cfg, "--checkpoint", ckpt_path, "--check-images", 0, "--output", tmp_path / "x.pt"
        ),
        "--check-images 0",
    )
    assert not (tmp_path / "x.pt").exists()  # refused before anything is written
    other = train_config(
        tmp_path / "deeper.json",
        Path(json.loads(cfg.read_text())["data_config_path"]),
        tmp_path / "out",
        vit={"depth": 3},
    )
    assert_user_error(
        run_in_process("export.py", "-c", other, "--checkpoint", ckpt_path), str(ckpt_path), "does not fit"
    )


def _export_in_process(cfg, ckpt_path, out, **kwargs):
    import myrtle_vision.reports.export as export_module

    return export_module.export(load_config(cfg), Path(ckpt_path), out, **kwargs)


@pytest.mark.slow
def test_a_file_that_fails_its_check_is_never_left_in_place(run, tmp_path, monkeypatch):
    """A deploy file whose read-back logits differ from the checkpoint's (here: a writer that rounds one weight)
    is not written at all: no file at --output, no JSON, no temporary; an earlier export there stays as it was."""
    import myrtle_vision.reports.export as export_module
    from myrtle_vision.errors import UserError

    _, cfg, ckpt_path = run
    out = tmp_path / "vit.pt"
    _export_in_process(cfg, ckpt_path, out)  # an earlier, good export
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    good = export_module.deploy_state

    def wrong(ckpt, fp16):
        state = good(ckpt, fp16)
        state["mlp_head.1.bias"] = state["mlp_head.1.bias"] + 1e-3
        return state

    monkeypatch.setattr(export_module, "deploy_state", wrong)
    with pytest.raises(UserError, match="its logits differ"):
        _export_in_process(cfg, ckpt_path, out)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the earlier export, and nothing else
    fresh = tmp_path / "new" / "vit.pt"
    with pytest.raises(UserError, match="its logits differ"):
        _export_in_process(cfg, ckpt_path, fresh)
    assert list(fresh.parent.iterdir()) == []


def test_an_onnx_file_that_fails_its_check_leaves_nothing_in_place(run, tmp_path, monkeypatch):
    """All or nothing: when ONNX Runtime disagrees, neither the ONNX file nor the (good) deploy file nor the JSON is
    put in place."""
    import myrtle_vision.reports.export as export_module
    from myrtle_vision.errors import UserError

    _, cfg, ckpt_path = run
    monkeypatch.setattr(export_module, "ONNX_TOLERANCE", -1.0)
    with pytest.raises(UserError, match="ONNX Runtime's logits differ"):
        _export_in_process(cfg, ckpt_path, tmp_path / "vit.pt", onnx=tmp_path / "vit.onnx", check_images=4)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_existing_file_is_replaced_only_when_it_is_an_earlier_export_or_with_force(run, tmp_path):
    _, cfg, ckpt_path = run
    out, onnx_path = tmp_path / "vit.pt", tmp_path / "vit.onnx"
    mine = b"the user's own file"
    for path in (out, out.with_suffix(".json"), onnx_path):
        path.write_bytes(mine)
        args = ["--output", out] + (["--onnx", onnx_path] if path == onnx_path else [])
        line = assert_user_error(
            run_script("export.py", "-c", cfg, "--checkpoint", ckpt_path, *args), str(path), "already exists", "--force"
        )
        assert "previous checkpoints" not in line
        assert path.read_bytes() == mine and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
        path.unlink()
    # an earlier export of this tool (its JSON's sha256 matches) is replaced without asking
    run_script(
        "export.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt_path,
        "--output",
        out,
        "--onnx",
        onnx_path,
        "--check-images",
        4,
        check=True,
    )
    run_script(
        "export.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt_path,
        "--output",
        out,
        "--onnx",
        onnx_path,
        "--fp16",
        "--check-images",
        4,
        check=True,
    )
    assert json.loads(out.with_suffix(".json").read_text())["format"] == "FP16"
    # an earlier export changed since (its sha256 no longer matches) is the user's now
    out.write_bytes(mine)
    assert_user_error(
        run_script("export.py", "-c", cfg, "--checkpoint", ckpt_path, "--output", out), str(out), "already exists"
    )
    run_script("export.py", "-c", cfg, "--checkpoint", ckpt_path, "--output", out, "--force", check=True)
    assert (
        torch.load(out, weights_only=True)["model"].keys() == torch.load(ckpt_path, weights_only=True)["model"].keys()
    )


@pytest.mark.slow
def test_an_output_that_cannot_be_written_is_refused_before_any_work(run, tmp_path):
    from conftest import run_script_read_only

    _, cfg, ckpt_path = run
    folder = tmp_path / "a_folder.pt"
    folder.mkdir()
    line = assert_user_error(
        run_script("export.py", "-c", cfg, "--checkpoint", ckpt_path, "--output", folder),
        "--output",
        str(folder),
        "is a folder",
    )
    assert "checkpoint" not in line.split("is a folder")[1]
    locked = tmp_path / "locked"
    locked.mkdir()
    proc = run_script_read_only(
        locked, "export.py", "-c", cfg, "--checkpoint", ckpt_path, "--output", locked / "vit.pt"
    )
    assert_user_error(proc, "--output", str(locked), "cannot write there")
    assert "read back" not in proc.stdout and list(locked.iterdir()) == []
    onnx_locked = run_script_read_only(
        locked,
        "export.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt_path,
        "--output",
        tmp_path / "vit.pt",
        "--onnx",
        locked / "vit.onnx",
    )
    assert_user_error(onnx_locked, "--onnx", str(locked), "cannot write there")
    assert not (tmp_path / "vit.pt").exists()


@pytest.mark.slow
def test_onnx_without_its_packages_is_one_line_before_any_work(run, tmp_path):
    """--onnx where onnx and onnxruntime are not installed (modules that fail to import stand in for them)."""
    _, cfg, ckpt_path = run
    stubs = tmp_path / "uninstalled"
    for name in ("onnx", "onnxruntime"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")
    from conftest import REPO

    proc = run_script(
        "export.py",
        "-c",
        cfg,
        "--checkpoint",
        ckpt_path,
        "--output",
        tmp_path / "vit.pt",
        "--onnx",
        tmp_path / "vit.onnx",
        env={"PYTHONPATH": f"{stubs}:{REPO}"},
    )
    assert_user_error(proc, "--onnx needs the onnx and onnxruntime packages", "requirements-onnx.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uninstalled"]
