"""The file the accelerator imports (``export.py``): a checkpoint's deployed ViT alone, in the deploy layout
(:mod:`myrtle_vision.weights.deploy`), its weights in FP32 or rounded to FP16 as the accelerator holds them, with a JSON
beside it saying what it is; optionally the same ViT as ONNX. Each file checks itself: read back, it runs
the first test images, and its logits are compared with the checkpoint's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .. import checkpoint
from ..config import Config
from ..data import class_names, read_label_map
from ..distributed import Processes
from ..errors import UserError, WriteFailed, reason
from ..evaluation import split_loader
from ..files import check_output, described_by, discard, json_with, publish, sha256, temporary_name, write_staged
from ..models import build_model
from ..reporting import say
from ..weights.deploy import from_deploy
from ..weights.io import load_file

ONNX_TOLERANCE = 1e-3  # ONNX Runtime's kernels sum in another order: about 1e-6 of FP32 ViT logits differ


def deploy_state(ckpt: dict, fp16: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's deployed weights (its ``model`` entry, the deploy layout, class head only), as FP32
    tensors or rounded to FP16 (IEEE round to nearest even) and held as float16."""
    dtype = torch.float16 if fp16 else torch.float32
    return {name: tensor.detach().to(dtype).contiguous() for name, tensor in ckpt["model"].items()}


def first_test_images(cfg: Config, count: int) -> torch.Tensor:
    """The first ``count`` images of the test split (fewer if it has fewer), with the evaluation transforms."""
    loader, _ = split_loader(cfg, Processes(), min(count, cfg.train_config.local_batch_size), 0, "test")
    batches, have = [], 0
    for images, _ in loader:
        batches.append(images)
        have += len(images)
        if have >= count:
            break
    return torch.cat(batches)[:count]


def _plain_vit(cfg: Config, weights: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    model = build_model(cfg, distilled=False, q_format="FP32")
    model.load_state_dict(from_deploy({k: v.float() for k, v in weights.items()}, source))
    return model.eval()


def _check_onnx_installed() -> None:
    try:
        import onnx  # noqa: F401  (torch's exporter writes the file with it)
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError(
            "--onnx needs the onnx and onnxruntime packages, optional extras: pip install -r requirements-onnx.txt"
        ) from None


@torch.no_grad()
def export(
    cfg: Config,
    checkpoint_path: Path,
    output: Path | None = None,
    *,
    fp16: bool = False,
    onnx: Path | None = None,
    check_images: int = 64,
    force: bool = False,
) -> dict:
    """Write the deploy file (default: ``<checkpoint name>_deploy[_fp16].pt`` beside the checkpoint), its JSON
    (the same name, ``.json``) and, with ``onnx``, the ONNX file; check each; return the JSON's contents.

    All or nothing: every file is written beside its place under a temporary name and checked there, and
    only when every check passed are they renamed into place (the JSON last). A file that fails its check is
    never left where the accelerator's importer would take it. An existing file is replaced only when it is
    an earlier export's (its JSON's sha256 matches), or with ``force``."""
    if check_images < 1:
        raise UserError(f"--check-images {check_images}: must be at least 1")
    if onnx is not None:
        _check_onnx_installed()
    ckpt = checkpoint.load(checkpoint_path)
    output = output or checkpoint_path.with_name(f"{checkpoint_path.stem}_deploy{'_fp16' if fp16 else ''}.pt")
    sidecar = output.with_suffix(".json")
    if output.resolve() == checkpoint_path.resolve():
        raise UserError(f"--output {output}: is the checkpoint itself; choose another file")
    if onnx is not None and onnx.resolve() in (output.resolve(), sidecar.resolve(), checkpoint_path.resolve()):
        raise UserError(f"--onnx {onnx}: is the deploy file, its JSON or the checkpoint; choose another file")
    check_output(output, "--output", ours=described_by(sidecar), force=force, what="deploy file")
    check_output(
        sidecar, "--output (its JSON)", ours=json_with("deploy_file", "sha256"), force=force, what="deploy file's JSON"
    )
    if onnx is not None:
        check_output(onnx, "--onnx", ours=described_by(sidecar, "onnx", "sha256"), force=force, what="ONNX file")
    reference = checkpoint.ready_model(cfg, ckpt, checkpoint_path, q_format="FP32")  # says what does not fit
    staged = {}
    try:
        staged[output] = write_staged(
            output, lambda f: torch.save({"model": deploy_state(ckpt, fp16)}, f), "deploy file"
        )
        images = first_test_images(cfg, check_images)
        expected = reference(images)
        written = load_file(staged[output], "deploy file")["model"]  # read back as the accelerator's importer will
        got = _plain_vit(cfg, written, str(output))(images)
        difference = (got - expected).abs().max().item()
        if not fp16 and difference != 0:
            raise UserError(
                f"{output}: read back, its logits differ from {checkpoint_path}'s by {difference:.3g}; "
                "the file is not the checkpoint's model (nothing was written)"
            )
        dc = cfg.data_config
        info = {
            "deploy_file": str(output),
            "sha256": sha256(staged[output]),
            "format": "FP16" if fp16 else "FP32",
            "layout": "the earlier release's ViT state dict (the accelerator's importer), class head only",
            "source_checkpoint": str(checkpoint_path),
            "source_sha256": sha256(checkpoint_path),
            "iteration": int(ckpt.get("iteration", 0)),
            "weights": ckpt.get("deployed", "raw"),
            "class_names": class_names(read_label_map(dc)),
            "image_size": cfg.vit_config.image_size,
            "transform_ops_val": dc.transform_ops_val,
            "config": ckpt.get("config"),
            "check": {"images": len(images), "max_logit_diff": difference},
        }
        if onnx is not None:
            staged[onnx] = temporary_name(onnx)
            info["onnx"] = export_onnx(cfg, written, onnx, staged[onnx], images, str(output))
        staged[sidecar] = write_staged(sidecar, json.dumps(info, indent=2) + "\n", "deploy file's JSON")
    except BaseException:
        for tmp in staged.values():
            discard(tmp)
        raise
    for path, tmp in staged.items():  # every check passed: into place, the JSON last
        publish(tmp, path)
    say(
        f"{output}: the {'FP16' if fp16 else 'FP32'} deploy file of {checkpoint_path} ({info['weights']} weights, "
        f"iteration {info['iteration']}); read back, on the first {len(images)} test images its logits "
        f"differ from the checkpoint's by at most {difference:.3g}"
    )
    if onnx is not None:
        say(
            f"{onnx}: ONNX (opset 17, any batch size); ONNX Runtime's logits differ from PyTorch's by at most "
            f"{info['onnx']['max_logit_diff']:.3g} on the same images"
        )
    say(f"{sidecar}: what the file holds (format, class names, source checkpoint, sha256)")
    return info


def export_onnx(
    cfg: Config, weights: dict[str, torch.Tensor], path: Path, tmp: Path, images: torch.Tensor, source: str
) -> dict:
    """The plain ViT of ``weights`` as ONNX (opset 17, any batch size), written to ``tmp`` (to be renamed to
    ``path`` by the caller) and checked there with ONNX Runtime on ``images``."""
    import onnxruntime

    model = _plain_vit(cfg, weights, source)
    try:
        with warnings.catch_warnings():  # the TorchScript-based exporter announces its deprecation
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (images[:1],),
                str(tmp),
                dynamo=False,
                opset_version=17,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
    except OSError as e:
        raise WriteFailed(f"{path}: cannot write the ONNX file ({reason(e)}); nothing was written") from None
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.cpu().numpy()})[0])
    difference = (got - model(images)).abs().max().item()
    if difference > ONNX_TOLERANCE:
        raise UserError(
            f"{path}: ONNX Runtime's logits differ from PyTorch's by {difference:.3g} "
            f"(more than {ONNX_TOLERANCE:g}); nothing was written"
        )
    return {"file": str(path), "sha256": sha256(tmp), "opset": 17, "max_logit_diff": difference}
