"""Every Python process the tests start imports this (tests/conftest.py puts this folder first on PYTHONPATH):
it installs the pickle guard (myrtle_pickle_guard) when MYRTLE_PICKLE_GUARD_LOG names its log, then runs the
sitecustomize that this one hides, if there is one further along sys.path (tests inject their own)."""

import os
import sys

if os.environ.get("MYRTLE_PICKLE_GUARD_LOG"):
    import myrtle_pickle_guard

    myrtle_pickle_guard.install(os.environ["MYRTLE_PICKLE_GUARD_LOG"])


def _run_the_next_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_run_the_next_sitecustomize()
