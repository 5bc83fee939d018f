"""Faults that happen in practice: a run killed at any moment, a disk that refuses a checkpoint, a
loss that becomes NaN. Nothing is lost beyond one checkpoint interval, nothing on disk is corrupt,
and the user gets one line that says what happened."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, REPO, data_config, make_dataset, run_dir_of, run_script, train_config

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision.config import load_config
from myrtle_vision.training import MAX_SKIPPED_IN_A_ROW, NonFiniteLoss, Trainer

INTERVAL = 3
# 24 training images in updates of 8 (2 micro-batches of 4): 3 updates per epoch, 90 in all. A
# validation after every update prints the iteration reached; a model big enough that writing a
# checkpoint (about 5 MB with the optimizer state) takes a few milliseconds, so that kills land in it.
RUN = {"epochs": 30, "local_batch_size": 4, "global_batch_size": 8, "iters_per_checkpoint": INTERVAL,
       "iters_per_val": 1, "keep_checkpoints": 3, "num_workers": 1}
VIT = {"embed_dim": 96, "depth": 4, "heads": 2, "mlp_dim": 384}
REACHED = re.compile(r"^iteration (\d+) \(epoch")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return data_config(tmp / "data.json", make_dataset(tmp / "ds", CLASSES, counts=(8, 2, 2)), len(CLASSES))


class _Run:
    """train.py in the background, its output lines collected as they come."""

    def __init__(self, cfg: Path):
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "-c", str(cfg)], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.errors: list[str] = []
        # Daemon readers: a killed run's data-loader worker keeps the pipes open for a few seconds more.
        self.readers = [threading.Thread(target=lambda f=f, out=out: out.extend(iter(f.readline, "")), daemon=True)
                        for f, out in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))]
        for r in self.readers:
            r.start()

    def iterations(self) -> list[int]:
        return [int(m.group(1)) for m in map(REACHED.match, list(self.lines)) if m]

    def finish(self, killed: bool) -> str:
        self.proc.wait()
        for r in self.readers:
            r.join(timeout=0.5 if killed else None)  # what the dead process wrote is in the pipe already
        return "".join(self.errors)


def _iteration(path: Path) -> int:
    return ckpt_io.load(path)["iteration"]


def _check_run_dir(run_dir: Path) -> int:
    """Every checkpoint on disk loads, and last.pt is the newest periodic one (or the one before, when the
    kill fell between writing a checkpoint and pointing last.pt at it). Returns last.pt's iteration (0: none)."""
    periodic = sorted(run_dir.glob("checkpoint_*.pt"))
    for path in [*periodic, *run_dir.glob("best.pt"), *run_dir.glob("last.pt")]:
        ckpt_io.load(path)  # raises on a partial or corrupt file
    if not (run_dir / "last.pt").exists():
        assert [_iteration(p) for p in periodic] in ([], [INTERVAL])
        return 0
    newest, last = max(_iteration(p) for p in periodic), _iteration(run_dir / "last.pt")
    assert newest - INTERVAL <= last <= newest, (last, newest)
    return last


def test_sigkill_at_any_moment_loses_at_most_one_checkpoint_interval(data, tmp_path):
    reference = run_script("train.py", "-c", train_config(tmp_path / "ref.json", data, tmp_path / "ref", train=RUN,
                                                         vit=VIT), check=True)
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills, kills_in_writes, kills_at_start, at_iterations = 0, 0, 0, []
    last = None
    while True:
        train = dict(RUN, checkpoint_path=str(last) if last and last.exists() else "")
        run = _Run(train_config(tmp_path / f"run{kills}.json", data, out, train=train, vit=VIT))
        # Where to kill: while starting up, after a random number of updates (and a random moment
        # within the next one), or as soon as a checkpoint write is under way; the last run finishes.
        mode = ("finish" if kills >= 12 else "write" if kills % 4 == 3 else "start" if kills in (1, 5)
                else "update")
        updates, delay = rng.randint(0, 5), rng.uniform(0.0, 0.06)
        started, seen_at = time.monotonic(), None
        killed = False
        while run.proc.poll() is None and not killed:
            if mode == "write":  # this process's temporary file: a checkpoint write under way
                killed = any(out.glob(f"*/.*.tmp{run.proc.pid}"))
            elif mode == "start":
                killed = time.monotonic() - started > delay * 30  # up to 1.8 s: imports, data, model
            elif mode == "update":
                done = run.iterations()
                if seen_at is None and len(done) > updates:
                    seen_at = time.monotonic()
                killed = seen_at is not None and time.monotonic() - seen_at > delay
            if killed:
                run.proc.send_signal(signal.SIGKILL)
            time.sleep(0.0005 if mode == "write" else 0.002)
        stderr = run.finish(killed)
        if not killed:
            assert mode == "finish" and run.proc.returncode == 0, "".join(run.lines) + stderr
            break
        kills += 1
        kills_in_writes += mode == "write"
        run_dirs = list(out.glob("*"))
        if not run_dirs:  # killed before the run directory was made
            kills_at_start += 1
            continue
        assert len(run_dirs) == 1  # resumed runs continue in their own folder
        saved = _check_run_dir(run_dirs[0])
        reached = run.iterations()
        if reached:
            assert reached[-1] - saved <= INTERVAL, (reached[-1], saved)
            at_iterations.append(reached[-1])
        else:
            kills_at_start += 1
        last = run_dirs[0] / "last.pt"
    assert kills >= 12 and kills_in_writes == 3 and kills_at_start >= 2
    assert len(set(at_iterations)) >= 5, at_iterations  # the kills landed at many different points of training
    assert f"resuming from {last}" in "".join(run.lines)
    # ... and the run that survived them all ends exactly where the uninterrupted one did
    a = ckpt_io.load(run_dir_of(reference) / "last.pt")
    b = ckpt_io.load(last)
    assert a["iteration"] == b["iteration"] == 90
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert not list(last.parent.glob(".*.tmp*"))  # a killed write's temporary file is cleaned up on resume


# --- disk trouble: torch.save fails as a full disk or a refused permission would ------------------

INJECT = '''
import errno, os
import torch
_save, _calls = torch.save, [0]
def _failing_save(obj, f, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] >= int(os.environ["FAIL_SAVE_FROM"]):
        f.write(b"half a checkpoint")
        code = errno.ENOSPC if os.environ["FAIL_KIND"] == "full" else errno.EACCES
        raise OSError(code, os.strerror(code))
    return _save(obj, f, *args, **kwargs)
torch.save = _failing_save
'''


def test_a_real_write_failure_stops_the_run_and_keeps_the_previous_checkpoint(data, tmp_path):
    """Not simulated: a file-size limit makes the kernel refuse the write (EFBIG) inside torch's own writer."""
    import resource

    cfg = train_config(tmp_path / "t.json", data, tmp_path / "out", vit=VIT,
                       train=dict(RUN, epochs=2, iters_per_val=1000, iters_per_checkpoint=1))
    run_dir = tmp_path / "out"
    reference = run_script("train.py", "-c", cfg, check=True)  # how large the checkpoints are
    size = (run_dir_of(reference) / "last.pt").stat().st_size
    shutil.rmtree(run_dir)

    def limit_file_size():  # in the child: writes beyond the limit fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "-c", str(cfg)], cwd=REPO, env=env, text=True,
                          capture_output=True, preexec_fn=limit_file_size, timeout=600)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "checkpoint_0000001.pt: cannot write the checkpoint (" in lines[0]
    assert "the previous checkpoints are intact" in lines[0]
    killed_dir = run_dir_of(proc)
    assert not list(killed_dir.glob("checkpoint_*.pt")) and not list(killed_dir.glob(".*.tmp*"))


@pytest.mark.parametrize("kind,reason", [("full", "No space left on device"), ("denied", "Permission denied")])
def test_a_failing_checkpoint_write_stops_the_run_and_keeps_the_previous_checkpoint(data, tmp_path, kind, reason):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    # saves: checkpoint at 3, best.pt at most once per validation... so fail from the 4th save on, whatever it is
    cfg = train_config(tmp_path / "t.json", data, tmp_path / "out", vit=VIT,
                       train=dict(RUN, epochs=4, iters_per_val=1000))
    proc = run_script("train.py", "-c", cfg, env={"PYTHONPATH": f"{inject}{os.pathsep}{REPO}", "FAIL_SAVE_FROM": "3",
                                                   "FAIL_KIND": kind})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    run_dir = run_dir_of(proc)
    assert re.fullmatch(rf"error: {re.escape(str(run_dir))}/\S+\.pt: cannot write the checkpoint \({reason}\); "
                        "the previous checkpoints are intact", lines[0]), lines[0]
    assert _check_run_dir(run_dir) > 0  # the earlier checkpoints load, last.pt points at the newest
    assert not list(run_dir.glob(".*.tmp*"))


# --- numerical trouble ----------------------------------------------------------------------------

def test_a_nan_loss_stops_the_run_naming_the_iteration_and_saves_nothing(data, tmp_path):
    # an absurd learning rate: the first update sends the weights to 1e30, the second loss overflows
    cfg = train_config(tmp_path / "t.json", data, tmp_path / "out", vit=VIT,
                       train=dict(RUN, lr=1e30, warmup_epochs=0, iters_per_checkpoint=1, iters_per_val=1000))
    proc = run_script("train.py", "-c", cfg)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    m = re.fullmatch(r"error: iteration (\d+) \(epoch 1\): the training loss is (nan|inf); stopped without saving: "
                     r"the last checkpoint, (\S+), is untouched\. .*nonfinite_loss to skip", lines[0])
    assert m, lines[0]
    stopped_at, run_dir = int(m.group(1)), run_dir_of(proc)
    assert stopped_at >= 2 and Path(m.group(3)) == run_dir / f"checkpoint_{stopped_at - 1:07d}.pt"
    assert _check_run_dir(run_dir) == stopped_at - 1  # nothing written for the failed update or after it


def _trainer(data: Path, tmp_path: Path, **train) -> Trainer:
    cfg = train_config(tmp_path / "t.json", data, tmp_path / "out", train=dict(RUN, num_workers=0, **train))
    return Trainer(load_config(cfg))


def test_skip_drops_the_nonfinite_update_and_training_goes_on(data, tmp_path):
    trainer = _trainer(data, tmp_path, nonfinite_loss="skip", epochs=1)
    criterion, calls = trainer.criterion, [0]

    def poisoned(logits, targets):  # the second update's loss (micro-batches 3 and 4) is NaN
        calls[0] += 1
        loss = criterion(logits, targets)
        return loss * float("nan") if calls[0] in (3, 4) else loss

    trainer.criterion = poisoned
    weights = []
    trainer.train_update = _recording(trainer.train_update, trainer, weights)
    trainer.fit()
    losses = [loss for loss, _ in weights]
    assert [l != l for l in losses] == [False, True, False]  # noqa: E741 (NaN is not equal to itself)
    before, after = weights[0][1], weights[1][1]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped update changed nothing
    assert not all(torch.equal(after[k], weights[2][1][k]) for k in after)  # the next one trained
    assert trainer.progress.iteration == 3


def _recording(update, trainer, out):
    def wrapped(batches, u, *rest):
        result = update(batches, u, *rest)
        out.append((result.loss, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
        return result
    return wrapped


def test_skip_gives_up_after_too_many_nonfinite_updates_in_a_row(data, tmp_path):
    trainer = _trainer(data, tmp_path, nonfinite_loss="skip", lr=1e30, warmup_epochs=0)
    with pytest.raises(NonFiniteLoss, match=f"after {MAX_SKIPPED_IN_A_ROW} skipped updates in a row"):
        trainer.fit()


@pytest.mark.parametrize("clip_grad", [None, 1.0])
def test_nonfinite_gradients_with_a_finite_loss_stop_the_run_too(data, tmp_path, clip_grad):
    trainer = _trainer(data, tmp_path, epochs=1, clip_grad=clip_grad)
    poison = [False]
    trainer.model.head.weight.register_hook(lambda g: g * float("inf") if poison[0] else g)
    update = trainer.train_update

    def second_update_poisoned(batches, u, *rest):
        poison[0] = u == 1
        return update(batches, u, *rest)

    trainer.train_update = second_update_poisoned
    stopped_at = r"iteration 2 \(epoch 1\): the (gradients are not finite|gradient norm is (inf|nan)); stopped"
    with pytest.raises(NonFiniteLoss, match=stopped_at) as stopped:
        trainer.fit()
    assert trainer.progress.iteration == 1
    # with clip_grad the norm is computed anyway, and named; without, a cheaper check finds the inf
    assert ("gradient norm" in str(stopped.value)) == (clip_grad is not None)
