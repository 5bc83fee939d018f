"""The tests' run-time guard: no unpickling except torch.load(weights_only=True), in any process of a test.

Installed in the pytest process by tests/conftest.py and, through tests/guard/sitecustomize.py (on the
PYTHONPATH of every process the tests start, DataLoader workers and torchrun's processes included), in every
Python process below it. It watches three audit events (PEP 578):

* ``pickle.find_class``: raised by both the C and the pure-Python unpickler (``pickle.Unpickler``,
  ``pickle._Unpickler``, ``loads``, ``_loads``, ``load``, ``_load``, whatever module or alias they are reached
  through, numpy's ``allow_pickle``, pandas' ``read_pickle``, ``torch.load(weights_only=False)``, ...) whenever
  a pickle names a global. A pickle can run code only by naming a global (a function to call, a class to
  build). torch's weights-only unpickler (torch/_weights_only_unpickler.py) is a separate reader that resolves
  globals from its own allowlist and never raises this event.
* ``marshal.load`` / ``marshal.loads``: marshal builds code objects.

An event is allowed only when the code that called the unpickler is one of :data:`ALLOWED_PICKLE` (or, for
marshal, :data:`ALLOWED_MARSHAL`), by module and function of the calling frame; see those for why each is
safe. Anything else is refused (the unpickler raises :class:`UnpicklingRefused`, so nothing the pickle names is
called) and recorded, one JSON line, in the file named by the environment variable :data:`LOG_VARIABLE`; the
tests' autouse fixture fails the test during which a line was written.

It also keeps torch's weights-only allowlist as it is: ``torch.serialization.add_safe_globals`` and the
``torch.serialization.safe_globals`` context are refused and recorded, and at exit a process whose
allowlist differs from what it was when torch was imported records that too.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

LOG_VARIABLE = "MYRTLE_PICKLE_GUARD_LOG"
WATCHED = frozenset({"pickle.find_class", "marshal.loads", "marshal.load"})
WEIGHTS_ONLY_MODULE = "torch._weights_only_unpickler"

ALLOWED_PICKLE = frozenset(
    {
        # Queue.get and SimpleQueue.get (DataLoader's index, result and worker-status queues): objects that another
        # process of ours put on a queue it shares with this one, over a pipe only those processes hold.
        ("multiprocessing.queues", "get"),
        # Connection.recv: the same over a multiprocessing pipe (the fork server, Pool, the queues' readers).
        ("multiprocessing.connection", "recv"),
        # torch.multiprocessing's queues (ConnectionWrapper.recv): the same, with torch's reductions of tensors.
        ("torch.multiprocessing.queue", "recv"),
        # A spawned or fork-server child reading the preparation data and its Process object from its parent.
        ("multiprocessing.spawn", "_main"),
        # broadcast_object_list / all_gather_object (myrtle_vision/distributed.py): what another rank of the same
        # job pickled; the ranks are processes of one run started together by torchrun or train.py.
        ("torch.distributed.distributed_c10d", "_tensor_to_object"),
        # torchrun's agent reading the rendezvous state (_RendezvousState) that the agents of the same job keep in
        # the job's own store (the c10d store torchrun started); no worker process of ours reads it.
        ("torch.distributed.elastic.rendezvous.dynamic_rendezvous", "sync"),
    }
)
ALLOWED_MARSHAL = frozenset(
    {
        # The import system reading a module's cached bytecode (__pycache__/*.pyc), under both names it runs as.
        ("importlib._bootstrap_external", "_compile_bytecode"),
        ("_frozen_importlib_external", "_compile_bytecode"),
    }
)
# Who may widen torch's weights-only allowlist: torch itself, in the top-level code of its own modules as they are
# imported (torch.distributed adds the builtin exception classes and traceback's StackSummary and FrameSummary for
# its object collectives; torch.distributed.device_mesh, torch.distributed.tensor, torch.nested, torch._dynamo
# their own data classes). What torch allows in every process that imports it, whatever our code does.
ALLOWED_SAFE_GLOBALS_PACKAGE = "torch"
# Frames between the audit event and the code that asked to unpickle: the pure-Python unpickler's own and
# find_class methods (torch.load(weights_only=False) overrides find_class and calls the base class's).
_MACHINERY_MODULES = frozenset({"pickle", "_pickle", __name__})


class UnpicklingRefused(RuntimeError):
    """Raised (from the audit hook, so from inside the unpickler) for an unpickling the guard does not allow."""


_log_path: str | None = None
_installed = False
_safe_globals_at_import = None
allowed_additions: set = set()  # what torch's own modules added to the allowlist (ALLOWED_SAFE_GLOBALS_PACKAGE)


def _where(frame) -> tuple[str, str]:
    return frame.f_globals.get("__name__", "?"), frame.f_code.co_name


def _genuine(frame) -> bool:
    """Whether ``frame`` runs the code of the module its globals name (the file that module was loaded from)."""
    module = sys.modules.get(frame.f_globals.get("__name__", ""))
    if getattr(getattr(module, "__spec__", None), "origin", None) == "frozen":  # the import system's own modules
        return frame.f_code.co_filename.startswith("<frozen ")
    return getattr(module, "__file__", None) == frame.f_code.co_filename


def _allowed(frame, allowed: frozenset) -> bool:
    return frame is not None and _where(frame) in allowed and _genuine(frame)


def _stack(frame, limit: int = 10) -> list[str]:
    out = []
    while frame is not None and len(out) < limit:
        module, function = _where(frame)
        out.append(f"{module}:{function}:{frame.f_lineno}")
        frame = frame.f_back
    return out


def record(event: str, what: str, frame=None, refuse: bool = True) -> None:
    """Write one violation to the log (and stderr when there is no log); raise UnpicklingRefused if ``refuse``."""
    caller = "?"
    if frame is not None:
        caller = ":".join(_where(frame))
    entry = {
        "pid": os.getpid(),
        "argv": sys.argv[:4],
        "event": event,
        "what": what,
        "caller": caller,
        "stack": _stack(frame),
    }
    line = json.dumps(entry) + "\n"
    if _log_path:
        fd = os.open(_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    else:
        sys.stderr.write(f"pickle guard: {line}")
    if refuse:
        raise UnpicklingRefused(
            f"pickle guard: {event} {what} called from {caller}: nothing but "
            "torch.load(weights_only=True) may unpickle in the tests"
        )


def _hook(event: str, args) -> None:
    if event not in WATCHED:
        return
    frame = sys._getframe(1)
    if event == "pickle.find_class":
        while frame is not None and (
            frame.f_globals.get("__name__") in _MACHINERY_MODULES or frame.f_code.co_name == "find_class"
        ):
            frame = frame.f_back
        if _allowed(frame, ALLOWED_PICKLE):
            return
        record(event, f"{args[0]}.{args[1]}", frame)
    else:
        while frame is not None and frame.f_globals.get("__name__") == __name__:
            frame = frame.f_back
        if _allowed(frame, ALLOWED_MARSHAL) and frame.f_back is not None and frame.f_back.f_code.co_name == "get_code":
            return
        record(event, f"{len(args[0])} bytes" if args and isinstance(args[0], (bytes, bytearray)) else "", frame)


def global_name(g) -> str:
    if isinstance(g, tuple) and len(g) == 2 and isinstance(g[1], str):
        return g[1]
    return f"{getattr(g, '__module__', '?')}.{getattr(g, '__qualname__', repr(g))}"


def watch_safe_globals(module) -> None:
    """Refuse and record every widening of torch's weights-only allowlist (``module`` is
    torch._weights_only_unpickler: add_safe_globals and the safe_globals context both call its _add_safe_globals)."""
    global _safe_globals_at_import
    original = module._add_safe_globals
    if getattr(original, "_myrtle_pickle_guard", False):
        return
    _safe_globals_at_import = set(module._marked_safe_globals_set)

    def _add_safe_globals(safe_globals):
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__") in ("torch.serialization", WEIGHTS_ONLY_MODULE):
            frame = frame.f_back
        if (
            frame is not None
            and frame.f_code.co_name == "<module>"
            and _genuine(frame)
            and frame.f_globals.get("__name__", "").partition(".")[0] == ALLOWED_SAFE_GLOBALS_PACKAGE
        ):
            allowed_additions.update(safe_globals)
            return original(safe_globals)
        record("torch.serialization.add_safe_globals", ", ".join(map(global_name, safe_globals)), frame)

    _add_safe_globals._myrtle_pickle_guard = True
    module._add_safe_globals = _add_safe_globals


class _WatchWhenImported:
    """A meta path finder that lets torch._weights_only_unpickler be imported as usual, then watches it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != WEIGHTS_ONLY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_and_watch(module, exec_module=exec_module):
                    exec_module(module)
                    watch_safe_globals(module)
                    if self in sys.meta_path:
                        sys.meta_path.remove(self)  # done: no more looking at every import

                spec.loader.exec_module = exec_and_watch
                return spec
        return None


def _check_safe_globals_at_exit() -> None:
    module = sys.modules.get(WEIGHTS_ONLY_MODULE)
    if (
        module is not None
        and _safe_globals_at_import is not None
        and set(module._marked_safe_globals_set) != _safe_globals_at_import | allowed_additions
    ):
        added = set(module._marked_safe_globals_set) - _safe_globals_at_import - allowed_additions
        record("torch safe globals changed", ", ".join(map(global_name, added)) or "some removed", refuse=False)


def install(log_path: str | None) -> None:
    """Start guarding this process (once), recording to ``log_path``; a later call only changes where it records
    (a pytest-xdist worker, guarded from its start with its parent's log, then names its own)."""
    global _log_path, _installed
    _log_path = log_path
    if _installed:
        return
    _installed = True
    sys.addaudithook(_hook)
    if WEIGHTS_ONLY_MODULE in sys.modules:
        watch_safe_globals(sys.modules[WEIGHTS_ONLY_MODULE])
    else:
        sys.meta_path.insert(0, _WatchWhenImported())
    atexit.register(_check_safe_globals_at_exit)
