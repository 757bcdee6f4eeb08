"""Crash-safe training state: atomic checkpoints, choosing the checkpoint to resume from, a
history that survives resumes, and SIGTERM / Ctrl+C stopping between two batches with a resumable
checkpoint (used by :func:`~weakloc.train.fine_tune`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException

from weakloc.errors import CheckpointError, WeaklocError
from weakloc.models.checkpoint import atomic_write
from weakloc.train.options import option_name


#: the checkpoint key of the teacher's weights digest (:func:`~weakloc.models.checkpoint.weights_digest`)
TEACHER_KEY = "weakloc_teacher"
#: the checkpoint key of the run's recipe (:func:`training_recipe`)
RECIPE_KEY = "weakloc_recipe"
#: :class:`~weakloc.config.TrainConfig` settings a resumed run may change: where and how fast it
#: runs, and how long (more epochs extend a finished run); every other setting shapes what is
#: learnt, and a run resumed with another value would silently be two recipes in one model
RESUME_MAY_CHANGE = frozenset({"epochs", "pretrained", "precision", "accelerator", "devices", "strategy", "num_nodes", "workers",
                               "limit_batches"})
#: suffix of the temporary file :func:`atomic_write` renames over its target
TMP_SUFFIX = ".tmp"
#: the file beside ``model/`` listing the images training skipped: path, a tab, why
SKIPPED_FILE = "skipped.txt"
#: what a checkpoint must hold for Lightning to resume training from it
RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "epoch", "global_step")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed :func:`~weakloc.models.checkpoint.atomic_write` calls
    left in ``folder``."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()] if Path(folder).is_dir() else []
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, through :func:`atomic_write`: a run killed while it writes
    ``last.ckpt`` leaves the previous ``last.ckpt`` whole, not a 0-byte or half-written one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def _load_problem(path: Path, error: Exception) -> str:
    """Why ``path`` did not load, in a few words."""
    if path.stat().st_size == 0:
        return "empty (0 bytes; an interrupted write?)"
    first = (str(error).strip().splitlines() or [""])[0][:160]
    return f"truncated or corrupt ({type(error).__name__}: {first})"


def resume_checkpoint(folder: str | Path) -> tuple[Path, dict]:
    """The checkpoint to resume from: the newest ``*.ckpt`` of ``folder`` (by training step; at a tie,
    ``last.ckpt``) that loads completely with ``torch.load(weights_only=True)`` and holds a training
    state. Broken files are skipped with a warning that names them.

    Returns:
        its path and ``{"epoch", "global_step", "shapes", "teacher", "recipe"}`` (``shapes``: of its
        ``state_dict``'s tensors; ``teacher``: the weights digest of the teacher it was trained
        from, or None; ``recipe``: :func:`training_recipe` of its run, or None; all for
        :func:`check_resumable`).

    Raises:
        CheckpointError: no checkpoint, or none usable (every file named with its problem).
    """
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.ckpt") if p.is_file()) if folder.is_dir() else []
    if not files:
        raise CheckpointError(f"cannot resume: no checkpoint (*.ckpt) in {folder}; train without --resume first")
    usable, broken = [], []
    for path in files:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's zip reader and unpickler raise many kinds
            broken.append(f"{path.name}: {_load_problem(path, e)}")
            continue
        missing = [k for k in RESUME_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(RESUME_KEYS)
        if missing:
            broken.append(f"{path.name}: not a training checkpoint (no {', '.join(missing)})")
            continue
        info = {"epoch": int(ckpt["epoch"]), "global_step": int(ckpt["global_step"]),
                "shapes": {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)},
                "teacher": ckpt.get(TEACHER_KEY), "recipe": ckpt.get(RECIPE_KEY)}
        usable.append(((info["global_step"], info["epoch"], path.name == "last.ckpt"), path, info))
        del ckpt
    if not usable:
        raise CheckpointError(f"cannot resume: no usable checkpoint in {folder} ({'; '.join(broken)})")
    _, path, info = max(usable, key=lambda u: u[0])
    if broken:
        warnings.warn(f"resuming from {path.name}; skipped broken checkpoint(s) in {folder}: {'; '.join(broken)}", stacklevel=2)
    return path, info


def training_recipe(settings) -> dict:
    """The settings of a :class:`~weakloc.config.TrainConfig` that shape what a run learns (all but
    :data:`RESUME_MAY_CHANGE`), as plain values a ``weights_only`` checkpoint can hold."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.to_dict().items() if k not in RESUME_MAY_CHANGE}


def recipe_changes(stored: dict, own: dict) -> list[str]:
    """``--option STORED there, OWN here`` for each setting of the :func:`training_recipe` ``own``
    that differs from the interrupted run's ``stored`` one (settings it lacks, from an older
    version, are not compared)."""
    return [f"{option_name(k)} {stored[k]} there, {own[k]} here" for k in own if k in stored and stored[k] != own[k]]


def check_resumable(module: pl.LightningModule, path: Path, shapes: dict[str, tuple], teacher: str | None = None,
                    recipe: dict | None = None) -> None:
    """Refuse to resume ``module``'s training from a checkpoint of another model (other backbone,
    head, classes or options), which Lightning would stop at with a long state-dict traceback, or
    of a run made from another teacher of the same architecture (whose targets, and frozen copy,
    would silently be mixed with this teacher's).

    Args:
        shapes: the checkpoint's tensor shapes by name (:func:`resume_checkpoint`'s ``shapes``).
        teacher: the checkpoint's teacher digest (``teacher``; None: no teacher, or a checkpoint
            written before digests were kept), compared with ``module.teacher_digest``.
        recipe: the checkpoint's :func:`training_recipe` (None: written before recipes were kept),
            compared with ``module.recipe``.
    """
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, extra = sorted(own.keys() - shapes.keys()), sorted(shapes.keys() - own.keys())
    differ = sorted(k for k in own.keys() & shapes.keys() if own[k] != shapes[k])
    if missing or extra or differ:
        what = (f"{differ[0]} is {shapes[differ[0]]} there, {own[differ[0]]} here" if differ else
                f"it lacks {missing[0]}" if missing else f"it has {extra[0]}, which this model lacks")
        raise CheckpointError(f"cannot resume from {path}: it holds another model ({what}); resume with the options "
                              "of the interrupted run, or train without --resume")
    if teacher is not None and teacher != getattr(module, "teacher_digest", None):
        raise CheckpointError(f"cannot resume from {path}: it was trained from another teacher (its weights differ from "
                              "--teacher's); resume with the interrupted run's --teacher, or train without --resume")
    changed = recipe_changes(recipe, module.recipe) if recipe is not None and hasattr(module, "recipe") else []
    if changed:
        raise CheckpointError(f"cannot resume from {path}: it was trained with other settings ({'; '.join(changed)}); resume "
                              "with the interrupted run's options, or train without --resume")


class TrainingHistory(pl.Callback):
    """Every validated epoch's metrics, stored in the checkpoints so they survive a resume (and the
    best checkpoint holds its own epoch's metrics)."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []

    @property
    def state_key(self) -> str:
        return "weakloc_history"

    # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before the
    # module's, so metrics the module logs at epoch end (val_acc, val_map, val_count_mae) would be
    # the previous epoch's there. Checkpoint callbacks run after this one, so an epoch's checkpoint
    # holds its own entry.
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry = {"epoch": trainer.current_epoch, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
        self.epochs = [h for h in self.epochs if h["epoch"] < entry["epoch"]] + [entry]  # a re-run epoch replaces its entry

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.epochs]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = [dict(h) for h in state_dict.get("history", [])]


class TrainingInterrupted(WeaklocError):
    """Training stopped by SIGTERM or SIGINT; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal(pl.Callback):
    """SIGTERM (what a scheduler or ``timeout`` sends) and SIGINT (Ctrl+C) stop training between two
    batches with a resumable checkpoint at ``path``.

    Lightning's own SIGTERM handler only sets a flag its loops stop at, by raising
    ``SIGTERMException`` -- a ``SystemExit`` with status 0, so a terminated run used to end quietly,
    as if it had succeeded. Here its state is saved (through the trainer, so atomically) when the
    stop comes between training batches; a stop during validation keeps the previous epoch's
    checkpoint. Ctrl+C goes through the same flag, so it never lands inside an optimiser step;
    a second Ctrl+C stops at once.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.signal: signal.Signals | None = None
        self.saved = False
        self.epochs_done = 0

    def record(self, signum, frame=None) -> None:
        """A signal handler: remember the first signal."""
        if self.signal is None:
            self.signal = signal.Signals(signum)

    def _on_sigint(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.record(signum)
        lightning_handler = signal.getsignal(signal.SIGTERM)
        if callable(lightning_handler):
            lightning_handler(signum, frame)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installs its SIGTERM handler just before the loops start (and puts the previous
        # handlers back after them, SIGINT's included)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._on_sigint)
        if self.signal is not None:  # came while Lightning was setting up, before its handler was there
            raise SIGTERMException

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.record(signal.SIGINT)
        if not isinstance(exception, SIGTERMException):
            return
        self.record(signal.SIGTERM)
        self.epochs_done = trainer.current_epoch
        if trainer.state.stage == RunningStage.TRAINING:  # between two training batches, or after an epoch's end
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved = True

    def error(self, epochs: int) -> TrainingInterrupted:
        """The one-line error for an interrupted run of ``epochs`` epochs."""
        head = f"training interrupted by {self.signal.name} after {self.epochs_done} of {epochs} epoch(s)"
        if self.saved:
            tail = f"its state was saved to {self.path}: run the same command with --resume to continue"
        elif self.path.is_file():
            tail = f"{self.path} holds the last validated epoch: run the same command with --resume to continue from it"
        else:
            tail = "before any checkpoint was written, so there is nothing to resume: run it again"
        return TrainingInterrupted(f"{head}; {tail}", int(self.signal))


@contextlib.contextmanager
def signals_to(stopper: StopOnSignal):
    """SIGTERM recorded by ``stopper`` for the duration (Lightning's handler, installed when its
    loops start, calls it after its own); SIGTERM's and SIGINT's handlers put back after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, stopper.record)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def lost_peer_message(rank: int, world: int, cause: str, last: Path) -> str:
    """The one line a training process prints when another of its launch went away."""
    if last.is_file():
        tail = f"{last} holds the last validated epoch: run the same command with --resume to continue"
    else:
        tail = "no checkpoint was written yet, so there is nothing to resume: run it again"
    return f"training process {rank} of {world} lost another one ({cause}); {tail}"


@contextlib.contextmanager
def peer_deaths_reported(last: Path, world: int):
    """For the duration, the processes Lightning starts itself (``--strategy ddp`` without
    torchrun) end with :func:`lost_peer_message` when one of them dies.

    Lightning's observer thread in the main process polls its children every few seconds and, when
    one has died, SIGKILLs them all and the main process itself -- no handler runs, so the main
    process ended without a word whenever the observer came before gloo's error about the lost peer
    (a data-loading or validation stretch without collectives is enough). Here the observer first
    prints the line, then kills as before (SIGTERM would not free a process stuck in a collective).
    """
    try:
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
        from lightning.pytorch.strategies.launchers import subprocess_script as launcher
        original = launcher._launch_process_observer
    except (ImportError, AttributeError):  # another Lightning: its observer as it is, gloo's error still reported
        yield
        return

    class Reporting(_ChildProcessObserver):
        def _terminate_all(self) -> None:
            ended = [(i + 1, p.returncode) for i, p in enumerate(self._child_processes) if p.returncode]
            cause = ", ".join(f"process {i} {_exit_words(code)}" for i, code in ended) or "a process ended"
            print(f"error: {lost_peer_message(0, world, cause, last)}", file=sys.stderr, flush=True)
            super()._terminate_all()

    launcher._launch_process_observer = lambda children: Reporting(child_processes=children, main_pid=os.getpid()).start()
    try:
        yield
    finally:
        launcher._launch_process_observer = original


def _exit_words(code: int) -> str:
    """``-9`` -> 'was killed by SIGKILL', ``1`` -> 'exited with status 1'."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
