"""Shared fixtures: small generated image-folder datasets, configs, and running the scripts."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# qtorch's compiled extension stays where torch keeps it for the user (~/.cache/torch_extensions): compiled once per
# machine (20 s), not once per test process as it would be in the fresh cache folder below.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions"),
)
# The tests' decoded-image caches go to a folder of their own (scripts run by the tests inherit it), not ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="myrtle_vision_test_cache_")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
# torch.compile's kernels too (otherwise /tmp/torchinductor_$USER, kept after the run)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.environ["XDG_CACHE_HOME"], "torchinductor")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# One thread per process: scripts/test.sh runs one test process per core, and the scripts the tests start run beside
# them; torch's default (a thread per core in every process) oversubscribes the cores and spins, about halving the
# suite's speed on 2 cores. Set OMP_NUM_THREADS to give each process more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, str(REPO))
# The pickle guard (tests/guard/myrtle_pickle_guard.py): nothing may unpickle but torch.load(weights_only=True), in
# this process or any process the tests start (the guard's sitecustomize.py, first on their PYTHONPATH, installs it
# there; this process's own children, DataLoader workers from a fork server, find it through os.environ).
GUARD = Path(__file__).resolve().parent / "guard"
sys.path.insert(0, str(GUARD))
import myrtle_pickle_guard  # noqa: E402

# one log per pytest process (each xdist worker has its own cache folder): a test's reports are its own
os.environ[myrtle_pickle_guard.LOG_VARIABLE] = os.path.join(os.environ["XDG_CACHE_HOME"], "pickle_guard.jsonl")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(GUARD), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(GUARD))]
)
myrtle_pickle_guard.install(os.environ[myrtle_pickle_guard.LOG_VARIABLE])

NORMALIZE = {"Mean": [0.5, 0.5, 0.5], "Std": [0.25, 0.25, 0.25]}


def class_image(cls: int, i: int, size: int = 32) -> Image.Image:
    """A learnable picture: class k has its own tint and a bright bar at its own place, plus noise."""
    rng = np.random.default_rng(1000 * cls + i)
    arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    arr[:, :, cls % 3] += 100
    band = size // 4
    if cls % 2 == 0:
        arr[(cls // 2) * band % size : (cls // 2) * band % size + band, :, cls % 3] = 230
    else:
        arr[:, (cls // 2) * band % size : (cls // 2) * band % size + band, (cls + 1) % 3] = 230
    return Image.fromarray(arr)


def make_dataset(root: Path, classes: list[str], counts=(8, 4, 5), size: int = 32, ext: str = "png") -> Path:
    """Write images/<class>/..., label_map.json and the three split lists; return root."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "val": [], "test": []}
    for c, name in enumerate(classes):
        folder = root / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        i = 0
        for split, n in zip(splits, counts):
            for _ in range(n):
                rel = f"images/{name}/{name}_{i:03d}.{ext}"
                class_image(c, i, size).save(root / rel)
                splits[split].append(rel)
                i += 1
    (root / "label_map.json").write_text(json.dumps({n: i for i, n in enumerate(sorted(classes))}))
    for split, names in splits.items():
        (root / f"{split}_imagepaths.txt").write_text("\n".join(names) + "\n")
    return root


def make_resisc45_tree(root: Path) -> Path:
    """45 class folders of 700 small JPEGs (8x8, all the same bytes) at the top of ``root``, named as NWPU-RESISC45's
    (``airplane/airplane_001.jpg`` ...), as its .rar extracts; return root."""
    from myrtle_vision.prepare import RESISC45_CLASSES

    buf = io.BytesIO()
    class_image(0, 0, 8).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    for cls in RESISC45_CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(1, 701):
            (root / cls / f"{cls}_{i:03d}.jpg").write_bytes(jpeg)
    return root


def data_config(path: Path, dataset: Path, num_classes: int, train_ops=None, val_ops=None, **extra) -> Path:
    cfg = {
        "dataset_path": str(dataset),
        "train_files": "train_imagepaths.txt",
        "valid_files": "val_imagepaths.txt",
        "test_files": "test_imagepaths.txt",
        "label_map": "label_map.json",
        "number_of_classes": num_classes,
        "transform_ops_train": train_ops
        if train_ops is not None
        else {"RandomHorizontalFlip": None, "Normalize": NORMALIZE},
        "transform_ops_val": val_ops if val_ops is not None else {"Normalize": NORMALIZE},
        **extra,
    }
    path.write_text(json.dumps(cfg, indent=2))
    return path


def train_config(path: Path, data_cfg: Path, out: Path, train=None, vit=None, **sections) -> Path:
    tc = {
        "output_directory": str(out),
        "checkpoint_path": "",
        "epochs": 3,
        "local_batch_size": 4,
        "global_batch_size": 8,
        "iters_per_checkpoint": 1000,
        "iters_per_val": 1000,
        "seed": 7,
        "lr": 3e-3,
        "warmup_lr": 1e-4,
        "min_lr": 1e-4,
        "warmup_epochs": 1,
        "weight_decay": 0.01,
        "num_workers": 0,
        "label_smoothing": 0.0,
        "lr_base_size": None,
        "weight_decay_tokens": False,
    }
    vc = {
        "image_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "heads": 2,
        "mlp_dim": 64,
        "dropout": 0.0,
        "emb_dropout": 0.0,
        "q_format": "FP32",
    }
    tc.update(train or {})
    vc.update(vit or {})
    cfg = {"train_config": tc, "data_config_path": str(data_cfg), "vit_config": vc, **sections}
    path.write_text(json.dumps(cfg, indent=2))
    return path


def script_env(device: str = "cpu", **extra: str) -> dict:
    """The environment the tests run the scripts in: this repository importable, output unbuffered, and on a
    machine with CUDA, no GPU visible unless ``device`` is "cuda". The scripts choose CUDA when it is there;
    the suite's guarantees (bit-exact resume above all) are the CPU's, and tests/test_cuda.py holds CUDA's."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    # the pickle guard's folder first, whatever PYTHONPATH a test gives (its own sitecustomize runs after ours)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(GUARD), *(p for p in env["PYTHONPATH"].split(os.pathsep) if p and p != str(GUARD))]
    )
    env[myrtle_pickle_guard.LOG_VARIABLE] = os.environ[myrtle_pickle_guard.LOG_VARIABLE]
    return env


# As root, file permission bits bind only without CAP_DAC_OVERRIDE: a script run with it dropped meets a read-only
# (mode 555) folder as a user would
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


def run_script(
    script: str,
    *args,
    cwd: Path | None = None,
    timeout: float = 600,
    check: bool = False,
    env: dict | None = None,
    device: str = "cpu",
    unprivileged: bool = False,
) -> subprocess.CompletedProcess:
    """``python script args`` as a user runs it (``unprivileged``: with file permissions binding even as root)."""
    env = script_env(device, **(env or {}))
    proc = subprocess.run(
        [*(UNPRIVILEGED if unprivileged else []), sys.executable, str(REPO / script), *map(str, args)],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def run_in_process(script: str, *args) -> subprocess.CompletedProcess:
    """``python script args`` run in this process (runpy, as ``__main__``): the same code path, exit status and
    output as :func:`run_script`, without the 4 seconds a new process spends importing torch. For runs that end
    in a user error or only evaluate on the CPU (say ``--device cpu``); a run that must see no GPU, another folder
    or environment, or fewer privileges, or that trains, starts a process of its own with :func:`run_script`."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [str(REPO / script), *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(REPO / script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


def run_dir_of(proc: subprocess.CompletedProcess) -> Path:
    for line in proc.stdout.splitlines():
        if line.startswith("run directory: "):
            return Path(line.split(": ", 1)[1])
    raise AssertionError(f"no run directory printed:\n{proc.stdout}\n{proc.stderr}")


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every TensorBoard scalar ``tag`` a run wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, one line on stderr, no traceback, and the line names every needle."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


class GuardReports:
    """What the pickle guard recorded, in any process, since the test began (the lines of its log)."""

    def __init__(self):
        self.path = Path(os.environ[myrtle_pickle_guard.LOG_VARIABLE])
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def take(self) -> list[dict]:
        """The reports not taken yet; taking them means the test expected them (it will not fail for them)."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def pickle_guard_problems(reports: GuardReports, allowlist: set) -> list[str]:
    """The guard's reports not taken yet, and a change of torch's weights-only allowlist from ``allowlist`` (which
    is then put back), each as a line."""
    problems = [
        f"pid {r['pid']} {' '.join(r['argv'])}: {r['event']} {r['what']} called from {r['caller']} "
        f"(stack: {' < '.join(r['stack'][:6])})"
        for r in reports.take()
    ]
    now = set(torch.serialization.get_safe_globals())
    allowlist = allowlist | myrtle_pickle_guard.allowed_additions  # torch's own, as its modules are imported
    if now != allowlist:
        name = myrtle_pickle_guard.global_name
        problems.append(
            f"torch's weights-only allowlist changed: added {sorted(map(name, now - allowlist))}, "
            f"removed {sorted(map(name, allowlist - now))}"
        )
        import torch._weights_only_unpickler as wou

        wou._marked_safe_globals_set = set(allowlist)  # put back (add_safe_globals itself is refused by the guard)
    return problems


@pytest.fixture(autouse=True)
def pickle_guard():
    """Fail any test during which something unpickled other than through torch.load(weights_only=True), in this
    process or any it started (tests/guard), or after which torch's weights-only allowlist differs."""
    reports = GuardReports()
    allowlist = set(torch.serialization.get_safe_globals())
    yield reports
    problems = pickle_guard_problems(reports, allowlist)
    if problems:
        pytest.fail(
            "the pickle guard: something unpickled other than through torch.load(weights_only=True):\n  "
            + "\n  ".join(problems),
            pytrace=False,
        )


CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Three classes; 8 train, 4 val, 5 test images each (15 test images: not a batch multiple)."""
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny", CLASSES)


@pytest.fixture
def data_cfg(tmp_path, dataset) -> Path:
    return data_config(tmp_path / "data.json", dataset, len(CLASSES))


def reference_images(cfg_path: Path, split: str = "test") -> tuple[torch.Tensor, list[int]]:
    """A split's images as the evaluation transforms give them, and their labels, read without the package:
    PIL, the label map, and the data config's ops done here with torchvision's own functions (the ones the
    tests' and the users' evaluation transforms use: a square Resize, CenterCrop, Normalize)."""
    from torchvision.transforms.v2 import functional as TF

    cfg = json.loads(Path(cfg_path).read_text())
    data = json.loads(Path(cfg["data_config_path"]).read_text())
    root = Path(data["dataset_path"])
    ops = data["transform_ops_val"]
    assert set(ops) <= {"Resize", "CenterCrop", "Normalize"} and list(ops)[-1] == "Normalize", ops
    mean, std = (torch.tensor(ops["Normalize"][k]).view(3, 1, 1) for k in ("Mean", "Std"))
    label_map = json.loads((root / data["label_map"]).read_text())
    files = {"train": "train_files", "val": "valid_files", "test": "test_files"}[split]
    images, labels = [], []
    for line in (root / data[files]).read_text().split():
        pixels = torch.from_numpy(np.array(Image.open(root / line).convert("RGB"))).permute(2, 0, 1)  # uint8
        for name, arg in ops.items():
            if name == "Resize":
                pixels = TF.resize(pixels, [arg, arg] if isinstance(arg, int) else list(arg), antialias=True)
            elif name == "CenterCrop":
                pixels = TF.center_crop(pixels, [arg, arg])
        images.append((pixels.float() / 255 - mean) / std)
        labels.append(label_map[Path(line).parent.name])
    return torch.stack(images), labels


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TensorFloat-32 (10 mantissa bits), nearest, ties to even (finite values only)."""
    bits = t.contiguous().view(torch.int32)
    keep = ((bits >> 13) & 1) + 0xFFF  # round half to even on the 13 dropped bits
    return ((bits + keep) & ~0x1FFF).view(torch.float32)


REFERENCE_ROUNDING = {
    "FP32": None,
    "FP16_32": lambda t: t.half().float(),
    "BF16_32": lambda t: t.bfloat16().float(),
    "TF32": round_tf32,
    "FP16_16": lambda t: t.half().float(),
}


def reference_forward(
    sd: dict,
    img: torch.Tensor,
    heads: int,
    patch: int,
    head_dim_scale: int = 64,
    q_format: str = "FP32",
    only: tuple[str, str] | None = None,
) -> torch.Tensor:
    """The deploy layout's semantics, written from its description, straight off the tensors (attention scores
    divided by sqrt(head_dim_scale): 64, the head size of every shipped model; our ViT divides by its own head size).
    An independent reference: it uses nothing of the package. ``q_format``, as docs/quantization.md's formats table
    describes it: FP16_32, BF16_32 and TF32 round the inputs, weights and biases of every linear map and layer
    norm, and compute the rest in FP32; FP16_16 also rounds every result to FP16 (each linear map's and layer
    norm's output, the class token, the position embedding and its sum, the scaled attention scores, the
    softmax, the attention output, the GELU and both residual sums). ``only`` (in FP32): one tensor rounded to
    FP16 and nothing else, named by a linear map's or layer norm's layout name and "input" or "weights" (its
    weight and bias)."""
    r = REFERENCE_ROUNDING[q_format] or (lambda t: t)
    a = r if q_format == "FP16_16" else (lambda t: t)

    def at(name, role):  # the rounding of a linear map's or layer norm's input or weights
        if only is None:
            return r
        return REFERENCE_ROUNDING["FP16_32"] if only == (name, role) else (lambda t: t)

    def linear(x, name, bias=True):
        ri, rw = at(name, "input"), at(name, "weights")
        return a(ri(x) @ rw(sd[f"{name}.weight"]).T + (rw(sd[f"{name}.bias"]) if bias else 0))

    def norm(x, name):
        ri, rw = at(name, "input"), at(name, "weights")
        return a(F.layer_norm(ri(x), (x.shape[-1],), rw(sd[f"{name}.weight"]), rw(sd[f"{name}.bias"]), eps=1e-5))

    B, C, H, W = img.shape
    x = (
        img.reshape(B, C, H // patch, patch, W // patch, patch)
        .permute(0, 2, 4, 3, 5, 1)
        .reshape(B, -1, patch * patch * C)
    )
    x = linear(x, "patch_to_embedding")
    x = a(torch.cat([a(sd["cls_token"]).expand(B, -1, -1), x], 1) + a(sd["pos_embedding"]))
    dim = x.shape[-1]
    depth = len({k.split(".")[2] for k in sd if k.startswith("transformer.layers.")})
    for i in range(depth):
        p = f"transformer.layers.{i}"
        qkv = linear(norm(x, f"{p}.0.fn.norm"), f"{p}.0.fn.fn.to_qkv", bias=f"{p}.0.fn.fn.to_qkv.bias" in sd)
        q, k, v = qkv.reshape(B, -1, 3, heads, dim // heads).unbind(2)
        scores = a(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(head_dim_scale))
        out = a(torch.einsum("bhnm,bmhd->bnhd", a(scores.softmax(-1)), v).reshape(B, -1, dim))
        x = a(x + linear(out, f"{p}.0.fn.fn.to_out.0"))
        h = a(F.gelu(linear(norm(x, f"{p}.1.fn.norm"), f"{p}.1.fn.fn.net.0")))
        x = a(x + linear(h, f"{p}.1.fn.fn.net.3"))
    return linear(norm(x[:, 0], "mlp_head.0"), "mlp_head.1")


def near_tie_checkpoint(src: Path, dst: Path) -> Path:
    """``src`` with its class head's logits squeezed near a common 100 (weights x 0.01, bias + 100): FP16 holds
    numbers near 100 only every 1/16, so quantizing changes many predictions."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["model"]["mlp_head.1.weight"] *= 0.01
    ckpt["model"]["mlp_head.1.bias"] = ckpt["model"]["mlp_head.1.bias"] * 0.01 + 100
    torch.save(ckpt, dst)
    return dst


def reference_vit(cfg_path, ckpt_path):
    """A checkpoint's ViT without the package: its deploy entry read with torch.load and computed from its layout
    by conftest.reference_forward; a function of (images, q_format, only)."""
    vit = json.loads(cfg_path.read_text())["vit_config"]
    weights = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]

    def forward(images: torch.Tensor, q_format: str = "FP32", only: tuple[str, str] | None = None) -> torch.Tensor:
        scale = vit["embed_dim"] // vit["heads"]
        return reference_forward(weights, images, vit["heads"], vit["patch_size"], scale, q_format, only)

    return forward


def reference_logits(
    cfg_path, ckpt_path, q_format: str = "FP32", split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's logits on a split (the test split) of a config, and the labels, without the package: the
    images read and normalized by hand (reference_images) and the ViT of :func:`reference_vit` in ``q_format``."""
    images, labels = reference_images(cfg_path, split)
    return reference_vit(cfg_path, ckpt_path)(images, q_format), torch.tensor(labels)


def run_script_read_only(folder: Path, script: str, *args, **kwargs) -> subprocess.CompletedProcess:
    """``run_script`` (unprivileged) with ``folder`` made read-only (mode 555) for the script; restored after."""
    folder = Path(folder)
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    try:
        return run_script(script, *args, unprivileged=True, **kwargs)
    finally:
        folder.chmod(mode)
