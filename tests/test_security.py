"""Files users are sent cannot run code, and split files cannot reach outside the dataset folder."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import myrtle_pickle_guard
import pytest
import torch
from conftest import (
    CLASSES,
    REPO,
    assert_user_error,
    class_image,
    data_config,
    make_dataset,
    pickle_guard_problems,
    run_script,
    script_env,
    train_config,
)


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Calls:
    """Unpickling this calls ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def unguarded_env() -> dict:
    """The scripts' environment without the pickle guard (tests/guard): to show a crafted file really runs code."""
    env = script_env()
    env.pop(myrtle_pickle_guard.LOG_VARIABLE)
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="module")
def malicious(tmp_path_factory):
    """Files crafted to run code (touch a marker) when unpickled: one written by torch.save, and a plain pickle of
    protocol 5 (which torch's weights-only reader does not read, and warns about). Each really is malicious: a
    plain (unsafe) load, in a process without the guard, runs the command."""
    folder = tmp_path_factory.mktemp("crafted")
    marker = folder / "code_ran"
    files = {"torch.save": folder / "gift.pt", "pickle": folder / "gift.pkl"}
    torch.save({"model": {"pos_embed": torch.zeros(1)}, "exploit": _RunsCode(marker)}, files["torch.save"])
    files["pickle"].write_bytes(pickle.dumps({"model": {"pos_embed": [0.0]}, "exploit": _RunsCode(marker)}, protocol=5))
    for load in (
        f"import torch; torch.load({str(files['torch.save'])!r}, weights_only=False)",
        f"import pickle; pickle.load(open({str(files['pickle'])!r}, 'rb'))",
    ):
        subprocess.run([sys.executable, "-c", load], env=unguarded_env(), check=True, timeout=300)
        assert marker.exists(), load
        marker.unlink()
    return files, marker


def _deit_section(teacher):
    return {"distiller_config": {"teacher_model": "mobilenet_v3_small", "teacher_weights_path": str(teacher)}}


@pytest.mark.slow
@pytest.mark.parametrize(
    "entry,crafted",
    [
        (e, "torch.save")
        for e in (
            "train.py resume",
            "test.py",
            "test_quantize.py",
            "predict.py",
            "export.py",
            "test.py --teacher",
            "teacher file",
            "pretrained file",
        )
    ]
    + [("test.py", "pickle"), ("teacher file", "pickle")],
)
def test_a_file_crafted_to_run_code_is_refused_and_runs_nothing(entry, crafted, malicious, tmp_path, data_cfg):
    files, marker = malicious
    path = files[crafted]
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
    assert_user_error(proc, str(path), "refused", "it names posix.system, which a weights file does not hold")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr  # no warning, no blank line: the one line
    # never the advice to load it another way (torch's: retry with weights_only=False, or allowlist the global)
    for advice in (
        "weights_only",
        "WeightsUnpickler",
        "Weights only load failed",
        "safe_globals",
        "trusted source",
        "\x1b[",
    ):
        assert advice not in proc.stdout + proc.stderr, (advice, proc.stdout, proc.stderr)
    assert not marker.exists()


# --- the static scan: no file of ours can unpickle except through torch.load(weights_only=True) ----------

# Modules that unpickle (or, marshal, build code objects): any reference to one, under any name, is a finding.
UNPICKLING_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "marshal",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "pandas.io.pickle",
    "multiprocessing.reduction",
    "multiprocessing.connection",
    "multiprocessing.managers",
    "torch._weights_only_unpickler",
    "torch.package",
}
# Functions that unpickle, or widen what torch's weights-only reader accepts. torch.load and
# torch.serialization.load are allowed in one form only: called, with weights_only=True.
UNPICKLERS = {
    "torch.load",
    "torch.serialization.load",
    "torch.serialization._load",
    "torch.serialization._legacy_load",
    "torch.serialization.add_safe_globals",
    "torch.serialization.safe_globals",
    "torch.hub.load",
    "torch.hub.load_state_dict_from_url",
    "torch.utils.model_zoo.load_url",
    "pandas.read_pickle",
    "numpy.load",
    "torch.jit.load",
}  # torch.jit.load: TorchScript's own unpickler, and code to run
WEIGHTS_ONLY_CALLS = {"torch.load", "torch.serialization.load", "torch.hub.load_state_dict_from_url"}
# Names that mean unpickling whatever they are reached through (an alias the scan cannot follow, a module's
# re-export such as torch.serialization.pickle).
UNPICKLING_NAMES = {
    "pickle",
    "_pickle",
    "cPickle",
    "marshal",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "Unpickler",
    "_Unpickler",
    "ForkingPickler",
    "read_pickle",
    "add_safe_globals",
    "safe_globals",
    "_add_safe_globals",
    "_marked_safe_globals_set",
    "_weights_only_unpickler",
}
DYNAMIC_IMPORTS = {"importlib.import_module", "__import__", "builtins.__import__", "importlib.__import__"}
# getattr(m, <not a literal>) of these may reach an unpickler the scan cannot name
SENSITIVE_MODULES = {"torch", "numpy", "pandas", "importlib", "builtins", "sys", "multiprocessing"}


def unsafe_loads(text: str) -> list[str]:
    """Every place in ``text`` that could unpickle (each as its source text):

    * any reference to a module of :data:`UNPICKLING_MODULES` or a function of :data:`UNPICKLERS`, under any
      name it is reached by: an import alias (``import torch as t``, ``from pickle import loads as l``), an
      assignment (``f = torch.load``, ``t = torch``), ``getattr(m, "literal")``, ``sys.modules["literal"]``,
      ``importlib.import_module("literal")`` or ``__import__("literal")``; the import statement itself too;
    * any attribute or name of :data:`UNPICKLING_NAMES`, whatever it belongs to;
    * a dynamic import (``importlib.import_module``, ``__import__``) or ``sys.modules[...]`` of a name that
      is not a string literal; ``getattr`` of a ``load``/``loads``, or of a name that is not a string literal
      on a module of :data:`SENSITIVE_MODULES`; ``exec``/``eval`` of anything but a literal (a literal is
      scanned in turn);
    * any call with ``allow_pickle`` not the literal False, and ``numpy.load`` with ``**`` keywords, ``*``
      arguments or allow_pickle passed by position.

    The one allowed use: a call of torch.load (torch.serialization.load, torch.hub.load_state_dict_from_url)
    with ``weights_only=True``."""
    import ast

    tree = ast.parse(text)
    alias: dict[str, str] = {}
    found: list[str] = []

    def literal(node) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    def qualified(node) -> str | None:
        """The dotted name ``node`` refers to, through the aliases; None when it is not a name."""
        if isinstance(node, ast.Name):
            return alias.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = qualified(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call) and node.args:
            func = qualified(node.func)
            if func in DYNAMIC_IMPORTS:
                return literal(node.args[0])
            if func == "getattr" and len(node.args) > 1 and literal(node.args[1]):
                base = qualified(node.args[0])
                return f"{base}.{literal(node.args[1])}" if base else None
            if func == "sys.modules.get":
                return literal(node.args[0])
        if isinstance(node, ast.Subscript) and qualified(node.value) == "sys.modules":
            return literal(node.slice)
        return None

    def unsafe_name(name: str | None) -> bool:
        if not name:
            return False
        parts = name.split(".")
        return any(".".join(parts[:i]) in UNPICKLING_MODULES for i in range(1, len(parts) + 1)) or name in UNPICKLERS

    for node in ast.walk(tree):  # the names things are known by
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if unsafe_name(a.name):
                    found.append(ast.unparse(node))
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
                if unsafe_name(f"{node.module}.{a.name}") or a.name in UNPICKLING_NAMES:
                    found.append(ast.unparse(node))
    for node in ast.walk(tree):  # assignments of a name: f = torch.load, t = torch, p = importlib.import_module("x")
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            name = qualified(node.value)
            for t in targets:
                if name and isinstance(t, ast.Name) and t.id != name:
                    alias[t.id] = name

    allowed = set()  # the func nodes of weights-only calls
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = qualified(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name in WEIGHTS_ONLY_CALLS and kw.get("weights_only") == "True":
            allowed.add(id(node.func))
        if name in DYNAMIC_IMPORTS and not (node.args and literal(node.args[0])):
            found.append(ast.unparse(node))
        if name == "getattr" and len(node.args) > 1:
            attr = literal(node.args[1])
            base = qualified(node.args[0]) or ""
            if attr in ("load", "loads") or (
                attr is None and base.split(".")[0] in SENSITIVE_MODULES | UNPICKLING_MODULES
            ):
                found.append(ast.unparse(node))
        if name in ("exec", "eval", "builtins.exec", "builtins.eval") and node.args:
            code = literal(node.args[0])
            if code is None:
                found.append(ast.unparse(node))
            else:
                found.extend(unsafe_loads(code))
        if "allow_pickle" in kw and kw["allow_pickle"] != "False":
            found.append(ast.unparse(node))
        if name == "numpy.load" and (
            None in kw or len(node.args) > 2 or any(isinstance(a, ast.Starred) for a in node.args)
        ):
            found.append(ast.unparse(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and qualified(node.value) == "sys.modules" and literal(node.slice) is None:
            found.append(ast.unparse(node))
        if not isinstance(node, (ast.Name, ast.Attribute, ast.Call, ast.Subscript)) or id(node) in allowed:
            continue
        name = qualified(node)
        if name == "numpy.load" and not isinstance(node, ast.Call):
            parent_calls = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and c.func is node]
            if parent_calls:
                continue  # a call of numpy.load: judged by its arguments above
            found.append(ast.unparse(node))
        elif unsafe_name(name):
            found.append(ast.unparse(node))
        elif (isinstance(node, ast.Attribute) and node.attr in UNPICKLING_NAMES) or (
            isinstance(node, ast.Name) and node.id in UNPICKLING_NAMES
        ):
            found.append(ast.unparse(node))
    return found


# Every spelling of an unpickling the scan must find, each a program that really unpickles a crafted payload
# (the names are bound by _payloads: pkl/data a pickle that runs code, npy an object array saved with pickle, pt
# a torch.save'd file that runs code, pt_call one that calls shutil.copyfile, code a marshalled code object).
SPELLINGS = {
    "pickle.loads": "import pickle as p\np.loads(data)",
    "pickle.Unpickler": "from pickle import Unpickler\nUnpickler(open(pkl, 'rb')).load()",
    "pickle._loads": "import pickle\npickle._loads(data)",
    "pickle._load": "import pickle\npickle._load(open(pkl, 'rb'))",
    "pickle._Unpickler": "import pickle\npickle._Unpickler(open(pkl, 'rb')).load()",
    "_pickle.loads": "import _pickle\n_pickle.loads(data)",
    "importlib.import_module": "import importlib\nimportlib.import_module('pickle').loads(data)",
    "__import__": "__import__('pickle').loads(data)",
    "import_module of a computed name": (
        "import importlib\nimportlib.import_module(''.join(['pic', 'kle'])).loads(data)"
    ),
    "sys.modules": "import pickle, sys\nsys.modules['pickle'].loads(data)",
    "torch.serialization.pickle": "import torch.serialization\ntorch.serialization.pickle.loads(data)",
    "ForkingPickler": "from multiprocessing.reduction import ForkingPickler\nForkingPickler.loads(data)",
    "numpy allow_pickle=True": "import numpy as np\nnp.load(npy, allow_pickle=True)",
    "numpy **allow_pickle": "import numpy as np\nnp.load(npy, **{'allow_pickle': True})",
    "torch.load weights_only=False": "import torch\ntorch.load(pt, weights_only=False)",
    "torch.load aliased": "import torch\nt = torch\nt.load(pt, weights_only=False)",
    "marshal.loads": "import marshal\nexec(marshal.loads(code))",
    "safe_globals": "import shutil, torch\nwith torch.serialization.safe_globals([shutil.copyfile]):\n"
    "    torch.load(pt_call, weights_only=True)",
    "add_safe_globals": "import shutil, torch\ntorch.serialization.add_safe_globals([shutil.copyfile])\n"
    "torch.load(pt_call, weights_only=True)",
}


def test_the_scan_finds_loads_however_they_are_spelled():
    # the 11 spellings the scan has always found
    for text in (
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=False)",
        "import torch as t\nt.load(p)",
        "from torch import load\nload(p)",
        "from torch import load as L\nL(p)",
        "import pickle as p\np.loads(b)",
        "from pickle import Unpickler\nUnpickler(f).load()",
        "import torch\nf = torch.load\nf(p)",
        "import torch\ngetattr(torch, 'load')(p)",
        "import torch.serialization\ntorch.serialization.load(p)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
    ):
        assert unsafe_loads(text), text
    # the audit's (issue 24), and the other unpickling modules, and ways around a list of names
    for text in [
        *SPELLINGS.values(),
        "import pickle",
        "import _pickle as fast",
        "import cPickle",
        "import dill\ndill.loads(b)",
        "import cloudpickle\ncloudpickle.load(f)",
        "import joblib\njoblib.load(p)",
        "import shelve\nshelve.open(p)",
        "import marshal\nmarshal.load(f)",
        "from pickle import _Unpickler as U\nU(f).load()",
        "import pandas as pd\npd.read_pickle(p)",
        "from pandas import read_pickle\nread_pickle(p)",
        "import pandas\npandas.io.pickle.read_pickle(p)",
        "df.read_pickle(p)",
        "from torch.serialization import add_safe_globals\nadd_safe_globals([C])",
        "import torch\nwith torch.serialization.safe_globals([C]):\n    torch.load(p, weights_only=True)",
        "import torch as t\nt.serialization._weights_only_unpickler._marked_safe_globals_set.add(C)",
        "import importlib\nm = importlib.import_module(name)",
        "m = __import__(name)",
        "import builtins\nbuiltins.__import__('pickle')",
        "import sys\nsys.modules[name].loads(b)",
        "import sys\nsys.modules.get('pickle').loads(b)",
        "import importlib\nimportlib.import_module('torch').load(p)",
        "import torch\ngetattr(torch, name)(p)",
        "import torch\ngetattr(torch.serialization, 'lo' + 'ad')(p)",
        "exec('import pickle')",
        "exec(source)",
        "eval(expr)",
        "import numpy as np\nnp.load(p, None, True)",
        "import numpy as np\nnp.load(*args)",
        "import numpy as np\nkw = {'allow_pickle': True}\nnp.load(p, **kw)",
        "import numpy, functools\nfunctools.partial(numpy.load, allow_pickle=True)",
        "import numpy as np\nloader = np.load",
        "x.allow(p, allow_pickle=flag)",
        "import torch\nfunctools.partial(torch.load, weights_only=True)",
        "import torch.hub\ntorch.hub.load_state_dict_from_url(u)",
        "import torch\ntorch.package.PackageImporter(p)",
        "from multiprocessing.connection import Client\nClient(address).recv()",
        "import torch\ntorch.jit.load(p)",
    ]:
        assert unsafe_loads(text), text
    # harmless code is not flagged
    for text in (
        "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load(p)",
        "import json\njson.loads(s)",
        "import numpy as np\nnp.load(p, allow_pickle=False)",
        "import numpy as np\nnp.load(p, mmap_mode='r')",
        "import importlib\nimportlib.import_module('json').loads(s)",
        "__import__('os').path.join('a', 'b')",
        "import torch\ngetattr(torch, 'float16')",
        "getattr(model, name)",
        "model.eval()",
        "exec('x = 1')",
        "import torch\ntorch.save(x, p)",
        "df.to_pickle(p)",
        "import pickletools\npickletools.dis(b)",
        "import sys\nsys.modules['json'].loads(s)",
        "import torch\nwith torch.no_grad():\n    y = m(x)",
        "import torch.hub\ntorch.hub.load_state_dict_from_url(u, weights_only=True)",
    ):
        assert not unsafe_loads(text), (text, unsafe_loads(text))


def test_every_load_in_the_package_the_scripts_and_the_notebook_uses_weights_only():
    """No file of ours can unpickle, under any spelling (see unsafe_loads), except through torch.load with
    weights_only=True; and there are such loads (the scan is not looking at nothing)."""
    import json

    from conftest import REPO

    sources = {
        p: p.read_text()
        for p in [*REPO.glob("*.py"), *(REPO / "myrtle_vision").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    }
    for nb in REPO.glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        sources[nb] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for path, text in sources.items():
        assert not unsafe_loads(text), f"{path}: {unsafe_loads(text)}"
    assert sum(text.count("weights_only=True") for text in sources.values()) >= 2


# --- the run-time guard (tests/guard): any unpickling but torch's weights-only one, in any process, fails a test --


def _payloads(folder: Path) -> dict:
    """The crafted inputs SPELLINGS read, each of which runs code (touches ``marker``) when unpickled or run."""
    import marshal

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "code_ran"
    names = {
        "marker": str(marker),
        "pkl": str(folder / "gift.pkl"),
        "npy": str(folder / "gift.npy"),
        "pt": str(folder / "gift.pt"),
        "pt_call": str(folder / "call.pt"),
        "marshalled": str(folder / "code.bin"),
    }
    Path(names["pkl"]).write_bytes(pickle.dumps(_RunsCode(marker)))
    np.save(names["npy"], np.array([_RunsCode(marker)], dtype=object), allow_pickle=True)
    torch.save({"exploit": _RunsCode(marker)}, names["pt"])
    torch.save({"exploit": _Calls(shutil.copyfile, names["pkl"], str(marker))}, names["pt_call"])
    Path(names["marshalled"]).write_bytes(marshal.dumps(compile(f"open({str(marker)!r}, 'w').close()", "<c>", "exec")))
    return names


def _namespace(names: dict) -> dict:
    return {
        "__name__": "crafted",
        **names,
        "data": Path(names["pkl"]).read_bytes(),
        "code": Path(names["marshalled"]).read_bytes(),
    }


def _expected(spelling: str) -> tuple[str, str | None]:
    """The guard's report for a spelling: (event, what it names); None where the name is not fixed."""
    if "safe_globals" in spelling:
        return "torch.serialization.add_safe_globals", "shutil.copyfile"
    if spelling == "marshal.loads":
        return "marshal.loads", None
    if spelling.startswith("numpy"):
        return "pickle.find_class", None  # numpy's array rebuilder, the first global of an object array
    return "pickle.find_class", "posix.system"


def _assert_reported(reports: list[dict], spellings) -> None:
    assert len(reports) == len(spellings), reports
    for spelling, report in zip(spellings, reports):
        event, what = _expected(spelling)
        assert report["event"] == event and (what is None or report["what"] == what), (spelling, report)
        if spelling.startswith("numpy"):
            assert report["what"].endswith("multiarray._reconstruct") and "numpy" in report["caller"], report


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_guard_stops_and_reports_each_spelling_in_the_test_process(spelling, tmp_path, pickle_guard):
    names = _payloads(tmp_path)
    with pytest.raises(myrtle_pickle_guard.UnpicklingRefused):
        exec(SPELLINGS[spelling], _namespace(names))
    assert not Path(names["marker"]).exists()  # refused inside the unpickler, before anything it names is called
    reports = pickle_guard.take()  # expected: taken, so the autouse check does not fail this test
    _assert_reported(reports, [spelling])
    assert reports[0]["pid"] == os.getpid()


DEMO = """
import json, sys
for name, (snippet, names) in json.loads(open(sys.argv[1]).read()).items():
    ns = {"__name__": "crafted", **names, "data": open(names["pkl"], "rb").read(),
          "code": open(names["marshalled"], "rb").read()}
    try:
        exec(snippet, ns)
        print(name, "ran", flush=True)
    except Exception as e:
        print(name, "raised", type(e).__name__, flush=True)
"""


@pytest.mark.slow
def test_the_guard_stops_and_reports_each_spelling_in_a_script(tmp_path, pickle_guard):
    """A script the tests run has the guard (through script_env); the same script without it runs every payload,
    so each is live."""
    import json

    cases = {name: (snippet, _payloads(tmp_path / f"case{i}")) for i, (name, snippet) in enumerate(SPELLINGS.items())}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "demo.py").write_text(DEMO)
    proc = run_script(tmp_path / "demo.py", tmp_path / "cases.json", check=True)
    assert proc.stdout.splitlines() == [f"{name} raised UnpicklingRefused" for name in SPELLINGS], proc.stdout
    assert not any(Path(names["marker"]).exists() for _, names in cases.values())
    reports = pickle_guard.take()
    _assert_reported(reports, list(SPELLINGS))
    assert {r["pid"] for r in reports} != {os.getpid()} and all(r["argv"][0].endswith("demo.py") for r in reports)

    unguarded = subprocess.run(
        [sys.executable, str(tmp_path / "demo.py"), str(tmp_path / "cases.json")],
        env=unguarded_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert unguarded.stdout.splitlines() == [f"{name} ran" for name in SPELLINGS], unguarded.stdout
    assert all(Path(names["marker"]).exists() for _, names in cases.values())
    assert pickle_guard.take() == []


@pytest.mark.slow
@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_the_guard_stops_and_reports_unpickling_in_dataloader_workers(start, tmp_path, pickle_guard):
    """The workers' own traffic (indices, batches of tensors, a fork server's Process objects) passes; a worker
    that unpickles a file is stopped and reported."""
    from torch.utils.data import DataLoader

    clean = DataLoader(
        [torch.full((2,), float(i)) for i in range(4)], batch_size=2, num_workers=2, multiprocessing_context=start
    )
    assert [b[:, 0].tolist() for b in clean] == [[0.0, 1.0], [2.0, 3.0]]
    assert pickle_guard.take() == []
    names = _payloads(tmp_path)
    crafted = DataLoader(
        [Path(names["pkl"]).read_bytes()],
        batch_size=None,
        num_workers=1,
        collate_fn=pickle._loads,
        multiprocessing_context=start,
    )
    with pytest.raises(myrtle_pickle_guard.UnpicklingRefused):
        next(iter(crafted))
    assert not Path(names["marker"]).exists()
    reports = pickle_guard.take()
    _assert_reported(reports, ["pickle._loads"])
    assert reports[0]["pid"] != os.getpid()


def test_the_guard_keeps_a_sitecustomize_a_test_injects(tmp_path, pickle_guard):
    """Tests that inject a sitecustomize of their own (tests/test_faults.py) keep both: theirs runs, and the guard."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(f"open({str(tmp_path / 'injected_ran')!r}, 'w').close()\n")
    names = _payloads(tmp_path / "payload")
    (tmp_path / "demo.py").write_text(f"import pickle\npickle.loads(open({names['pkl']!r}, 'rb').read())\n")
    proc = run_script(tmp_path / "demo.py", env={"PYTHONPATH": f"{inject}{os.pathsep}{REPO}"})
    assert proc.returncode == 1 and "UnpicklingRefused" in proc.stderr, proc.stderr
    assert (tmp_path / "injected_ran").exists() and not Path(names["marker"]).exists()
    _assert_reported(pickle_guard.take(), ["pickle.loads"])


def test_torch_weights_only_loads_and_the_allowed_traffic_raise_no_report(tmp_path, pickle_guard):
    """torch's weights-only reader never raises "pickle.find_class" (it resolves globals from its own allowlist),
    so the guard lets it be; nor do imports (marshal of .pyc files). The C unpickler does raise it for the same file."""
    import collections
    import importlib

    state = {
        "model": collections.OrderedDict(w=torch.nn.Parameter(torch.ones(2))),
        "step": 3,
        "name": "x",
        "shape": torch.Size([2]),
        "dtype": torch.float16,
    }
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))
    importlib.reload(importlib.import_module("colorsys"))  # read from its .pyc: marshal.loads, allowed
    assert pickle_guard.take() == []
    with pytest.raises(myrtle_pickle_guard.UnpicklingRefused):
        torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    assert [r["event"] for r in pickle_guard.take()] == ["pickle.find_class"]


@pytest.mark.slow
def test_a_widened_allowlist_fails_the_test_and_the_script(tmp_path, pickle_guard):
    """Widening torch's allowlist around add_safe_globals (which the guard refuses) is still found: at the end of
    the test in this process, at exit in a script."""
    import torch._weights_only_unpickler as wou

    before = set(torch.serialization.get_safe_globals())
    wou._marked_safe_globals_set = wou._marked_safe_globals_set | {subprocess.call}
    problems = pickle_guard_problems(pickle_guard, before)  # what the autouse check does at the end of a test
    assert len(problems) == 1 and "subprocess.call" in problems[0] and "allowlist changed" in problems[0], problems
    assert set(torch.serialization.get_safe_globals()) == before  # and it put the allowlist back
    (tmp_path / "widen.py").write_text(
        "import subprocess, torch._weights_only_unpickler as w\n"
        "w._marked_safe_globals_set = w._marked_safe_globals_set | {subprocess.call}\n"
    )
    run_script(tmp_path / "widen.py", check=True)
    reports = pickle_guard.take()
    assert [(r["event"], r["what"]) for r in reports] == [("torch safe globals changed", "subprocess.call")], reports


NESTED = """
import os, pickle, subprocess, sys
import torch
from conftest import script_env


class Harmless:
    def __reduce__(self):
        return (os.getcwd, ())


def test_unpickles_and_swallows_the_refusal():
    try:
        pickle.loads(pickle.dumps(Harmless()))
    except Exception:
        pass


def test_a_script_it_runs_unpickles():
    code = "import os, pickle; pickle.loads(pickle.dumps(os.getcwd))"
    subprocess.run([sys.executable, "-c", code], env=script_env())


def test_widens_the_allowlist():
    import torch._weights_only_unpickler as w
    w._marked_safe_globals_set = w._marked_safe_globals_set | {os.getcwd}


def test_loads_weights_only(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert torch.load(tmp_path / "w.pt", weights_only=True)["w"].sum() == 2
"""


@pytest.mark.slow
def test_the_guard_fails_the_test_during_which_something_unpickled(tmp_path, pickle_guard):
    """The autouse fixture itself, run by a pytest of its own on four tests: one unpickles (and swallows the
    guard's refusal), one runs a script that unpickles, one widens torch's allowlist; each of those fails, naming
    what happened; the fourth (a weights-only load) passes."""
    (tmp_path / "test_nested.py").write_text(NESTED)
    env = {k: v for k, v in os.environ.items() if k != myrtle_pickle_guard.LOG_VARIABLE}  # a log of its own
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rA", "-q", "test_nested.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    import re

    errors = dict(re.findall(r"_+ ERROR at teardown of (\w+) _+\n(.*?)(?=\n_{3,} |\n={3,} )", proc.stdout, re.S))
    assert errors.keys() == {
        "test_unpickles_and_swallows_the_refusal",
        "test_a_script_it_runs_unpickles",
        "test_widens_the_allowlist",
    }, proc.stdout + proc.stderr
    assert (
        "pickle.find_class posix.getcwd called from test_nested:test_unpickles_and_swallows_the_refusal"
        in errors["test_unpickles_and_swallows_the_refusal"]
    )
    assert "pickle.find_class posix.getcwd called from __main__:<module>" in errors["test_a_script_it_runs_unpickles"]
    assert "allowlist changed: added ['posix.getcwd']" in errors["test_widens_the_allowlist"]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("4 passed, 3 errors"), proc.stdout
    assert proc.returncode == 1
    assert pickle_guard.take() == []  # the nested run's reports went to its own log


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


@pytest.mark.slow
@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlinked file", "symlinked folder", "dot-dot inside"])
def test_split_paths_cannot_escape_the_dataset_folder(how, tmp_path):
    ds = make_dataset(tmp_path / "ds", CLASSES)
    line = _escape(ds, tmp_path, how)
    cfg = train_config(tmp_path / "t.json", data_config(tmp_path / "d.json", ds, 3), tmp_path / "out")
    n = len((ds / "train_imagepaths.txt").read_text().splitlines())
    assert_user_error(
        run_script("train.py", "-c", cfg), f"train_imagepaths.txt:{n}", line, "outside the dataset folder"
    )


@pytest.mark.slow
def test_a_symlink_that_stays_inside_the_dataset_is_allowed(tmp_path):
    ds = make_dataset(tmp_path / "ds", CLASSES)
    (ds / "images" / "cat" / "again.png").symlink_to(ds / "images" / "cat" / "cat_000.png")
    with open(ds / "train_imagepaths.txt", "a") as f:
        f.write("images/cat/again.png\n")
    cfg = train_config(
        tmp_path / "t.json", data_config(tmp_path / "d.json", ds, 3), tmp_path / "out", train={"epochs": 1}
    )
    run_script("train.py", "-c", cfg, check=True)


@pytest.mark.slow
def test_pickle_protocol_is_not_used_for_anything_users_send(tmp_path):
    """Label maps and configs are JSON: a pickle given as a label map is a parse error, nothing more."""
    ds = make_dataset(tmp_path / "ds", CLASSES)
    marker = tmp_path / "code_ran"
    (ds / "label_map.json").write_bytes(pickle.dumps(_RunsCode(marker)))
    cfg = train_config(tmp_path / "t.json", data_config(tmp_path / "d.json", ds, 3), tmp_path / "out")
    assert_user_error(run_script("train.py", "-c", cfg), "label_map.json", "cannot read the label map")
    assert not marker.exists()
