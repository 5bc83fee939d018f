"""Files users are sent cannot run code, and split files cannot reach outside the dataset folder."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from conftest import CLASSES, assert_user_error, class_image, data_config, make_dataset, run_script, train_config


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "gift.pt"
    torch.save({"model": {"pos_embed": torch.zeros(1)}, "exploit": _RunsCode(marker)}, path)
    # it really is malicious: a plain (unsafe) load runs the command
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def _deit_section(teacher):
    return {"distiller_config": {"teacher_model": "mobilenet_v3_small", "teacher_weights_path": str(teacher)}}


@pytest.mark.parametrize("entry", ["train.py resume", "test.py", "test_quantize.py", "predict.py", "export.py",
                                   "test.py --teacher", "teacher file", "pretrained file"])
def test_a_file_crafted_to_run_code_is_refused_and_runs_nothing(entry, malicious, tmp_path, data_cfg):
    path, marker = malicious
    if entry == "train.py resume":
        cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", train={"checkpoint_path": str(path)})
        proc = run_script("train.py", "-c", cfg)
    elif entry == "pretrained file":
        cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", vit={"pretrained_weights": str(path)})
        proc = run_script("train.py", "-c", cfg)
    elif entry == "teacher file":
        cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", **_deit_section(path))
        proc = run_script("train.py", "-c", cfg)
    elif entry == "test.py --teacher":
        cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out", **_deit_section(path))
        proc = run_script("test.py", "-c", cfg, "--teacher")
    else:
        cfg = train_config(tmp_path / "t.json", data_cfg, tmp_path / "out")
        images = [tmp_path] if entry == "predict.py" else []
        proc = run_script(entry, "-c", cfg, "--checkpoint", path, *images)
    assert_user_error(proc, str(path), "Weights only load failed")
    assert not marker.exists()


UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
              "torch.serialization.load", "marshal.load", "marshal.loads", "dill.load", "dill.loads",
              "cloudpickle.load", "cloudpickle.loads", "joblib.load", "shelve.open", "torch.load"}


def unsafe_loads(text: str) -> list[str]:
    """Every place in ``text`` that could unpickle: a use of an unpickling function under any name it was
    imported as (``import torch as t``, ``from pickle import loads as l``, ``f = torch.load``), ``getattr``
    of a ``load``/``loads``, and ``numpy.load`` with ``allow_pickle``. A call ``torch.load(..., weights_only=True)``
    is the one allowed use."""
    import ast

    tree = ast.parse(text)
    alias = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def qualified(node) -> str | None:
        if isinstance(node, ast.Name):
            return alias.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = qualified(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    allowed = set()  # the func nodes of torch.load calls with weights_only=True
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = qualified(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name == "torch.load" and kw.get("weights_only") == "True":
            allowed.add(id(node.func))
        if name == "getattr" and len(node.args) > 1 and ast.unparse(node.args[1]).strip("'\"") in ("load", "loads"):
            found.append(ast.unparse(node))
        if name == "numpy.load" and kw.get("allow_pickle") not in (None, "False"):
            found.append(ast.unparse(node))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in allowed and qualified(node) in UNPICKLERS:
            found.append(ast.unparse(node))
    return found


def test_the_scan_finds_loads_however_they_are_spelled():
    for text in ("import torch\ntorch.load(p)", "import torch\ntorch.load(p, weights_only=False)",
                 "import torch as t\nt.load(p)", "from torch import load\nload(p)", "from torch import load as L\nL(p)",
                 "import pickle as p\np.loads(b)", "from pickle import Unpickler\nUnpickler(f).load()",
                 "import torch\nf = torch.load\nf(p)", "import torch\ngetattr(torch, 'load')(p)",
                 "import torch.serialization\ntorch.serialization.load(p)", "import numpy as np\nnp.load(p, allow_pickle=True)"):
        assert unsafe_loads(text), text
    for text in ("import torch\ntorch.load(p, map_location='cpu', weights_only=True)", "import numpy as np\nnp.load(p)",
                 "import json\njson.loads(s)"):
        assert not unsafe_loads(text), text


def test_every_load_in_the_package_the_scripts_and_the_notebook_uses_weights_only():
    """No file of ours can unpickle, under any spelling (see unsafe_loads), except through torch.load with
    weights_only=True; and there are such loads (the scan is not looking at nothing)."""
    import json

    from conftest import REPO

    sources = {p: p.read_text() for p in [*REPO.glob("*.py"), *(REPO / "myrtle_vision").rglob("*.py"),
                                          *(REPO / "benchmarks").glob("*.py")]}
    for nb in REPO.glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        sources[nb] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for path, text in sources.items():
        assert not unsafe_loads(text), f"{path}: {unsafe_loads(text)}"
    assert sum(text.count("weights_only=True") for text in sources.values()) >= 2


# --- split files cannot escape the dataset folder ----------------------------------------------------

def _escape(ds, tmp_path, how: str) -> str:
    outside = tmp_path / "outside"
    (outside / "cat").mkdir(parents=True)
    class_image(0, 0).save(outside / "cat" / "secret.png")
    if how == "dot-dot":
        line = "../outside/cat/secret.png"
    elif how == "absolute":
        line = str(outside / "cat" / "secret.png")
    elif how == "symlinked file":
        (ds / "images" / "cat" / "link.png").symlink_to(outside / "cat" / "secret.png")
        line = "images/cat/link.png"
    elif how == "symlinked folder":
        (ds / "images" / "cat" / "more").symlink_to(outside / "cat", target_is_directory=True)
        line = "images/cat/more/secret.png"
    else:
        line = "images/cat/../../../outside/cat/secret.png"
    with open(ds / "train_imagepaths.txt", "a") as f:
        f.write(line + "\n")
    return line


@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlinked file", "symlinked folder", "dot-dot inside"])
def test_split_paths_cannot_escape_the_dataset_folder(how, tmp_path):
    ds = make_dataset(tmp_path / "ds", CLASSES)
    line = _escape(ds, tmp_path, how)
    cfg = train_config(tmp_path / "t.json", data_config(tmp_path / "d.json", ds, 3), tmp_path / "out")
    n = len((ds / "train_imagepaths.txt").read_text().splitlines())
    assert_user_error(run_script("train.py", "-c", cfg), f"train_imagepaths.txt:{n}", line, "outside the dataset folder")


def test_a_symlink_that_stays_inside_the_dataset_is_allowed(tmp_path):
    ds = make_dataset(tmp_path / "ds", CLASSES)
    (ds / "images" / "cat" / "again.png").symlink_to(ds / "images" / "cat" / "cat_000.png")
    with open(ds / "train_imagepaths.txt", "a") as f:
        f.write("images/cat/again.png\n")
    cfg = train_config(tmp_path / "t.json", data_config(tmp_path / "d.json", ds, 3), tmp_path / "out",
                       train={"epochs": 1})
    run_script("train.py", "-c", cfg, check=True)


def test_pickle_protocol_is_not_used_for_anything_users_send(tmp_path):
    """Label maps and configs are JSON: a pickle given as a label map is a parse error, nothing more."""
    ds = make_dataset(tmp_path / "ds", CLASSES)
    marker = tmp_path / "code_ran"
    (ds / "label_map.json").write_bytes(pickle.dumps(_RunsCode(marker)))
    cfg = train_config(tmp_path / "t.json", data_config(tmp_path / "d.json", ds, 3), tmp_path / "out")
    assert_user_error(run_script("train.py", "-c", cfg), "label_map.json", "cannot read the label map")
    assert not marker.exists()
