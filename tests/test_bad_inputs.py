"""A corpus of bad inputs, each run through the script a user would run: one line on stderr that
names the file and the field, exit status 2, no traceback. And a property test: random mutations
of a valid config never end in a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import CLASSES, REPO, data_config, make_dataset, run_in_process, train_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from myrtle_vision.cli import main_guard
from myrtle_vision.config import load_config
from myrtle_vision.training import Trainer


def run(script: str, *args) -> tuple[int, str, str]:
    """Run a root script in this process, as ``python script args`` would: (exit status, stdout, stderr)."""
    proc = run_in_process(script, *args)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A dataset, a checkpoint of a short run and a teacher file, copied for each case to break."""
    root = tmp_path_factory.mktemp("pristine")
    make_dataset(root / "ds", CLASSES, counts=(8, 2, 3))
    cfg = train_config(
        root / "t.json",
        data_config(root / "d.json", root / "ds", 3),
        root / "out",
        train={"epochs": 1, "global_batch_size": 8},
    )
    code, out, err = run("train.py", "-c", cfg)
    assert code == 0, out + err
    shutil.copy(next((root / "out").glob("*/last.pt")), root / "ckpt.pt")
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model("mobilenet_v3_small", num_classes=3).state_dict(), root / "teacher.pth")
    return root


class Case:
    """A copy of the pristine inputs in ``root``, to break; ``train``/``vit``/... go into the config."""

    def __init__(self, pristine: Path, root: Path):
        shutil.copytree(pristine / "ds", root / "ds")
        for name in ("ckpt.pt", "teacher.pth"):
            shutil.copy(pristine / name, root / name)
        self.root, self.ds = root, root / "ds"
        self.data = {
            "dataset_path": str(self.ds),
            "train_files": "train_imagepaths.txt",
            "valid_files": "val_imagepaths.txt",
            "test_files": "test_imagepaths.txt",
            "label_map": "label_map.json",
            "number_of_classes": 3,
            "transform_ops_train": {"RandomHorizontalFlip": None, "Normalize": {"Mean": [0.5] * 3, "Std": [0.25] * 3}},
            "transform_ops_val": {"Normalize": {"Mean": [0.5] * 3, "Std": [0.25] * 3}},
        }
        self.data_path = root / "data.json"
        self.cfg_path = root / "train.json"
        self.cfg = json.loads(
            train_config(
                self.cfg_path, self.data_path, root / "out", train={"epochs": 1, "global_batch_size": 8}
            ).read_text()
        )

    def write(self) -> Path:
        """Write the data config, and the train config unless a case replaced or removed its file."""
        self.data_path.write_text(json.dumps(self.data))
        if self.cfg is not None:
            self.cfg_path.write_text(json.dumps(self.cfg))
        return self.cfg_path


def _set(d: dict, dotted: str, value):
    *parents, last = dotted.split(".")
    for p in parents:
        d = d[p]
    d[last] = value


def _del(d: dict, dotted: str):
    *parents, last = dotted.split(".")
    for p in parents:
        d = d[p]
    del d[last]


def _image(c: Case, n: int = 3) -> Path:
    """The n-th training image (the first is read at start-up, later ones during training)."""
    return c.ds / (c.ds / "train_imagepaths.txt").read_text().split()[n]


# Each case breaks one thing and says which script shows it and what its line must name.
# A function of the Case returns (script args after -c CONFIG, [needles]); "{cfg}", "{data}" and
# "{ds}" in needles are the config, data config and dataset paths.
def _raw_cfg(text, *needles):
    def f(c: Case):
        c.write()
        c.cfg_path.write_text(text(c.cfg_path.read_text()) if callable(text) else text)
        c.cfg = None
        return [], ["{cfg}", *needles]

    return f


def _cfg(dotted: str, value, *needles):
    def f(c: Case):
        _set(c.cfg, dotted, value)
        return [], ["{cfg}", dotted.split(".", 1)[1] if "." in dotted else dotted, *needles]

    return f


def _cfg_del(dotted: str, *needles):
    def f(c: Case):
        _del(c.cfg, dotted)
        return [], ["{cfg}", dotted.split(".")[-1], "missing", *needles]

    return f


def _data(key: str, value, *needles):
    def f(c: Case):
        _set(c.data, key, value)
        return [], ["{data}", key.split(".")[0], *needles]

    return f


def _file(action, *needles):
    def f(c: Case):
        needle = action(c)
        return [], [*needles, *([needle] if needle else [])]

    return f


def _spoil(data: bytes, n: int = 3):
    def f(c: Case) -> str:
        _image(c, n).write_bytes(data)
        return _image(c, n).name

    return f


def _ckpt(script: str, action, *needles):
    def f(c: Case):
        path = action(c)
        if script == "train.py":
            c.cfg["train_config"]["checkpoint_path"] = str(path)
            return [], [str(path), *needles]
        return ["--checkpoint", path], [str(path), *needles]

    f.script = script
    return f


def _teacher(action, *needles):
    def f(c: Case):
        path = action(c)
        c.cfg["distiller_config"] = {"teacher_model": "mobilenet_v3_small", "teacher_weights_path": str(path)}
        return [], ["teacher_weights_path", str(path), *needles]

    return f


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _other_architecture(c: Case) -> Path:
    ckpt = torch.load(c.root / "ckpt.pt", weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if ".1." not in k}  # one block fewer
    torch.save(ckpt, c.root / "other.pt")
    return c.root / "other.pt"


def _symlink_out(c: Case) -> None:
    outside = c.root / "outside.png"
    shutil.copy(_image(c, 0), outside)
    link = c.ds / "images" / "cat" / "link.png"
    link.symlink_to(outside)
    with open(c.ds / "train_imagepaths.txt", "a") as f:
        f.write("images/cat/link.png\n")


def _append_line(line: str):
    def f(c: Case):
        with open(c.ds / "train_imagepaths.txt", "a") as fh:
            fh.write(line + "\n")
        return str(c.ds / "train_imagepaths.txt")

    return f


def _edited(**entries):
    """The pristine checkpoint with ``entries`` replaced (None: removed)."""

    def f(c: Case) -> Path:
        ckpt = torch.load(c.root / "ckpt.pt", weights_only=True)
        for key, value in entries.items():
            ckpt.pop(key) if value is None else ckpt.__setitem__(key, value)
        torch.save(ckpt, c.root / "edited.pt")
        return c.root / "edited.pt"

    return f


def _mobilenet(classes: int, name="mobilenet_v3_small"):
    def f(c: Case):
        torch.save(torchvision.models.get_model(name, num_classes=classes).state_dict(), c.root / "t2.pth")
        return c.root / "t2.pth"

    return f


CASES = {
    # the train config's JSON
    "malformed JSON": _raw_cfg('{"train_config": {', "not valid JSON", "line 1"),
    "truncated JSON": _raw_cfg(lambda text: text[: len(text) // 2], "not valid JSON"),
    "empty config file": _raw_cfg("", "not valid JSON"),
    "config is a list": _raw_cfg("[1, 2]", "expected an object"),
    "config nested 100,000 deep": _raw_cfg('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    "binary config file": lambda c: (
        c.write(),
        c.cfg_path.write_bytes(b"\x80\x04\x95 pickle"),
        setattr(c, "cfg", None),
        ([], ["{cfg}", "not UTF-8"]),
    )[3],
    "config not found": lambda c: (c.cfg_path.unlink(), setattr(c, "cfg", None), ([], ["{cfg}", "not found"]))[2],
    "missing section": _cfg_del("vit_config"),
    "missing field": _cfg_del("train_config.lr"),
    "unknown field": _cfg("train_config.learning_rate", 0.1, "unknown field", "did you mean"),
    "misspelled section": _cfg("vit_confg", {}, "unknown field", "did you mean 'vit_config'"),
    "string for an integer": _cfg("train_config.epochs", "ten", "expected an integer"),
    "list for a number": _cfg("train_config.lr", [0.1], "expected a finite number"),
    "true for an integer": _cfg("train_config.epochs", True, "expected an integer"),
    "null for a required integer": _cfg("vit_config.image_size", None, "expected an integer"),
    "section of the wrong type": _cfg("train_config", [], "expected an object"),
    "negative lr": _cfg("train_config.lr", -0.1, "must not be negative"),
    "zero epochs": _cfg("train_config.epochs", 0, "at least 1"),
    "batch sizes that do not divide": _cfg("train_config.local_batch_size", 3, "not a multiple"),
    "image size not divisible by patch size": _cfg("vit_config.patch_size", 5, "not divisible by patch_size 5"),
    "embed_dim not divisible by heads": _cfg("vit_config.heads", 3, "not divisible by heads 3"),
    "unknown optimizer": _cfg("train_config.optimizer", "adamx", "not one of adamw, adam, sgd"),
    "unknown scheduler": _cfg("train_config.scheduler", "cosinus", "not one of"),
    "unknown q_format": _cfg("vit_config.q_format", "FP8", "not one of"),
    "unknown precision": _cfg("train_config.precision", "fp8", "not one of"),
    "dropout of 1.5": _cfg("vit_config.dropout", 1.5, "[0, 1)"),
    "infinite learning rate": _cfg("train_config.lr", float("inf"), "finite"),
    "a model too large to build": _cfg("vit_config.embed_dim", 10**7, "parameters"),
    "data config not found": _cfg("data_config_path", "nowhere.json", "nowhere.json: file not found"),
    "seed out of range": _cfg("train_config.seed", 2**70, "seed"),
    "lr_base_size of 0": _cfg("train_config.lr_base_size", 0, "train_config.lr_base_size", "[1, 2^31]"),
    "global batch too large to scale lr": _cfg("train_config.global_batch_size", 10**400, "at most 2^31"),
    "weight_decay_tokens not a boolean": _cfg("train_config.weight_decay_tokens", "yes", "expected true/false"),
    # the data config
    "one class": _data("number_of_classes", 1, "at least 2"),
    "unknown transform op": _data("transform_ops_train", {"RandomCropp": 32}, "RandomCropp"),
    "Normalize not last": _data(
        "transform_ops_val", {"Normalize": {"Mean": [0.5] * 3, "Std": [0.2] * 3}, "CenterCrop": 32}, "last"
    ),
    "Normalize with two channels": _data(
        "transform_ops_val", {"Normalize": {"Mean": [0.5] * 2, "Std": [0.2] * 2}}, "Normalize"
    ),
    "data config unknown field": _data("label_mapp", "x", "unknown field"),
    "Resize shorter_side not a size": _data(
        "transform_ops_val",
        {"Resize": {"shorter_side": [3, 4]}},
        "transform_ops_val.Resize.shorter_side",
        "positive integer",
    ),
    "string class count": _data("number_of_classes", "three", "expected an integer"),
    "class count disagrees with the label map": lambda c: (
        _set(c.data, "number_of_classes", 4),
        ([], [str(c.ds / "label_map.json"), "3 classes", "number_of_classes is 4"]),
    )[1],
    # the dataset on disk
    "dataset folder missing": _file(lambda c: shutil.rmtree(c.ds), "{ds}", "dataset_path"),
    "split file missing": _file(lambda c: (c.ds / "val_imagepaths.txt").unlink(), "val_imagepaths.txt", "not found"),
    "listed image missing": _file(lambda c: _image(c).unlink() or str(_image(c).name), "does not exist"),
    "corrupt image": _file(_spoil(b"\x89PNG\r\n\x1a\n garbage"), "cannot read image"),
    "zero-byte image": _file(_spoil(b""), "cannot read image"),
    "truncated image": _file(lambda c: _truncate(_image(c)).name, "cannot read image"),
    "corrupt first image": _file(_spoil(b"not an image", 0), "cannot read image"),
    "label map malformed": _file(
        lambda c: (c.ds / "label_map.json").write_text("{cat: 0") and "label_map.json", "cannot read the label map"
    ),
    "label map nested 100,000 deep": _file(
        lambda c: (c.ds / "label_map.json").write_text("[" * 100_000 + "]" * 100_000) and "label_map.json",
        "nested too deeply",
    ),
    "label map missing": _file(lambda c: (c.ds / "label_map.json").unlink() or "label_map.json", "not found"),
    "class folder not in the label map": _file(
        lambda c: (c.ds / "images" / "wolf").mkdir() or "wolf", "not in the label map"
    ),
    "empty split": _file(lambda c: (c.ds / "val_imagepaths.txt").write_text("") or "val_imagepaths.txt", "no images"),
    "path escaping with ..": _file(_append_line("../outside.png"), "outside the dataset folder"),
    "absolute path": _file(_append_line("/etc/hostname"), "outside the dataset folder"),
    "symlink pointing outside": _file(lambda c: _symlink_out(c) or "link.png", "outside the dataset folder"),
    # a split line that is no path (named by line number), an image a RandomCrop cannot crop (at start-up, or met
    # during training: per image in this process, in loader workers, on the device)
    "NUL byte in a split line": _file(
        lambda c: (
            f"{_append_line('images/cat/a' + chr(0) + 'b.png')(c)}:"
            f"{len((c.ds / 'train_imagepaths.txt').read_text().splitlines())}"
        ),
        "NUL byte",
    ),
    "split line of 5,000 characters": _file(
        lambda c: (
            f"{_append_line('images/cat/' + 'a' * 4985 + '.png')(c)}:"
            f"{len((c.ds / 'train_imagepaths.txt').read_text().splitlines())}"
        ),
        "cannot use the line (5000 characters) as an image path",
    ),
    "RandomCrop larger than the images": lambda c: (
        _set(c.data, "transform_ops_train", {"RandomCrop": 64, "Normalize": {"Mean": [0.5] * 3, "Std": [0.25] * 3}}),
        ([], ["{data}", "transform_ops_train.RandomCrop", _image(c, 0).name, "32x32, smaller than the crop 64x64"]),
    )[1],
    "an image smaller than RandomCrop": lambda c: (
        _set(c.data, "transform_ops_train", {"RandomCrop": 32, "Normalize": {"Mean": [0.5] * 3, "Std": [0.25] * 3}}),
        _image(c).write_bytes(b"P6 3 2 255\n" + bytes(range(18))),  # a binary PPM, 3 wide and 2 high
        ([], ["{data}", "transform_ops_train.RandomCrop", _image(c).name, "2x3, smaller than the crop 32x32"]),
    )[2],
    "an image smaller than RandomCrop, in loader workers": lambda c: (
        _set(c.cfg, "train_config.num_workers", 2),
        CASES["an image smaller than RandomCrop"](c),
    )[1],
    "an image smaller than RandomCrop, on the device": lambda c: (
        _set(c.data, "augment_on", "device"),
        CASES["an image smaller than RandomCrop"](c),
    )[1],
    # checkpoints
    "checkpoint missing": _ckpt(
        "train.py", lambda c: c.root / "nope.pt", "{cfg}", "train_config.checkpoint_path", "not found"
    ),
    "checkpoint_path a folder": _ckpt(
        "train.py", lambda c: c.root, "{cfg}", "train_config.checkpoint_path", "is a folder"
    ),
    "truncated checkpoint": _ckpt("train.py", lambda c: _truncate(c.root / "ckpt.pt"), "not a readable checkpoint"),
    "zero-byte checkpoint": _ckpt("test.py", lambda c: _truncate(c.root / "ckpt.pt", 0), "not a readable checkpoint"),
    "checkpoint of another architecture": _ckpt("test.py", _other_architecture, "depth"),
    "a tensor, not a checkpoint": _ckpt(
        "test_quantize.py", lambda c: torch.save(torch.ones(3), c.root / "t.pt") or c.root / "t.pt", "not a checkpoint"
    ),
    # teacher files
    "teacher file missing": _teacher(lambda c: c.root / "none.pth", "not found"),
    "teacher of another class count": _teacher(_mobilenet(7), "7-class"),
    "teacher of another architecture": _teacher(_mobilenet(3, "resnet18"), "not a mobilenet_v3_small"),
    "truncated teacher": _teacher(lambda c: _truncate(c.root / "teacher.pth")),
    # checkpoint entries that are not what this tool writes
    "iteration not a number": _ckpt("train.py", _edited(iteration="abc"), "'iteration' is 'abc'", "not a count"),
    "negative iteration": _ckpt("train.py", _edited(iteration=-5), "'iteration' is -5", "not a count"),
    "epoch not a number": _ckpt("train.py", _edited(epoch=1.5), "'epoch' is 1.5"),
    "best_val_top1 not a number": _ckpt("train.py", _edited(best_val_top1="high"), "'best_val_top1' is 'high'"),
    "no optimizer state": _ckpt("train.py", _edited(optimizer=None), "no 'optimizer' entry"),
    "no learning-rate schedule": _ckpt("train.py", _edited(lr_scheduler=None), "no 'lr_scheduler' entry"),
    "unknown q_rounding, test_quantize": _ckpt(
        "test_quantize.py",
        _edited(quantization={"q_format": "FP16_32", "q_rounding": "x"}),
        "'quantization.q_rounding' is 'x'",
        "nearest_even",
    ),
    "unknown q_format, train": _ckpt(
        "train.py",
        _edited(quantization={"q_format": "FP7", "q_rounding": "qtorch"}),
        "'quantization.q_format' is 'FP7'",
    ),
    "quantization not a mapping": _ckpt("test_quantize.py", _edited(quantization=[1]), "'quantization' is [1]"),
}
SCRIPTS = {name: getattr(f, "script", "train.py") for name, f in CASES.items()}


def test_the_corpus_is_large():
    assert len(CASES) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_naming_file_and_field(name, pristine, tmp_path):
    c = Case(pristine, tmp_path)
    extra, needles = CASES[name](c)
    c.write()
    code, out, err = run(SCRIPTS[name], "-c", c.cfg_path, *extra)
    assert code == 2, f"exit {code}\n{out}\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    paths = {"{cfg}": str(c.cfg_path), "{data}": str(c.data_path), "{ds}": str(c.ds)}
    for needle in needles:
        assert paths.get(needle, needle) in lines[0], f"{paths.get(needle, needle)!r} not in {lines[0]!r}"


# --- random mutations of a valid config -----------------------------------------------------------

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=300),
    st.sampled_from([10**6, 10**12, 2**63, -(2**63), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-2, 300), st.floats(-2, 2)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 5), max_size=2),
)


def _leaves(tree: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in tree.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _leaves(v, (*prefix, k))
    return out


@st.composite
def mutated(draw, tree: dict) -> tuple[dict, set[str]]:
    """``tree`` with one to three random edits (a value replaced, a key removed, an unknown or misspelled key),
    and the names of the keys edited (as written, and as an error message escapes them)."""
    tree = json.loads(json.dumps(tree))
    keys = set()
    for _ in range(draw(st.integers(1, 3))):
        paths = _leaves(tree)
        if not paths:
            break
        *parents, key = draw(st.sampled_from(paths))
        node = tree
        for p in parents:
            node = node[p]
        if not isinstance(node, dict) or key not in node:
            continue
        op = draw(st.sampled_from(["near", "near", "set", "set", "delete", "unknown", "typo"]))
        old = node[key]
        keys.add(key)
        if op == "near" and isinstance(old, bool):
            node[key] = not old
        elif op == "near" and isinstance(old, int):  # a plausible value: often valid, sometimes just not
            node[key] = draw(st.integers(-1, max(1, 2 * old + 2)))
        elif op == "near" and isinstance(old, float):
            node[key] = draw(st.floats(-0.5, max(1.0, 2 * old + 1)))
        elif op in ("set", "near"):
            node[key] = draw(JSON_VALUES)
        elif op == "delete":
            del node[key]
        elif op == "unknown":
            new = draw(st.text(min_size=1, max_size=8))
            node[new] = draw(JSON_VALUES)
            keys.add(new)
        else:
            new = key[:-1] + draw(st.sampled_from("aeiouxz_"))
            node[new] = node.pop(key)
            keys.add(new)
    return tree, keys | {k.encode("unicode_escape").decode("ascii") for k in keys}


def _set_up(cfg_path: Path) -> None:
    """What train.py does before its first update: load and check everything, build the model and data."""
    Trainer(load_config(cfg_path))


@pytest.fixture(scope="module")
def mutation_case(pristine, tmp_path_factory):
    root = tmp_path_factory.mktemp("mutations")
    c = Case(pristine, root)
    c.write()
    return c


@pytest.mark.slow
@settings(
    max_examples=int(os.environ.get("MUTATION_EXAMPLES", "400")),
    deadline=None,
    derandomize="MUTATION_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_config_mutations_never_end_in_a_traceback(mutation_case, data):
    c = mutation_case
    which = data.draw(st.sampled_from(["train", "data", "both"]))
    cfg, cfg_keys = data.draw(mutated(c.cfg)) if which != "data" else (c.cfg, set())
    dcfg, data_keys = data.draw(mutated(c.data)) if which != "train" else (c.data, set())
    c.cfg_path.write_text(json.dumps(cfg, allow_nan=True))
    c.data_path.write_text(json.dumps(dcfg, allow_nan=True))
    cwd, err = os.getcwd(), io.StringIO()
    os.chdir(c.root)  # a mutated output_directory is created relative to here
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            main_guard(lambda: _set_up(c.cfg_path))  # what train.py does with what it raises
    finally:
        os.chdir(cwd)
    event("set up" if exit_.value.code == 0 else "one-line error")
    if exit_.value.code != 0:
        line = err.getvalue()
        assert exit_.value.code == 2 and line.startswith("error: ") and line.count("\n") == 1
        # and it names the file and the field: a config file (or a file it names) and a key that was edited
        # (or, for a rule between fields, the field the rule is about)
        assert str(c.cfg_path) in line or str(c.data_path) in line, line
        assert any(k and k in line for k in cfg_keys | data_keys), (sorted(cfg_keys | data_keys), line)


def test_mutation_setup_really_builds_a_valid_config(mutation_case):
    """The property above is not vacuous: the unmutated config sets up without error."""
    mutation_case.write()
    _set_up(mutation_case.cfg_path)


def test_running_out_of_memory_is_one_line_not_a_traceback(capsys):
    def allocate_a_petabyte():
        torch.empty(2**50, dtype=torch.uint8)

    with pytest.raises(SystemExit) as exit_:
        main_guard(allocate_a_petabyte)
    assert exit_.value.code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory (") and "local_batch_size" in err


@pytest.mark.slow
def test_train_py_out_of_memory_is_one_line_and_exit_3(tmp_path, data_cfg):
    """A model too large for the memory the process may use (an address-space limit set on train.py alone)."""
    import resource
    import subprocess
    import sys

    from conftest import REPO, script_env

    env = script_env()
    # what the interpreter, torch and the package take before any model exists, on this machine
    baseline = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, myrtle_vision.training; x = torch.randn(512, 512) @ "
            "torch.randn(512, 512); print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    limit = int(baseline.stdout) * 1024 + (3 << 30)  # 3 GiB more; the model's weights alone are 6.4 GB
    cfg = train_config(
        tmp_path / "t.json",
        data_cfg,
        tmp_path / "out",
        vit={"embed_dim": 4096, "heads": 64, "mlp_dim": 16384, "depth": 8},
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-c", str(cfg), "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: out of memory (") and "local_batch_size" in lines[0], lines
    assert "can't allocate memory" in lines[0]


def test_other_runtime_errors_keep_their_traceback():
    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        main_guard(bug)


# --- where the scripts write: checked before the work, written atomically, never over a user's file -----------


def _case(pristine, tmp_path) -> Case:
    c = Case(pristine, tmp_path)
    c.write()
    return c


def _one_line(code: int, out: str, err: str, expected_code: int, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("error: "), f"exit {code}\n{out}\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("script", ["test.py", "test_quantize.py"])
def test_report_paths_that_are_not_writable_are_refused_before_the_evaluation(script, pristine, tmp_path):
    c = _case(pristine, tmp_path)
    (tmp_path / "a_folder.json").mkdir()
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "report.json").write_text('{"mine": true}')
    args = ["-c", c.cfg_path, "--checkpoint", c.root / "ckpt.pt"]
    for extra, needles in (
        (["--json", tmp_path / "a_folder.json"], ["--json", "is a folder"]),
        (["--output-dir", tmp_path / "a_file"], ["--output-dir", "is a file, not a folder"]),
        (["--json", tmp_path / "report.json"], ["--json", "already exists", "--force"]),
    ):
        code, out, err = run(script, *args, *extra)
        _one_line(code, out, err, 2, str(extra[1]), *needles)
        assert "top-1" not in out  # refused before the evaluation
    assert (tmp_path / "a_file").read_text() == "mine" and (tmp_path / "report.json").read_text() == '{"mine": true}'
    code, out, err = run(script, *args, "--json", tmp_path / "report.json", "--force")
    assert code == 0 and json.loads((tmp_path / "report.json").read_text())["num_images"] == 9, err
    code, out, err = run(script, *args, "--json", tmp_path / "report.json")  # an earlier report: replaced
    assert code == 0, err


@pytest.mark.slow
def test_report_folders_that_are_read_only_are_refused_before_the_evaluation(pristine, tmp_path):
    from conftest import run_script_read_only

    c = _case(pristine, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    for script, extra in (("test.py", ["--json", locked / "r.json"]), ("test_quantize.py", ["--output-dir", locked])):
        proc = run_script_read_only(locked, script, "-c", c.cfg_path, "--checkpoint", c.root / "ckpt.pt", *extra)
        _one_line(proc.returncode, proc.stdout, proc.stderr, 2, extra[0], str(locked), "cannot write there")
        assert "top-1" not in proc.stdout and list(locked.iterdir()) == []


@pytest.mark.slow
def test_a_report_that_cannot_be_written_leaves_the_earlier_one_whole(pristine, tmp_path):
    """A file-size limit (set by the kernel, RLIMIT_FSIZE) smaller than the confusion matrix: test.py stops with one
    line (exit 3) and the earlier run's picture in the same folder is as it was, not cut at the limit."""
    import resource
    import subprocess

    from conftest import script_env

    c = _case(pristine, tmp_path)
    args = [
        sys.executable,
        str(REPO / "test.py"),
        "-c",
        str(c.cfg_path),
        "--checkpoint",
        str(c.root / "ckpt.pt"),
        "--output-dir",
        str(tmp_path / "report"),
    ]
    subprocess.run(args, env=script_env(), check=True, capture_output=True)  # the earlier report (and the cache)
    picture = tmp_path / "report" / "confusion_matrix.png"
    before = picture.read_bytes()
    assert len(before) > 2048
    proc = subprocess.run(
        args,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)),
    )
    line = _one_line(proc.returncode, proc.stdout, proc.stderr, 3, str(picture), "cannot write the picture")
    assert "File too large" in line and picture.read_bytes() == before
    assert not list(picture.parent.glob(".*.tmp*"))


def _images_with_a_name_that_is_not_utf8(c: Case, tmp_path) -> Path:
    folder = tmp_path / "to_predict"
    folder.mkdir()
    shutil.copy(_image(c, 0), folder / "a.png")
    shutil.copy(_image(c, 1), Path(os.fsdecode(bytes(folder) + b"/b_\xff\xfe.png")))
    return folder


@pytest.mark.slow
def test_predict_writes_its_csv_atomically_and_as_utf8_whatever_the_file_names(pristine, tmp_path):
    """A file name that is not UTF-8 (Linux allows any bytes) is written with its odd bytes escaped; an earlier
    predictions CSV at --output is replaced whole, and a file of the user's only with --force."""
    import subprocess

    from conftest import script_env

    c = _case(pristine, tmp_path)
    folder = _images_with_a_name_that_is_not_utf8(c, tmp_path)
    out = tmp_path / "predictions.csv"
    args = [
        sys.executable,
        str(REPO / "predict.py"),
        "-c",
        str(c.cfg_path),
        "--checkpoint",
        str(c.root / "ckpt.pt"),
        "--output",
        str(out),
        str(folder),
    ]
    for _ in range(2):  # the second run replaces the first's CSV
        proc = subprocess.run(args, env=script_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        rows = out.read_bytes().decode("utf-8").splitlines()  # strict: valid UTF-8
        assert [r.split(",")[0] for r in rows] == ["path", f"{folder}/a.png", f"{folder}/b_\\xff\\xfe.png"]
        assert all(r.endswith(",") for r in rows[1:])  # no error column filled: both images predicted
    out.write_text("the user's own notes\n")
    proc = subprocess.run(args, env=script_env(), capture_output=True, text=True, timeout=600)
    _one_line(proc.returncode, proc.stdout, proc.stderr, 2, "--output", str(out), "already exists", "--force")
    assert out.read_text() == "the user's own notes\n"
    assert subprocess.run(args + ["--force"], env=script_env(), capture_output=True).returncode == 0


@pytest.mark.slow
def test_predict_refuses_bad_batch_sizes_and_unwritable_outputs_before_predicting(pristine, tmp_path):
    from conftest import run_script_read_only

    c = _case(pristine, tmp_path)
    args = ["-c", c.cfg_path, "--checkpoint", c.root / "ckpt.pt", c.ds / "images"]
    for size in ("-4", "0"):
        code, out, err = run("predict.py", *args, "--batch-size", size, "--output", tmp_path / "p.csv")
        _one_line(code, out, err, 2, f"--batch-size {size}", "at least 1")
    (tmp_path / "a_folder.csv").mkdir()
    code, out, err = run("predict.py", *args, "--output", tmp_path / "a_folder.csv")
    _one_line(code, out, err, 2, "--output", "is a folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    proc = run_script_read_only(locked, "predict.py", *args, "--output", locked / "p.csv")
    _one_line(proc.returncode, proc.stdout, proc.stderr, 2, "--output", str(locked), "cannot write there")
    assert "predicted" not in proc.stdout and not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_train_refuses_an_output_directory_it_cannot_write_before_opening_the_data(pristine, tmp_path):
    from conftest import run_script_read_only

    c = _case(pristine, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    c.cfg["train_config"]["output_directory"] = str(locked / "runs")
    c.write()
    proc = run_script_read_only(locked, "train.py", "-c", c.cfg_path)
    _one_line(
        proc.returncode,
        proc.stdout,
        proc.stderr,
        2,
        str(c.cfg_path),
        "train_config.output_directory",
        str(locked / "runs"),
        "cannot write there",
    )
    assert "decoding" not in proc.stdout and list(locked.iterdir()) == []
    # resuming in the checkpoint's own run directory, which is read-only now
    run_dir = next((pristine / "out").glob("*/last.pt")).parent
    shutil.copytree(run_dir, tmp_path / "run")
    c.cfg["train_config"].update(checkpoint_path=str(tmp_path / "run" / "last.pt"), epochs=2)
    c.write()
    proc = run_script_read_only(tmp_path / "run", "train.py", "-c", c.cfg_path)
    _one_line(
        proc.returncode,
        proc.stdout,
        proc.stderr,
        2,
        "train_config.checkpoint_path (its run directory)",
        "cannot write there",
    )


READ_ONLY_AFTER = """
import os
import torch
_save, _calls = torch.save, [0]
def _save_then_lock(obj, f, *args, **kwargs):
    _save(obj, f, *args, **kwargs)
    _calls[0] += 1
    if _calls[0] == int(os.environ["LOCK_AFTER_SAVES"]):  # the run's folder is made read-only under it
        os.chmod(os.path.dirname(f.name), 0o555)
torch.save = _save_then_lock
"""


@pytest.mark.slow
@pytest.mark.parametrize("saves", [1, 2])
def test_a_run_folder_made_read_only_mid_run_stops_with_exit_3_and_keeps_its_checkpoints(saves, pristine, tmp_path):
    """The folder turns read-only just after torch.save wrote checkpoint N's temporary file (its rename fails; with
    N = 1, before any checkpoint is in place) or checkpoint N-1's: either way one line, exit 3, and what was
    written before loads."""
    from conftest import run_script

    c = _case(pristine, tmp_path)
    c.cfg["train_config"].update(epochs=3, iters_per_checkpoint=1, global_batch_size=8, local_batch_size=8)
    c.write()
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(READ_ONLY_AFTER)
    proc = run_script(
        "train.py",
        "-c",
        c.cfg_path,
        unprivileged=True,
        env={"PYTHONPATH": f"{inject}{os.pathsep}{REPO}", "LOCK_AFTER_SAVES": str(saves)},
    )
    line = _one_line(
        proc.returncode,
        proc.stdout,
        proc.stderr,
        3,
        f"checkpoint_{saves:07d}.pt: cannot write the "
        "checkpoint (Permission denied); the previous checkpoints are intact",
    )
    run_dir = Path(line.split(": ")[1]).parent
    run_dir.chmod(0o755)
    from myrtle_vision import checkpoint as ckpt_io

    assert sorted(p.name for p in run_dir.glob("checkpoint_*.pt")) == [
        f"checkpoint_{i:07d}.pt" for i in range(1, saves)
    ]
    if saves > 1:
        assert ckpt_io.load(run_dir / "last.pt")["iteration"] == saves - 1
    # the temporary file could not be removed from the read-only folder: a hidden name, which no one takes for a
    # checkpoint and a resumed run deletes
    assert all(p.name.startswith(f".checkpoint_{saves:07d}.pt.tmp") for p in run_dir.glob(".*.tmp*"))


def test_a_failed_write_is_reported_even_when_its_cleanup_fails_too(tmp_path, monkeypatch):
    """On a read-only file system removing the temporary file fails as well (EROFS, even for a file that is not
    there); the error reported is the write's, as one line with exit 3, not the cleanup's."""
    import errno

    import myrtle_vision.files as files
    from myrtle_vision.errors import WriteFailed
    from myrtle_vision.weights.io import save_atomic

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(files, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "unlink", read_only)
    for write in (lambda p: files.write_atomic(p, "text", "report"), lambda p: save_atomic({"a": 1}, p)):
        with pytest.raises(WriteFailed, match="Read-only file system") as stopped:
            write(tmp_path / "out.pt")
        assert stopped.value.exit_code == 3 and "cannot write the" in str(stopped.value)


def test_resuming_a_finished_run_says_so_and_names_no_best_pt_that_does_not_exist(pristine, tmp_path):
    c = _case(pristine, tmp_path)
    c.cfg["train_config"]["checkpoint_path"] = str(c.root / "ckpt.pt")  # a copy outside its run directory
    c.write()
    code, out, err = run("train.py", "-c", c.cfg_path)
    assert code == 0, err
    assert "nothing to train" in out
    done = next(line for line in out.splitlines() if line.startswith("done: "))
    assert "best" not in done and Path(done.split("last checkpoint ")[1]).is_file()


def test_a_refused_checkpoint_leaves_no_run_directory_behind(pristine, tmp_path):
    c = _case(pristine, tmp_path)
    c.cfg["train_config"]["checkpoint_path"] = str(_edited(iteration="abc")(c))
    c.write()
    code, out, err = run("train.py", "-c", c.cfg_path)
    _one_line(code, out, err, 2, "'iteration' is 'abc'")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_interrupted_write_leaves_neither_a_partial_file_nor_its_temporary(tmp_path):
    """Ctrl-C (or a bug) while the data is being written: the earlier file stays, no temporary file is left."""
    import myrtle_vision.files as files

    (tmp_path / "report.json").write_text("earlier")

    def interrupted(f):
        f.write(b"half a rep")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(tmp_path / "report.json", interrupted, "report")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "earlier"
