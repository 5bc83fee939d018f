"""One config over several seeds, as papers report a figure: each seed trained and tested as a user runs
``train.py`` and ``test.py`` (so ``"distributed": true`` still takes every GPU), then the mean and the standard
deviation of test top-1 and top-5 over the seeds.

Each seed's config is the given one with ``train_config.seed`` set and its own ``output_directory``
(``<out>/seed_<seed>``), written as ``<out>/seed_<seed>.json``; its logs and ``test.py``'s JSON report go beside
it. A seed whose report is there, made from a config that trains the same, is not run again (so a run that
stopped can be started again), and the summary goes to ``<out>/seeds.json``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .config import Config, build, load_config, read_json
from .errors import TrainingStopped, UserError
from .files import check_folder, check_output, json_with, sha256, write_atomic, write_json
from .reporting import say

# What can change between runs without changing the weights trained: where they go, and when validation runs
# (validation changes what is printed and which checkpoint is best.pt, never the weights)
NOT_TRAINED = {"train_config": ("output_directory", "iters_per_val", "epochs_per_val")}


def seed_config(base: Path, seed: int, out: Path) -> Path:
    """``base`` at ``seed``, training into ``out/seed_<seed>``, written as ``out/seed_<seed>.json``."""
    raw = read_json(base)
    raw["train_config"].update(seed=seed, output_directory=str(out / f"seed_{seed}"), checkpoint_path="")
    return write_atomic(out / f"seed_{seed}.json", json.dumps(raw, indent=2) + "\n", "seed config")


def trains(raw: dict, source: str) -> dict:
    """What a config trains: every default filled in, less what does not change the weights."""
    out = build(Config, raw, source).to_dict()
    for section, names in NOT_TRAINED.items():
        for name in names:
            out[section].pop(name, None)
    return out


def split_of(cfg: Path) -> dict:
    """Which split a config's data config names: the sha256 of its three split files (and the protocol
    ``split_protocol.json`` records, when the dataset folder has one)."""
    data = load_config(cfg).data_config
    root = Path(data.dataset_path)
    split = {name: sha256(root / getattr(data, name)) for name in ("train_files", "valid_files", "test_files")}
    protocol = root / "split_protocol.json"
    if protocol.is_file():
        split["protocol"] = {k: v for k, v in json.loads(protocol.read_text()).items() if k != "files"}
    return split


def measured_before(cfg: Path, report: Path, any_split: bool = False) -> dict | None:
    """``report``'s figures when it was made from a config that trains what ``cfg`` trains, on the split the
    data config names now (with ``any_split``, on whichever split it was), else None."""
    if not report.is_file():
        return None
    before = json.loads(report.read_text())
    same = trains(before.get("config", {}), str(report)) == trains(read_json(cfg), str(cfg))
    return before if same and (any_split or before.get("split") == split_of(cfg)) else None


def _run(command: list[str], log: Path, what: str, cwd: Path) -> str:
    """Run a script; its output goes to ``log``; a failure stops everything with one line naming the log."""
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    write_atomic(log, proc.stdout + proc.stderr, "log")
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise TrainingStopped(f"{what} failed (exit {proc.returncode}): {last} (the whole output: {log})")
    return proc.stdout


def train(cfg: Path, scripts: Path, train_args: list[str]) -> tuple[str, float]:
    """Train ``cfg`` with ``train.py`` (and ``train_args``): (its last checkpoint, the seconds it took)."""
    stem = cfg.with_suffix("")
    start = time.perf_counter()
    command = [sys.executable, str(scripts / "train.py"), "-c", str(cfg), *train_args]
    log = _run(command, Path(f"{stem}.train.log"), f"{cfg.stem}: train.py", scripts)
    run_dir = next((line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("run directory: ")), None)
    if run_dir is None:
        raise TrainingStopped(f"{cfg.stem}: train.py printed no run directory (its output: {stem}.train.log)")
    return f"{run_dir}/last.pt", time.perf_counter() - start


def test(cfg: Path, checkpoint: str, seconds: float, scripts: Path, test_args: list[str]) -> dict:
    """Test ``checkpoint`` with ``test.py`` (and ``test_args``); the figures, also kept in ``<cfg minus
    .json>.result.json``."""
    stem = cfg.with_suffix("")
    report = Path(f"{stem}.test.json")
    command = [sys.executable, str(scripts / "test.py"), "-c", str(cfg), "--checkpoint", checkpoint]
    _run(
        [*command, "--json", str(report), "--force", *test_args],
        Path(f"{stem}.test.log"),
        f"{cfg.stem}: test.py",
        scripts,
    )
    tested = json.loads(report.read_text())
    figures = {
        "split": split_of(cfg),
        "top1": tested["top1"],
        "top5": tested["top5"],
        "train_seconds": seconds,
        "checkpoint": checkpoint,
        "test_args": test_args,
        "config": read_json(cfg),
    }
    write_json(Path(f"{stem}.result.json"), figures, "seed result")
    return figures


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1, as papers report it; 0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_seeds(
    config: str,
    seeds: list[int],
    out: str,
    scripts: Path,
    train_args: list[str],
    test_args: list[str],
    force: bool = False,
    report: bool = False,
) -> dict:
    """Train and test ``config`` at each of ``seeds`` (those measured before on the same config and split are
    kept), and summarise; the summary is printed and written to ``out/seeds.json``. With ``report`` nothing is
    run: the seeds measured before, each on the split it was measured on (a protocol that redraws the split
    for each run), are summarised."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: give one or more different seeds")
    load_config(config)  # the config and its data config are checked before anything runs
    out_dir = check_folder(out, "--out")
    summary_path = check_output(
        out_dir / "seeds.json", "--out", ours=json_with("top1_mean"), force=force, what="summary"
    )
    results = {}
    for seed in seeds:
        cfg = seed_config(Path(config), seed, out_dir)
        before = measured_before(cfg, Path(f"{cfg.with_suffix('')}.result.json"), any_split=report)
        if report and (before is None or before.get("test_args") != test_args):
            raise UserError(
                f"--report: seed {seed} has not been measured in {out_dir} on this config and these test flags"
            )
        if before is not None and before.get("test_args") == test_args:
            say(f"seed {seed}: measured before, test top-1 {before['top1']:.2f}%")
            results[seed] = before
            continue
        if before is not None and Path(before["checkpoint"]).is_file():  # trained before: only the test differs
            say(f"seed {seed}: trained before ({before['checkpoint']}); testing it with {' '.join(test_args)}")
            results[seed] = test(cfg, before["checkpoint"], before["train_seconds"], scripts, test_args)
            say(f"seed {seed}: test top-1 {results[seed]['top1']:.2f}%")
            continue
        say(f"seed {seed}: training {cfg} (log: {cfg.with_suffix('')}.train.log)")
        results[seed] = test(cfg, *train(cfg, scripts, train_args), scripts, test_args)
        say(f"seed {seed}: test top-1 {results[seed]['top1']:.2f}%, trained in {results[seed]['train_seconds']:.0f} s")
    top1, top5 = mean_std([r["top1"] for r in results.values()]), mean_std([r["top5"] for r in results.values()])
    summary = {
        "config": str(config),
        "seeds": seeds,
        "test_args": test_args,
        "top1": {str(s): r["top1"] for s, r in results.items()},
        "top5": {str(s): r["top5"] for s, r in results.items()},
        "top1_mean": top1[0],
        "top1_std": top1[1],
        "top5_mean": top5[0],
        "top5_std": top5[1],
        "checkpoints": {str(s): r["checkpoint"] for s, r in results.items()},
        "splits": {str(s): r["split"] for s, r in results.items()},
    }
    write_json(summary_path, summary, "summary")
    say(
        f"{config}: test top-1 {top1[0]:.2f} ± {top1[1]:.2f}%, top-5 {top5[0]:.2f} ± {top5[1]:.2f}% over "
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}; mean ± sample standard "
        f"deviation): {summary_path}"
    )
    return summary
