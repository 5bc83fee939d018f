"""What every report writes: its folder and ``--json`` file checked before the work, a picture, the JSON report."""

from __future__ import annotations

from pathlib import Path

from ..distributed import Processes
from ..files import check_folder, check_output, json_with, write_atomic, write_json


def write_report(result: dict, json_path: str | None) -> None:
    """The ``--json`` report, when asked for."""
    if json_path:
        write_json(json_path, result, "JSON report")


def save_png(image, path: Path) -> None:
    write_atomic(path, lambda f: image.save(f, format="PNG"), "picture")


def check_outputs(procs: Processes, out_dir: Path, json_path: str | None, force: bool = False) -> None:
    """Before the evaluation: the report folder and the ``--json`` file can be written (an existing JSON file is
    replaced only when it is an earlier report, or with ``force``)."""

    def check():
        check_folder(out_dir, "--output-dir")
        if json_path:
            check_output(json_path, "--json", ours=json_with("num_images"), force=force, what="JSON report")

    procs.on_main(check)
