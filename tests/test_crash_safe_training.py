"""Crash-safe training: atomic checkpoints, resuming from the newest complete one, a history and a
best epoch that survive resumes, SIGTERM / SIGKILL mid-run, and arguments checked before any work.

Runs that get killed are forked from the test process (no second import of torch and Lightning) and
stopped at a chosen moment by patching, in the child only, the function running at that moment.
"""

import contextlib
import io
import json
import multiprocessing
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from weakloc import cli
from weakloc.errors import CheckpointError, OptionError
from weakloc.train import fine_tune
from weakloc.train.fit import RESUME_KEYS, atomic_write, resume_checkpoint

TINY = {"backbone": "test_resnet", "pretrained": "none", "input_size": 32, "batch_size": 8, "progress": False, "workers": 0}
#: every source of randomness in training on: a loader worker (augmentation), hidden patches and dropout (the step's)
EXACT = TINY | {"workers": 1, "hide_prob": 0.3, "drop_rate": 0.2}
EPOCHS = 3
STEPS = 2  # per epoch: the data's 22 training images in batches of 8, the partial one dropped
FORK = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
needs_fork = pytest.mark.skipif(FORK is None, reason="needs fork()")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 synthetic 32-px single-label images: 22 to train on (2 steps of 8 per epoch), 10 to validate."""
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("crash_data"), SyntheticConfig(n_images=32, size=32, val_fraction=0.25, seed=3))


# --- helpers -------------------------------------------------------------------------------------

def _pause(marker: Path) -> None:
    """Tell the parent where the child is, then wait to be killed."""
    marker.write_text(str(os.getpid()))
    time.sleep(600)
    os._exit(3)  # never reached when the test works


def _child(kind: str, data: Path, out: Path, marker: Path, log: Path, epochs: int) -> None:
    """A training run (forked) that stops at ``kind``'s moment:

    - ``mid-write``: inside the second write of ``last.ckpt`` (epoch 1's), half of it on disk;
    - ``epoch-2``: in epoch 2's first training step (epoch 1's checkpoints complete);
    - ``epoch-0``: in the very first training step (no checkpoint yet);
    - ``cli``: the ``weakloc train`` command, slowed so that the parent's SIGTERM lands in epoch 1;
    - ``swa-epoch-2``: as ``epoch-2``, with weight averaging over the second half of the steps;
    - ``exact-epoch-2``: as ``epoch-2``, with the settings of ``EXACT``;
    - ``exact-sigterm``: the settings of ``EXACT``, slowed so that the parent's SIGTERM lands in
      epoch 1's first step.
    """
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = os.fdopen(fd, "w", buffering=1)  # not pytest's capture
    torch.set_num_threads(1)
    from weakloc.train.module import ClassifierModule

    real_save, real_step = torch.save, ClassifierModule.training_step
    last_writes = []

    def save(obj, f, *args, **kwargs):
        name = getattr(f, "name", "")
        if kind == "mid-write" and ".last.ckpt." in str(name):
            last_writes.append(name)
            if len(last_writes) == 2:
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                _pause(marker)
        return real_save(obj, f, *args, **kwargs)

    def step(self, batch, batch_idx):
        if kind in ("epoch-2", "swa-epoch-2", "exact-epoch-2") and self.current_epoch == 2 or kind == "epoch-0":
            _pause(marker)
        if kind in ("cli", "exact-sigterm") and self.current_epoch == 1 and batch_idx == 0:
            marker.write_text("epoch 1")
            for _ in range(200):  # the SIGTERM lands in this step, the first of epoch 1's two
                time.sleep(0.05)
                if self.trainer.received_sigterm:
                    break
        return real_step(self, batch, batch_idx)

    torch.save = save
    ClassifierModule.training_step = step
    if kind == "cli":
        cli.main(["train", str(data), "-o", str(out), "--backbone", "test_resnet", "--pretrained", "none", "--input-size", "32",
                  "--batch-size", "8", "--epochs", str(epochs), "--workers", "0"])
    elif kind.startswith("exact"):
        fine_tune(data, out, epochs=epochs, **EXACT)
    else:
        fine_tune(data, out, epochs=epochs, **TINY, **({"swa": 0.5} if kind.startswith("swa") else {}))
    os._exit(0)


def _run_until_paused(kind: str, data: Path, out: Path, tmp: Path, epochs: int = EPOCHS, sig=signal.SIGKILL):
    """Start ``_child``, wait until it reaches its moment, send ``sig``; the exit code and its output."""
    marker, log = tmp / f"{kind}.marker", tmp / f"{kind}.log"
    proc = FORK.Process(target=_child, args=(kind, data, out, marker, log, epochs))
    proc.start()
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run never reached {kind}: {log.read_text()[-2000:] if log.exists() else ''}"
    os.kill(proc.pid, sig)
    proc.join(120)
    assert not proc.is_alive()
    return proc.exitcode, log.read_text()


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread, as in ``_child``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _check_complete(out: Path, result, epochs: int = EPOCHS) -> None:
    """Every epoch once in metrics.json and the result, and the best epoch is the saved model's."""
    saved = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == list(range(epochs))
    assert [h["epoch"] for h in result.history] == list(range(epochs))
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert saved["best"]["best_epoch"] == best["epoch"] == result.metrics["best_epoch"]
    entry = saved["history"][best["epoch"]]
    assert saved["best"]["val_loss"] == entry["val_loss"] == min(h["val_loss"] for h in saved["history"])
    kept = result.model.state_dict()
    for key, value in best["state_dict"].items():  # the model folder holds the best checkpoint's weights
        assert torch.equal(kept[key.removeprefix("model.")], value), key
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == epochs - 1 and last["global_step"] == epochs * STEPS  # no step lost, none done twice
    assert _temporaries(out) == []


# --- killed runs ---------------------------------------------------------------------------------

@needs_fork
def test_sigkill_inside_a_checkpoint_write_then_resume(data, tmp_path):
    out = tmp_path / "run"
    code, log = _run_until_paused("mid-write", data, out, tmp_path)
    assert code == -signal.SIGKILL, log
    orphans = _temporaries(out)
    assert len(orphans) == 1 and orphans[0].parent == out / "checkpoints"  # the kill landed inside the write
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0  # the previous one, whole
    complete = [torch.load(p, weights_only=True)["global_step"] for p in (out / "checkpoints").glob("*.ckpt")]
    assert resume_checkpoint(out / "checkpoints")[1]["global_step"] == max(complete)  # epoch 1's best.ckpt, if it improved
    result = fine_tune(data, out, epochs=EPOCHS, resume=True, **TINY)
    _check_complete(out, result)


@needs_fork
def test_sigkill_between_epochs_then_resume_past_a_truncated_last_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    code, log = _run_until_paused("epoch-2", data, out, tmp_path)
    assert code == -signal.SIGKILL, log
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1 and _temporaries(out) == []
    last.write_bytes(last.read_bytes()[:1000])  # damaged afterwards: resume falls back to the best checkpoint
    with pytest.warns(UserWarning, match=r"skipped broken checkpoint.*last\.ckpt: truncated or corrupt"):
        result = fine_tune(data, out, epochs=EPOCHS, resume=True, **TINY)
    _check_complete(out, result)


@needs_fork
def test_sigkill_before_the_first_checkpoint_leaves_nothing_to_resume(data, tmp_path):
    out = tmp_path / "run"
    code, _ = _run_until_paused("epoch-0", data, out, tmp_path)
    assert code == -signal.SIGKILL
    with pytest.raises(CheckpointError, match=r"cannot resume: no checkpoint .*checkpoints; train without --resume"):
        fine_tune(data, out, epochs=EPOCHS, resume=True, **TINY)


@needs_fork
def test_sigterm_saves_a_resumable_state_and_exits_non_zero(data, tmp_path):
    out = tmp_path / "run"
    code, log = _run_until_paused("cli", data, out, tmp_path, epochs=30, sig=signal.SIGTERM)
    assert code not in (0, None, -signal.SIGTERM), log
    text = " ".join(log.split())
    assert "training interrupted by SIGTERM after 1 of 30 epoch(s)" in text and "--resume" in text
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == STEPS + 1  # saved in epoch 1, after its first step
    assert not (out / "model").exists() and _temporaries(out) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fine_tune(data, out, epochs=EPOCHS, resume=True, **TINY)
    assert not [w for w in caught if "before the epoch ended" in str(w.message)]  # expected here: no alarm about it
    assert result.metrics["train_images"] // TINY["batch_size"] == STEPS
    _check_complete(out, result)


@needs_fork
@pytest.mark.parametrize("kind, sig", [("exact-epoch-2", signal.SIGKILL), ("exact-sigterm", signal.SIGTERM)])
def test_a_resumed_run_is_the_run_never_stopped(data, tmp_path, kind, sig):
    """Killed between two epochs, or stopped by SIGTERM after the first step of one, then resumed:
    every weight, statistic and optimiser moment is the one of a run never stopped -- the same
    images in the same order, the same crops, flips, colours, hidden patches and dropout, with the
    augmentation in a loader worker. (On as many threads as the killed child: sums over another
    number of threads round differently.)"""
    never_stopped = tmp_path / "never-stopped"
    with _one_thread():
        fine_tune(data, never_stopped, epochs=EPOCHS, **EXACT)
    out = tmp_path / "run"
    code, log = _run_until_paused(kind, data, out, tmp_path, sig=sig)
    assert code != 0, log
    stopped = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == (2 * STEPS if kind == "exact-epoch-2" else STEPS + 1), log
    with _one_thread():
        fine_tune(data, out, epochs=EPOCHS, resume=True, **EXACT)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (never_stopped, out))
    assert a["global_step"] == b["global_step"] == EPOCHS * STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    moments = [(a_, b_) for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values())
               for a_, b_ in zip(sa.values(), sb.values())]
    assert moments and all(torch.equal(x, y) for x, y in moments)


@needs_fork
def test_weight_averaging_survives_a_kill_and_resume(data, tmp_path):
    """SWA killed in epoch 2 resumes and keeps averaging: the checkpoint of the kill holds the
    average (a copy of the weights where averaging begins), the finished run keeps the final
    average, which is not the last step's weights."""
    out = tmp_path / "run"
    code, log = _run_until_paused("swa-epoch-2", data, out, tmp_path)
    assert code == -signal.SIGKILL, log
    before = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    averaged_then = {k.removeprefix("ema.module."): v for k, v in before.items() if k.startswith("ema.module.")}
    assert averaged_then and all(torch.equal(v, before["model." + k]) for k, v in averaged_then.items())  # steps 0-4: a copy
    result = fine_tune(data, out, epochs=EPOCHS, resume=True, swa=0.5, **TINY)
    after = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == EPOCHS * STEPS
    averaged = {k.removeprefix("ema.module."): v for k, v in after["state_dict"].items() if k.startswith("ema.module.")}
    kept = result.model.state_dict()
    assert all(torch.equal(kept[k], v.float()) for k, v in averaged.items())
    assert any(not torch.equal(v, after["state_dict"]["model." + k]) for k, v in averaged.items() if v.is_floating_point())


# --- resume choice and atomic writes -------------------------------------------------------------

def _fake_checkpoint(path: Path, epoch: int, step: int) -> None:
    torch.save({k: {} for k in RESUME_KEYS} | {"epoch": epoch, "global_step": step, "state_dict": {"w": torch.zeros(2)}}, path)


def test_resume_picks_the_newest_complete_checkpoint_and_names_broken_ones(tmp_path):
    _fake_checkpoint(tmp_path / "best.ckpt", 1, 6)
    _fake_checkpoint(tmp_path / "last.ckpt", 2, 9)
    path, info = resume_checkpoint(tmp_path)
    assert path == tmp_path / "last.ckpt" and (info["epoch"], info["global_step"]) == (2, 9)
    (tmp_path / "last.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.warns(UserWarning, match=r"resuming from best\.ckpt.*last\.ckpt: empty.*other\.ckpt: not a training checkpoint"):
        assert resume_checkpoint(tmp_path)[0] == tmp_path / "best.ckpt"
    (tmp_path / "best.ckpt").write_bytes((tmp_path / "best.ckpt").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*best\.ckpt: truncated or corrupt.*last\.ckpt: empty"):
        resume_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resume_checkpoint(tmp_path / "missing")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write(target, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# --- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, r"--epochs: 0 is out of range \(must be >= 1\)"),
    ({"batch_size": 0}, r"--batch-size: 0 is out of range \(must be >= 1\)"),
    ({"lr": -1.0}, r"--lr: -1 is out of range \(must be > 0\)"),
    ({"input_size": 0}, r"--input-size: 0 is out of range \(must be >= 32 and <= 4096\)"),
    ({"crop_scale": (1.0, 0.2)}, r"--crop-scale: the minimum 1 is above the maximum 0.2"),
    ({"crop_scale": (0.0, 1.0)}, r"--crop-scale: 0 is out of range \(must be > 0 and <= 1\)"),
    ({"precision": "foo"}, r"--precision: 'foo' is not one of .*32-true"),
    ({"schedule": "step"}, r"--schedule: 'step' is not one of onecycle, cosine"),
    ({"output_stride": 7}, r"--output-stride: 7 is not one of 8, 16, 32"),
    ({"focal_gamma": -1.0}, r"--focal-gamma: -1 is out of range"),
    ({"test_scale": 0.0}, r"--test-scale: 0 is out of range \(must be > 0\)"),
    ({"test_scale": 100.0}, r"--test-scale: 100 times the 224-px training size gives 22400-px inputs"),
    ({"hide_prob": 2.0}, r"--hide-prob: 2 is out of range \(must be >= 0 and <= 1\)"),
    ({"ema_decay": 1.0}, r"--ema-decay: 1 is out of range \(must be >= 0 and < 1\)"),
    ({"val_fraction": 1.0}, r"--val-fraction: 1 is out of range"),
    ({"workers": -1}, r"--workers: -1 is out of range"),
    ({"loss": "hinge"}, r"--loss: 'hinge' is not one of ce, focal"),
    ({"head": "mlp"}, r"--head: 'mlp' is not one of cam, attention, tap"),
    ({"counting": "boxes"}, r"--counting: 'boxes' is not one of density, count, both"),
    ({"epochs": 2.5}, r"--epochs: expected an integer, got 2.5"),
    ({"devices": "x"}, r"--devices: 'x' is not auto, a number of devices"),
    ({"devices": 0}, r"--devices: 0 is not a number of devices"),
    ({"accelerator": "tpu9"}, r"--accelerator: 'tpu9' is not one of auto, cpu"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(OptionError, match=message):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", **kwargs)  # the data is never read
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine without a GPU")
def test_gpu_options_on_a_cpu_machine_are_refused(tmp_path):
    with pytest.raises(OptionError, match=r"--devices: 3 asks for 3 GPUs, but no CUDA GPU.*say --accelerator cpu"):
        fine_tune(tmp_path, tmp_path / "out", devices=3)
    with pytest.raises(OptionError, match=r"--devices: '-1' means every GPU, but no CUDA GPU"):
        fine_tune(tmp_path, tmp_path / "out", devices="-1")
    with pytest.raises(OptionError, match=r"--devices: '-1' means every GPU"):
        fine_tune(tmp_path, tmp_path / "out", devices="-1", accelerator="cpu")
    with pytest.raises(OptionError, match=r"--accelerator: 'cuda' asked for, but no CUDA GPU"):
        fine_tune(tmp_path, tmp_path / "out", accelerator="gpu")


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs: 0 is out of range (must be >= 1)"),
    (["--crop-scale", "1", "0.2"], "--crop-scale: the minimum 1 is above the maximum 0.2"),
    (["--cutmix-alpha", "-1"], "--cutmix-alpha: -1 is out of range (must be >= 0)"),
    (["--input-size", "8"], "--input-size: 8 is out of range (must be >= 32 and <= 4096)"),
])
def test_cli_names_the_option(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", str(tmp_path / "no-such-data"), "-o", str(tmp_path / "out"), *args])
    assert exit_.value.code == 2
    assert message in " ".join(capsys.readouterr().out.split())


# --- undecodable images --------------------------------------------------------------------------

def test_undecodable_training_and_validation_images_are_listed_and_survive_a_resume(data, tmp_path):
    import csv
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    rows = list(csv.DictReader((copy / "labels.csv").open()))
    broken = {split: next(r["path"] for r in rows if r["split"] == split) for split in ("train", "val")}
    for name in broken.values():
        image = copy / name
        image.write_bytes(image.read_bytes()[:200])  # a truncated JPEG
    out = tmp_path / "run"
    fine_tune(copy, out, epochs=1, **TINY)
    for name in broken.values():  # repaired before the resume: the first epoch's skips are still reported
        shutil.copy(data / name, copy / name)
    result = fine_tune(copy, out, epochs=2, resume=True, **TINY)
    assert result.metrics["skipped_images"] == 2 and len(result.skipped) == 2
    listed = (out / "skipped.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[-1] for line in listed) == sorted(Path(n).name for n in broken.values())
    assert all(line.split("\t")[1].strip() for line in listed)  # each with why
    assert json.loads((out / "metrics.json").read_text())["best"]["skipped_images"] == 2
    with pytest.raises(CheckpointError, match=r"cannot resume from .*last\.ckpt: it holds another model"):
        fine_tune(copy, out, epochs=3, resume=True, **(TINY | {"backbone": "test_efficientnet"}))


def test_resuming_another_model_is_refused_by_name(tmp_path):
    from weakloc.train.fit import check_resumable

    check_resumable(torch.nn.Linear(2, 3), tmp_path / "last.ckpt", {"weight": (3, 2), "bias": (3,)})
    with pytest.raises(CheckpointError, match=r"last\.ckpt: it holds another model \(weight is \(4, 2\) there, \(3, 2\) here\)"):
        check_resumable(torch.nn.Linear(2, 3), tmp_path / "last.ckpt", {"weight": (4, 2), "bias": (3,)})
    with pytest.raises(CheckpointError, match=r"it lacks bias"):
        check_resumable(torch.nn.Linear(2, 3), tmp_path / "last.ckpt", {"weight": (3, 2)})


def test_resuming_with_another_recipe_is_refused_by_option(data, tmp_path):
    """A run resumed with other learning settings would be two recipes in one model, with one
    config.json describing neither; more epochs, or another place to run, are a resume."""
    out = tmp_path / "run"
    fine_tune(data, out, epochs=1, frozen_stages=1, lr=1e-3, **TINY)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*last\.ckpt: it was trained with other settings "
                                              r"\(--frozen-stages 1 there, 0 here; --lr 0\.001 there, 0\.002 here\); resume with"):
        fine_tune(data, out, epochs=2, resume=True, **TINY)
    resumed = fine_tune(data, out, epochs=2, frozen_stages=1, lr=1e-3, resume=True, limit_batches=2, **TINY)
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.model.config.train.frozen_stages == 1


def test_recipe_changes_compare_only_what_shapes_learning():
    from weakloc.config import TrainConfig
    from weakloc.train.state import recipe_changes, training_recipe

    stored = training_recipe(TrainConfig(crop_scale=(0.5, 1.0)))
    assert "epochs" not in stored and "workers" not in stored and stored["crop_scale"] == [0.5, 1.0]
    assert recipe_changes(stored, training_recipe(TrainConfig(crop_scale=(0.5, 1.0), epochs=9, workers=2, devices=2))) == []
    assert recipe_changes(stored, training_recipe(TrainConfig(crop_scale=(0.4, 1.0), seed=3))) == [
        "--seed 0 there, 3 here", "--crop-scale [0.5, 1.0] there, [0.4, 1.0] here"]
    del stored["seed"]  # a checkpoint of an older version lacks settings: those are not compared
    assert recipe_changes(stored, training_recipe(TrainConfig(crop_scale=(0.5, 1.0), seed=3))) == []
