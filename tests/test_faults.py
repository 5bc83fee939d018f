"""Faults that happen in practice: a run killed at any moment, Ctrl-C pressed twice, a disk that refuses
a checkpoint, a loss that becomes NaN. Nothing is lost beyond one checkpoint interval, nothing on disk is corrupt,
and the user gets one line that says what happened."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, REPO, data_config, make_dataset, run_dir_of, run_script, script_env, train_config

from myrtle_vision import checkpoint as ckpt_io
from myrtle_vision.config import load_config
from myrtle_vision.training import MAX_SKIPPED_IN_A_ROW, NonFiniteLoss, Trainer

INTERVAL = 3
# 24 training images in updates of 8 (2 micro-batches of 4): 3 updates per epoch, 45 in all (the 12 kills below
# advance the run by at most 37 updates: see test_sigkill_at_any_moment_loses_at_most_one_checkpoint_interval). A
# validation after every update prints the iteration reached; a model big enough that writing a
# checkpoint (about 5 MB with the optimizer state) takes a few milliseconds, so that kills land in it.
RUN = {
    "epochs": 15,
    "local_batch_size": 4,
    "global_batch_size": 8,
    "iters_per_checkpoint": INTERVAL,
    "iters_per_val": 1,
    "keep_checkpoints": 3,
    "num_workers": 1,
}
VIT = {"embed_dim": 96, "depth": 4, "heads": 2, "mlp_dim": 384}
REACHED = re.compile(r"^iteration (\d+) \(epoch")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return data_config(tmp / "data.json", make_dataset(tmp / "ds", CLASSES, counts=(8, 2, 2)), len(CLASSES))


class _Run:
    """train.py in the background, its output lines collected as they come."""

    def __init__(self, cfg: Path):
        env = script_env()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "-c", str(cfg)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        # Daemon readers: a killed run's data-loader worker keeps the pipes open for a few seconds more.
        self.readers = [
            threading.Thread(target=lambda f=f, out=out: out.extend(iter(f.readline, "")), daemon=True)
            for f, out in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))
        ]
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


@pytest.mark.slow
def test_sigkill_at_any_moment_loses_at_most_one_checkpoint_interval(data, tmp_path):
    reference = run_script(
        "train.py", "-c", train_config(tmp_path / "ref.json", data, tmp_path / "ref", train=RUN, vit=VIT), check=True
    )
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills, kills_in_writes, kills_at_start, at_iterations = 0, 0, 0, []
    last = None
    while True:
        train = dict(RUN, checkpoint_path=str(last) if last and last.exists() else "")
        run = _Run(train_config(tmp_path / f"run{kills}.json", data, out, train=train, vit=VIT))
        # Where to kill: while starting up, after a random number of updates (and a random moment
        # within the next one), or as soon as a checkpoint write is under way; the last run finishes.
        mode = "finish" if kills >= 12 else "write" if kills % 4 == 3 else "start" if kills in (1, 5) else "update"
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
        run_dirs = list(out.glob("*"))
        # inside a write: its temporary file is still there (the kill came before the rename, which removes it)
        kills_in_writes += mode == "write" and any(out.glob(f"*/.*.tmp{run.proc.pid}"))
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
    assert kills >= 12 and kills_in_writes >= 2 and kills_at_start >= 2  # (a write may just finish first)
    assert len(set(at_iterations)) >= 5, at_iterations  # the kills landed at many different points of training
    assert f"resuming from {last}" in "".join(run.lines)
    # ... and the run that survived them all ends exactly where the uninterrupted one did
    a = ckpt_io.load(run_dir_of(reference) / "last.pt")
    b = ckpt_io.load(last)
    assert a["iteration"] == b["iteration"] == 45
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert not list(last.parent.glob(".*.tmp*"))  # a killed write's temporary file is cleaned up on resume


@pytest.mark.slow
def test_a_run_killed_outright_leaves_no_process_behind(data, tmp_path):
    """SIGKILL gives train.py no chance to stop its loader workers (nor the fork server that started them):
    they must notice and go by themselves, and not linger holding memory and the dataset."""
    cfg = train_config(tmp_path / "t.json", data, tmp_path / "out", vit=VIT, train=dict(RUN, num_workers=2))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "-c", str(cfg)],
        cwd=REPO,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:
        if REACHED.match(line):  # a validation done: the training and validation workers are running
            break
    group = os.getpgid(proc.pid)
    helpers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == group and int(p.name) != proc.pid]
    assert len(helpers) >= 3, helpers  # the fork server and its workers, at least
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return  # every process of the run is gone
        time.sleep(0.2)
    left = [
        (p.name, (p / "cmdline").read_bytes()[:80])
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _pgid(p) == group
    ]
    os.killpg(group, signal.SIGKILL)
    raise AssertionError(f"still running 30 s after the kill: {left}")


def _pgid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


# --- disk trouble: torch.save fails as a full disk or a refused permission would ------------------

INJECT = """
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
"""


LIMIT_AFTER = """
import os, resource, signal
import torch
_save, _calls = torch.save, [0]
def _save_then_limit(obj, f, *args, **kwargs):
    _save(obj, f, *args, **kwargs)
    _calls[0] += 1
    if _calls[0] == int(os.environ["LIMIT_AFTER_SAVES"]):  # from now on the kernel refuses larger files (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(os.environ["FILE_SIZE_LIMIT"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
torch.save = _save_then_limit
"""


@pytest.mark.slow
def test_a_real_write_failure_stops_the_run_and_keeps_the_previous_checkpoint(data, tmp_path):
    """Not simulated: after two checkpoints, a file-size limit makes the kernel refuse the third write (EFBIG)
    inside torch's own writer. The two before it stay as they were written."""
    cfg = train_config(
        tmp_path / "t.json",
        data,
        tmp_path / "out",
        vit=VIT,
        train=dict(RUN, epochs=2, iters_per_val=1000, iters_per_checkpoint=1, keep_checkpoints=None),
    )
    reference = run_dir_of(run_script("train.py", "-c", cfg, check=True))  # the same run, not stopped
    size = (reference / "last.pt").stat().st_size
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(LIMIT_AFTER)
    proc = run_script(
        "train.py",
        "-c",
        cfg,
        env={"PYTHONPATH": f"{inject}{os.pathsep}{REPO}", "LIMIT_AFTER_SAVES": "2", "FILE_SIZE_LIMIT": str(size // 2)},
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "checkpoint_0000003.pt: cannot write the checkpoint (" in lines[0], lines[0]  # (torch's words for EFBIG)
    assert "the previous checkpoints are intact" in lines[0]
    stopped = run_dir_of(proc)
    assert sorted(p.name for p in stopped.glob("checkpoint_*.pt")) == ["checkpoint_0000001.pt", "checkpoint_0000002.pt"]
    assert _iteration(stopped / "last.pt") == 2 and not list(stopped.glob(".*.tmp*"))
    for name in ("checkpoint_0000001.pt", "checkpoint_0000002.pt"):  # intact: what the unstopped run wrote
        a, b = ckpt_io.load(stopped / name), ckpt_io.load(reference / name)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


@pytest.mark.slow
@pytest.mark.parametrize("kind,reason", [("full", "No space left on device"), ("denied", "Permission denied")])
def test_a_failing_checkpoint_write_stops_the_run_and_keeps_the_previous_checkpoint(data, tmp_path, kind, reason):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    # saves: checkpoint at 3, best.pt at most once per validation... so fail from the 4th save on, whatever it is
    cfg = train_config(
        tmp_path / "t.json", data, tmp_path / "out", vit=VIT, train=dict(RUN, epochs=4, iters_per_val=1000)
    )
    proc = run_script(
        "train.py",
        "-c",
        cfg,
        env={"PYTHONPATH": f"{inject}{os.pathsep}{REPO}", "FAIL_SAVE_FROM": "3", "FAIL_KIND": kind},
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    run_dir = run_dir_of(proc)
    assert re.fullmatch(
        rf"error: {re.escape(str(run_dir))}/\S+\.pt: cannot write the checkpoint \({reason}\); "
        "the previous checkpoints are intact",
        lines[0],
    ), lines[0]
    assert _check_run_dir(run_dir) > 0  # the earlier checkpoints load, last.pt points at the newest
    assert not list(run_dir.glob(".*.tmp*"))


# --- numerical trouble ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_iteration_and_saves_nothing(data, tmp_path):
    # an absurd learning rate: the first update sends the weights to 1e30, the second loss overflows
    cfg = train_config(
        tmp_path / "t.json",
        data,
        tmp_path / "out",
        vit=VIT,
        train=dict(RUN, lr=1e30, warmup_epochs=0, iters_per_checkpoint=1, iters_per_val=1000),
    )
    proc = run_script("train.py", "-c", cfg)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    m = re.fullmatch(
        r"error: iteration (\d+) \(epoch 1\): the training loss is (nan|inf); stopped without saving: "
        r"the last checkpoint, (\S+), is untouched\. .*nonfinite_loss to skip",
        lines[0],
    )
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


def test_skip_gives_up_after_ten_nonfinite_updates_in_a_row(data, tmp_path, capsys):
    """A learning rate of 1e30: the first update is finite and ruins the weights; every later one is not.
    Ten are skipped (updates 2 to 11), the eleventh in a row (update 12) stops the run."""
    assert MAX_SKIPPED_IN_A_ROW == 10  # the number docs/training.md gives
    trainer = _trainer(data, tmp_path, nonfinite_loss="skip", lr=1e30, warmup_epochs=0)
    with pytest.raises(NonFiniteLoss, match=r"^iteration 12 \(epoch 4\): .* after 10 skipped updates in a row"):
        trainer.fit()
    skipped = [line for line in capsys.readouterr().out.splitlines() if "update skipped" in line]
    assert [int(line.split()[1]) for line in skipped] == list(range(2, 12))
    assert trainer.progress.iteration == 11  # the skipped updates count; the stopped one does not


def _poison_gradients(trainer: Trainer, updates: set[int]) -> None:
    """Make the class head's gradient infinite in the given updates (counted from 0 over the whole run); the
    loss stays finite."""
    state = {"update": None}
    trainer.model.head.weight.register_hook(lambda g: g * float("inf") if state["update"] in updates else g)
    update = trainer.train_update

    def poisoned(batches, u, *rest):
        state["update"] = trainer.progress.iteration
        return update(batches, u, *rest)

    trainer.train_update = poisoned


def test_skip_with_nonfinite_gradients_keeps_the_weights_and_uses_up_the_learning_rate_step(data, tmp_path):
    trainer = _trainer(data, tmp_path, nonfinite_loss="skip", epochs=1, clip_grad=None)
    _poison_gradients(trainer, {1})
    lrs, weights = [], []
    update = trainer.train_update

    def recorded(batches, u, *rest):
        lrs.append(trainer.optimizer.param_groups[-1]["lr"])
        result = update(batches, u, *rest)
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return result

    trainer.train_update = recorded
    trainer.fit()
    assert trainer.progress.iteration == 3
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # update 2 skipped: nothing changed
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # update 3 trained
    # update 3 ran at the schedule's third rate: the skipped update used up its step
    assert lrs == pytest.approx([trainer.schedule(0), trainer.schedule(1), trainer.schedule(2)])
    assert len(set(lrs)) == 3


def test_the_count_of_skipped_updates_starts_again_on_resume(data, tmp_path):
    """Nine non-finite updates in a row end a run (its last nine), and nine more start the resumed one: had the
    count been carried over, the resumed run would stop at its second."""
    first = _trainer(data, tmp_path, nonfinite_loss="skip", epochs=4, iters_per_val=1000, iters_per_checkpoint=12)
    _poison_gradients(first, set(range(3, 12)))
    last = first.fit()
    assert first.skipped_in_a_row == 9 and ckpt_io.load(last)["iteration"] == 12
    cfg = train_config(
        tmp_path / "r.json",
        data,
        tmp_path / "out",
        train=dict(
            RUN,
            num_workers=0,
            nonfinite_loss="skip",
            epochs=8,
            iters_per_val=1000,
            iters_per_checkpoint=12,
            checkpoint_path=str(last),
        ),
    )
    resumed = Trainer(load_config(cfg))
    assert resumed.progress.iteration == 12 and resumed.skipped_in_a_row == 0
    _poison_gradients(resumed, set(range(12, 21)))
    resumed.fit()
    assert resumed.progress.iteration == 24


GRADIENTS_POISONED = """
import os
import torch
_backward, _calls = torch.Tensor.backward, [0]
def _poisoned(self, *args, **kwargs):  # the loss stays finite; its gradients become infinite
    _calls[0] += 1
    return _backward(self * float("inf") if _calls[0] == int(os.environ["POISON_BACKWARD"]) else self, *args, **kwargs)
torch.Tensor.backward = _poisoned
"""


@pytest.mark.slow
def test_train_py_with_nonfinite_gradients_stops_with_one_line_and_keeps_the_last_checkpoint(data, tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(GRADIENTS_POISONED)
    cfg = train_config(
        tmp_path / "t.json",
        data,
        tmp_path / "out",
        vit=VIT,
        train=dict(RUN, epochs=2, iters_per_checkpoint=1, iters_per_val=1000),
    )
    # two micro-batches per update: the third backward pass is the second update's first
    proc = run_script("train.py", "-c", cfg, env={"PYTHONPATH": f"{inject}{os.pathsep}{REPO}", "POISON_BACKWARD": "3"})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    run_dir = run_dir_of(proc)
    assert lines[0] == (
        f"error: iteration 2 (epoch 1): the gradients are not finite; stopped without saving: the last "
        f"checkpoint, {run_dir / 'checkpoint_0000001.pt'}, is untouched. Lower the learning rate, set "
        "clip_grad, or set train_config.nonfinite_loss to skip"
    )
    assert [p.name for p in run_dir.glob("checkpoint_*.pt")] == ["checkpoint_0000001.pt"]
    assert _iteration(run_dir / "checkpoint_0000001.pt") == _iteration(run_dir / "last.pt") == 1


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


# --- a second Ctrl-C ------------------------------------------------------------------------------

SECOND_CTRL_C = """
import io, os, signal, time
import torch

def _say(line):  # straight to the file descriptor: safe inside a signal handler
    os.write(1, (line + "\\n").encode())

_handled = [0]
_signal = signal.signal
def _announcing(signum, handler):  # says when the trainer's SIGINT handler has run
    if signum == signal.SIGINT and callable(handler):
        inner = handler
        def handler(s, frame):
            _handled[0] += 1
            _say(f"hook: SIGINT {_handled[0]} handled")
            return inner(s, frame)
    return _signal(signum, handler)
signal.signal = _announcing

_backward, _calls = torch.Tensor.backward, [0]
def _slow_backward(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == 3:  # in update 3 (one micro-batch per update)
        _say("hook: in update 3")
        if os.environ["SLOW"] == "update":
            time.sleep(600)  # a slow update: both signals reach the handler in here
        else:
            while not _handled[0]:
                time.sleep(0.01)
    return _backward(self, *args, **kwargs)
torch.Tensor.backward = _slow_backward

_save = torch.save
def _slow_save(obj, f, *args, **kwargs):
    if not (os.environ["SLOW"] == "write" and _handled[0] and hasattr(f, "write")):
        return _save(obj, f, *args, **kwargs)
    data = io.BytesIO()
    _save(obj, data, *args, **kwargs)
    data = data.getvalue()
    f.write(data[:len(data) // 2])
    _say("hook: in a checkpoint write")
    time.sleep(3)  # a slow disk: the second signal reaches the handler in here
    f.write(data[len(data) // 2:])
torch.save = _slow_save
"""


@pytest.mark.slow
@pytest.mark.parametrize("slow", ["update", "write"])
def test_a_second_ctrl_c_stops_at_once_and_leaves_every_checkpoint_whole(data, tmp_path, slow):
    """Ctrl-C twice, as a terminal sends it (to the whole process group). "update": both land inside one
    (slow) update, the second before the first has been acted on; the run stops there, saving nothing more.
    "write": the first asks for the checkpoint at the end of the update, and the second lands inside that
    (slow) checkpoint write, which finishes first. Either way: exit 130, "interrupted", no traceback, well
    before the update or write would have ended by itself, every .pt file loads, and nothing else is left."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SECOND_CTRL_C)
    cfg = train_config(
        tmp_path / "t.json",
        data,
        tmp_path / "out",
        train=dict(RUN, local_batch_size=8, iters_per_checkpoint=1, iters_per_val=1000, keep_checkpoints=None),
    )
    env = script_env(PYTHONPATH=f"{inject}{os.pathsep}{REPO}", SLOW=slow)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "-c", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    errors: list[str] = []
    readers = [
        threading.Thread(target=lambda f=f, out=out: out.extend(iter(f.readline, "")), daemon=True)
        for f, out in ((proc.stdout, lines), (proc.stderr, errors))
    ]
    for r in readers:
        r.start()

    def wait_for(line: str) -> None:
        deadline = time.monotonic() + 300
        while line + "\n" not in lines:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines + errors)
            time.sleep(0.01)

    try:
        wait_for("hook: in update 3")
        os.killpg(proc.pid, signal.SIGINT)
        wait_for("hook: SIGINT 1 handled")
        if slow == "write":
            wait_for("hook: in a checkpoint write")
        os.killpg(proc.pid, signal.SIGINT)
        second = time.monotonic()
        proc.wait(timeout=120)
        stopped_after = time.monotonic() - second
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for r in readers:
        r.join(timeout=5)
    stdout, stderr = "".join(lines), "".join(errors)
    assert proc.returncode == 130, stdout + stderr
    assert "hook: SIGINT 2 handled" in stdout
    assert [line for line in stderr.splitlines() if line.strip()] == ["interrupted"], stderr
    assert stopped_after < 60, stopped_after  # the update would have slept 600 s; the write takes 3 s
    assert "checkpoint saved to" not in stdout  # the first signal's save-and-stop did not happen
    run_dir = run_dir_of(subprocess.CompletedProcess([], 0, stdout, stderr))
    # update: the two checkpoints before the interrupted update; write: the one being written, whole
    expected = ["checkpoint_0000001.pt", "checkpoint_0000002.pt"] + (
        ["checkpoint_0000003.pt"] if slow == "write" else []
    )
    assert sorted(p.name for p in run_dir.glob("*.pt")) == sorted(expected + ["last.pt"])
    for path in run_dir.glob("*.pt"):
        torch.load(path, map_location="cpu", weights_only=True)  # whole: a partial file does not load
    assert torch.load(run_dir / "last.pt", weights_only=True)["iteration"] == len(expected)
    left = sorted(
        p.name
        for p in run_dir.iterdir()
        if p.name not in expected + ["last.pt", "config.json"] and not p.name.startswith("events.out.tfevents.")
    )
    assert left == []  # no temporary file, nothing half-written
