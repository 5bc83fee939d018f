"""What only a GPU can show: the training step queues its micro-batches without waiting for the device, fp16 with
the gradient scaler, pinned memory, the CUDA out-of-memory line, NCCL under torchrun (two GPUs),
a batch's transforms on the GPU give torchvision's images, and train.py learns on CUDA with them.
Skipped without CUDA; benchmarks/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_dir_of, run_script, scalars, script_env, train_config
from test_pipeline import CHAINS, _images

from myrtle_vision.config import load_config
from myrtle_vision.distributed import Processes
from myrtle_vision.training import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def test_the_step_does_not_synchronize_inside_the_micro_batch_loop(tmp_path, data_cfg):
    """torch's sync debug mode raises on any host synchronisation, until the update's one reading."""
    cfg = load_config(
        train_config(
            tmp_path / "t.json",
            data_cfg,
            tmp_path / "out",
            train={"global_batch_size": 8, "local_batch_size": 2, "clip_grad": 0.5, "precision": "bf16"},
        )
    )
    trainer = Trainer(cfg, Processes(device=CUDA))
    batches = iter(trainer.train_loader)
    trainer.train_update(batches, 0)
    micro = [next(batches) for _ in range(4)]  # the loader's own work is not the step's
    torch.cuda.synchronize()
    reads = []
    original = torch.Tensor.tolist

    def allowed(self):  # the one synchronisation allowed: the update's statistics, after the micro-batches
        torch.cuda.set_sync_debug_mode(0)
        reads.append(1)
        return original(self)

    torch.Tensor.tolist = allowed
    try:
        torch.cuda.set_sync_debug_mode("error")
        trainer.train_update(iter(micro), 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.Tensor.tolist = original
    assert reads == [1]


@pytest.mark.parametrize("chain", CHAINS)
def test_a_batch_transformed_on_the_gpu_gives_torchvision_s_images(chain):
    from myrtle_vision.data.augment import OnDevice, PerImage
    from myrtle_vision.transforms import parse_ops

    ops = CHAINS[chain]
    sizes = (
        [(24, 24), (26, 25), (30, 28), (24, 31), (27, 27), (25, 24)]
        if "RandomCrop" in ops
        else [(32, 32), (30, 36), (33, 31), (32, 40), (36, 30), (32, 32)]
    )
    images, seeds = _images(sizes), [11, 22, 33, 44, 55, 66]
    parsed = parse_ops(ops)
    on_device, per_image = OnDevice(parsed), PerImage(parsed)
    batch = on_device.collate([(on_device.sample(img, s), 0) for img, s in zip(images, seeds)])
    out, labels = on_device.finish(batch.pin_memory(), CUDA)
    assert out.device.type == "cuda" and labels.device.type == "cuda"
    reference = torch.stack([per_image.sample(img, s).float() for img, s in zip(images, seeds)])
    # as on the CPU (test_pipeline.py): a uint8 level apart per resize in the chain, exact without one
    resizes = sum(op in ("Resize", "RandomResizedCrop") for op in ops)
    assert ((out.cpu() * 255 - reference).abs() <= resizes + 1e-3).all()


def test_train_py_learns_on_cuda_with_the_batch_transformed_on_the_gpu(tmp_path, dataset):
    from conftest import data_config

    ops = {
        "RandomResizedCrop": {"size": 32, "scale": [0.6, 1.0]},
        "RandomHorizontalFlip": None,
        "Normalize": {"Mean": [0.5] * 3, "Std": [0.25] * 3},
    }
    data = data_config(tmp_path / "d.json", dataset, 3, train_ops=ops)  # augment_on auto: on the GPU
    cfg = train_config(
        tmp_path / "t.json",
        data,
        tmp_path / "out",
        train={"epochs": 6, "precision": "bf16", "num_workers": 2, "clip_grad": 1.0},
    )
    proc = run_script("train.py", "-c", cfg, "--device", "cuda", check=True, device="cuda")
    assert "training on cuda" in proc.stdout
    losses = [v for _, v in scalars(run_dir_of(proc), "train/loss")]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


def test_fp16_trains_with_the_gradient_scaler_and_resumes_it(tmp_path, data_cfg):
    """fp16 needs CUDA (refused on the CPU: see test_training): the loss is scaled, the scaler's state is saved
    with each checkpoint and a resumed run continues from it."""
    cfg = train_config(
        tmp_path / "t.json",
        data_cfg,
        tmp_path / "out",
        train={"epochs": 6, "precision": "fp16", "iters_per_checkpoint": 6, "keep_checkpoints": None},
    )
    proc = run_script("train.py", "-c", cfg, "--device", "cuda", check=True, device="cuda")
    run_dir = run_dir_of(proc)
    losses = [v for _, v in scalars(run_dir, "train/loss")]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    mid = torch.load(run_dir / "checkpoint_0000006.pt", map_location="cpu", weights_only=True)
    assert mid["grad_scaler"]["scale"] > 0
    resumed = train_config(
        tmp_path / "r.json",
        data_cfg,
        tmp_path / "out",
        train={
            "epochs": 6,
            "precision": "fp16",
            "iters_per_checkpoint": 6,
            "keep_checkpoints": None,
            "checkpoint_path": str(run_dir / "checkpoint_0000006.pt"),
        },
    )
    again = run_script("train.py", "-c", resumed, "--device", "cuda", check=True, device="cuda")
    assert "resuming from" in again.stdout and "at iteration 6" in again.stdout


def test_batches_come_from_pinned_memory_onto_the_gpu(tmp_path, data_cfg):
    cfg = load_config(train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train={"num_workers": 2}))
    trainer = Trainer(cfg, Processes(device=CUDA))
    assert trainer.train_loader.loader.pin_memory and trainer.val_loader.loader.pin_memory
    images, labels = next(iter(trainer.train_loader))
    assert images.device.type == "cuda" and labels.device.type == "cuda"


def test_cuda_out_of_memory_is_one_line_and_exit_3(tmp_path, data_cfg):
    """A model larger than the GPU memory the process may use (a per-process limit set before train.py runs)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text("import torch\ntorch.cuda.set_per_process_memory_fraction(5e-5)\n")
    cfg = train_config(
        tmp_path / "t.json",
        data_cfg,
        tmp_path / "out",
        vit={"embed_dim": 1024, "heads": 16, "mlp_dim": 4096, "depth": 8},
    )
    proc = run_script(
        "train.py", "-c", cfg, "--device", "cuda", device="cuda", env={"PYTHONPATH": f"{inject}{os.pathsep}{REPO}"}
    )
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: out of memory (") and "local_batch_size" in lines[0], lines


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL puts one process on each)")
def test_two_processes_on_two_gpus_with_nccl(tmp_path, data_cfg):
    from test_distributed import RUN

    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train=RUN)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "train.py"),
            "-c",
            str(cfg),
        ],
        cwd=REPO,
        env=script_env("cuda"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training on cuda:0 in 2 processes" in proc.stdout
    assert (run_dir_of(proc) / "last.pt").is_file()


def test_predict_py_on_cuda_with_the_batch_transformed_there_agrees_with_the_cpu(tmp_path, data_cfg, dataset):
    """predict.py's batches (resized on the GPU, augment_on auto) and an unreadable file among them."""
    import csv
    import json
    import shutil

    raw = json.loads(data_cfg.read_text())
    raw["transform_ops_val"] = {"Resize": 32, "CenterCrop": 32, "Normalize": raw["transform_ops_val"]["Normalize"]}
    data_cfg.write_text(json.dumps(raw))
    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train={"epochs": 1})
    ckpt = run_dir_of(run_script("train.py", "-c", cfg, "--device", "cpu", check=True)) / "last.pt"
    folder = tmp_path / "images"
    shutil.copytree(dataset / "images", folder)
    (folder / "broken.png").write_bytes(b"not a png")
    rows = {}
    for device in ("cpu", "cuda"):
        run_script(
            "predict.py",
            "-c",
            cfg,
            "--checkpoint",
            ckpt,
            folder,
            "--q_format",
            "FP16_32",
            "--device",
            device,
            "--output",
            tmp_path / f"{device}.csv",
            check=True,
            device=device,
        )
        rows[device] = list(csv.DictReader(open(tmp_path / f"{device}.csv", newline="")))
    assert [r["path"] for r in rows["cpu"]] == [r["path"] for r in rows["cuda"]]
    for a, b in zip(rows["cpu"], rows["cuda"]):
        assert a["error"] == b["error"]
        if not a["error"]:
            assert float(a["prob1"]) == pytest.approx(float(b["prob1"]), abs=1e-3)


def test_the_per_layer_report_on_cuda_agrees_with_the_cpu(tmp_path, data_cfg):
    """test_quantize.py --per-layer on the GPU: the same points, ranges and overflow counts as on the CPU, and
    sensitivities within FP32's differences between the devices."""
    import json

    cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train={"epochs": 1})
    ckpt = run_dir_of(run_script("train.py", "-c", cfg, "--device", "cpu", check=True)) / "last.pt"
    reports = {}
    for device in ("cpu", "cuda"):
        run_script(
            "test_quantize.py", "-c", cfg, "--checkpoint", ckpt, "--q_format", "FP16_16", "--per-layer",
            "--device", device, "--output-dir", tmp_path / device, "--json", tmp_path / f"{device}.json", check=True,
            device=device,
        )  # fmt: skip
        reports[device] = json.loads((tmp_path / f"{device}.json").read_text())
    cpu, cuda = reports["cpu"], reports["cuda"]
    assert cpu["num_images"] == cuda["num_images"] and cpu["all_rounded_changed"] == cuda["all_rounded_changed"]
    for a, b in zip(cpu["layers"], cuda["layers"], strict=True):
        assert (a["point"], a["values"], a["overflow"]) == (b["point"], b["values"], b["overflow"])
        assert a["max_abs"] == pytest.approx(b["max_abs"], rel=1e-3)
        assert a["alone_kl"] == pytest.approx(b["alone_kl"], rel=0.1, abs=1e-9), a["point"]
