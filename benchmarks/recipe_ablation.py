"""DeiT's recipe on the demo data, measured: the demo ViT (and DeiT) trained with the recipe, without it, and
with each switch removed in turn, over several seeds, each tested on the 10,000 test images.

Needs the demo's data (and, for DeiT, its teacher): run ``bash scripts/demo.sh`` once first. Writes a
Markdown table of mean and spread of test top-1 per variant to RESULTS.md (section "DeiT's recipe on the
demo data"), naming the machine.

    python benchmarks/recipe_ablation.py --models vit --seeds 1 2 3 --variants without with

With ``--resume`` the runs already measured (same config) are reused, so a long ablation can be run in
pieces and its table written by a last call naming every variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import machine, write_section

from myrtle_vision.seeds import trains

REPO = Path(__file__).resolve().parent.parent

# The recipe, as the demo data can use it (Fashion-MNIST's clothes have an up: no quarter turns here). The
# average's decay suits the demo's ~1,100 updates (DeiT's 0.99996 is for 375,000).
RECIPE_TRAIN = {"mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25, "repeated_augmentation": 3, "ema_decay": 0.995}
RECIPE_VIT = {"drop_path": 0.1}
SWITCHES = {
    "mixup": ("train", {"mixup": 0.0}),
    "cutmix": ("train", {"cutmix": 0.0}),
    "random_erasing": ("train", {"random_erasing": 0.0}),
    "repeated_augmentation": ("train", {"repeated_augmentation": 1}),
    "ema": ("train", {"ema_decay": None}),
    "drop_path": ("vit", {"drop_path": 0.0}),
}


def variant_config(base: Path, model: str, variant: str, seed: int, out: Path) -> Path:
    """The config ``base`` (of ``model``) with the recipe (``with``), without it (``without``), or with one
    switch removed (``no_<switch>``), at ``seed``."""
    cfg = json.loads(base.read_text())
    tc, vc = cfg["train_config"], cfg["vit_config"]
    if variant == "without":  # every switch the base config sets is turned off
        for section, off in SWITCHES.values():
            values = tc if section == "train" else vc
            values.update({k: v for k, v in off.items() if k in values})
    else:
        tc.update(RECIPE_TRAIN)
        vc.update(RECIPE_VIT)
    if variant.startswith("no_"):
        section, off = SWITCHES[variant[3:]]
        (tc if section == "train" else vc).update(off)
    tc.update(seed=seed, output_directory=str(out / f"{model}_{variant}_{seed}"))
    path = out / f"{model}_{variant}_{seed}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def measured_before(cfg: Path) -> dict | None:
    """The figures of the run of config ``cfg`` measured before (on a config that means the same), else None."""
    measured = cfg.with_suffix(".measured.json")
    if measured.exists():
        before = json.loads(measured.read_text())
        if trains(before["config"], str(measured)) == trains(json.loads(cfg.read_text()), str(cfg)):
            return before
    return None


def measure(
    base: Path, model: str, variant: str, seed: int, out: Path, resume: bool, report: bool = False
) -> dict | None:
    """Train and test one run; its figures are kept in ``<run>.measured.json`` beside its config, and with
    ``resume`` a run measured before on the same config is not run again. With ``report`` nothing is run:
    the figures measured before, or None."""
    cfg = variant_config(base, model, variant, seed, out)
    measured = cfg.with_suffix(".measured.json")
    before = measured_before(cfg) if resume or report else None
    if before is not None or report:
        if before is not None:
            print(f"{cfg.stem}: measured before, top-1 {before['top1']:.2f}%", flush=True)
        return before
    start = time.perf_counter()
    log = run([sys.executable, "train.py", "-c", str(cfg)])
    seconds = time.perf_counter() - start
    run_dir = next(line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("run directory: "))
    result = out / f"{model}_{variant}_{seed}.result.json"
    run([sys.executable, "test.py", "-c", str(cfg), "--checkpoint", f"{run_dir}/last.pt", "--json", str(result)])
    figures = {
        "top1": json.loads(result.read_text())["top1"],
        "seconds": seconds,
        "machine": machine(torch.device("cpu")),
        "config": json.loads(cfg.read_text()),
    }
    measured.write_text(json.dumps(figures, indent=2))
    print(f"{cfg.stem}: top-1 {figures['top1']:.2f}% after {seconds:.0f} s", flush=True)
    return figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit", "deit"], choices=["vit", "deit"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=["without", "with", *(f"no_{s}" for s in SWITCHES)])
    parser.add_argument("--out", default="runs/recipe_ablation")
    for model in ("vit", "deit"):
        parser.add_argument(
            f"--{model}-config",
            type=Path,
            default=REPO / "train_configs" / f"{model}_demo.json",
            help=f"the {model.upper()} config to vary (default: the demo's)",
        )
    parser.add_argument("--no-write", action="store_true", help="print the table, do not write RESULTS.md")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs in --out measured before on the same config (an ablation in pieces)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: the table of the runs measured so far (a row lists the seeds it has)",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = ["| model | variant | test top-1 per seed | mean | train seconds (mean) |", "|---|---|---|---|---|"]
    for model in args.models:
        for variant in args.variants:
            base = getattr(args, f"{model}_config")
            results = {seed: measure(base, model, variant, seed, out, args.resume, args.report) for seed in args.seeds}
            results = {seed: r for seed, r in results.items() if r is not None}
            if not results:
                continue
            top1 = [r["top1"] for r in results.values()]
            per_seed = ", ".join(f"{t:.2f}" for t in top1)
            rows.append(
                f"| {model} | {variant} | {per_seed} (seed{'s' if len(results) > 1 else ''} "
                f"{', '.join(map(str, results))}) | {statistics.mean(top1):.2f}% | "
                f"{statistics.mean(r['seconds'] for r in results.values()):.0f} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    if args.no_write:
        print(table)
        return
    models = " and ".join({"vit": "ViT", "deit": "DeiT"}[m] for m in args.models)
    write_section(
        f"## DeiT's recipe on the demo data: {models} (recipe_ablation.py)",
        f"`python benchmarks/recipe_ablation.py --models {' '.join(args.models)}` on "
        f"{machine(torch.device('cpu'))}: the demo configs (same epochs), with the recipe "
        f"({json.dumps({**RECIPE_TRAIN, **RECIPE_VIT})}), without it, and with switches removed; test.py's "
        "top-1 of each run's last.pt on the 10,000 test images.",
        f"recipe-ablation-{'-'.join(args.models)}",
        table,
    )


if __name__ == "__main__":
    main()
