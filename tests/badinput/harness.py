"""Cases as data, and the runner that classifies what weakloc did with each bad input.

A case is built in its own folder (``Env.root``) by its builder in the test process, then run by a
worker: a process forked once from the warmed-up test process (torch and weakloc already
imported), which runs one case at a time -- ``weakloc.cli.main(argv)`` or a Python API call, its
stdout and stderr going to a file, in the case's folder -- and sends back the classified outcome.
A worker that segfaults (libpng on a corrupt PNG), hangs (a FIFO named ``x.jpg``) or dies of a
runaway allocation (its address space is capped) fails that one case and is replaced; the other
cases go on. The test process compares the case folder before and after, so a write outside the
folders the command may write to is caught.

Observed outcomes:

- ``error``: exit code 2 / a ``WeaklocError`` whose one-line message names every ``match`` string;
- ``vague-error``: a clear exit but the message does not name the input, or spans several lines;
- ``skip`` / ``ok``: exit 0 and the case's check for that outcome passes;
- ``crash``: an ``unexpected error`` line, another exception type, a traceback, a signal;
- ``hang``: the time limit passed;
- ``silent``: exit 0 although the input should have been refused or reported;
- ``wrong``: exit 0 but the ok-check failed (a wrong result);
- ``refused``: a good input refused (expected ``ok``, got an error);
- ``outside``: something was written (or removed) outside the folders the command may write to;
- ``unwarned``: the outcome asked for, but no ``warning:`` line names what the case expects (an old
  option spelling and its new one).
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTCOMES = ("error", "skip", "ok")
TRACEBACK = "Traceback (most recent call last)"
#: extra address space a case may use on top of the parent's (a bomb must be refused, not decoded)
MEMORY_HEADROOM = 6 << 30


@dataclass
class Assets:
    """Inputs shared by every case (built once per session, never written by a case: builders copy them)."""

    root: Path
    model: Path  # tiny test_resnet model folder, classes triangle/square/star, 32 px
    data: Path  # synthetic single-label data: images/, labels.csv (with split), counts.csv, annotations.json
    count_model: Path | None = None
    cache: dict = field(default_factory=dict)

    def cached(self, name: str, make: Callable[[Path], None]) -> Path:
        """A large generated file, made once per session under ``root/cache``."""
        path = self.root / "cache" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            make(path)
        return path


class Env:
    """One case's folder and placeholders.

    ``vars`` fill the ``{name}`` fields of a CLI argv; ``out`` is deep inside ``root`` so that a
    hostile name climbing out of it with ``../`` still lands inside the snapshotted folder.
    """

    def __init__(self, root: Path, assets: Assets):
        self.root = root
        self.assets = assets
        self.out = root / "w1" / "w2" / "w3" / "w4" / "w5" / "out"
        self.vars: dict[str, str] = {"root": str(root), "out": str(self.out)}
        self.info: dict[str, Any] = {}  # builder notes for checks (file names, sizes, ...)

    def __getitem__(self, key: str) -> str:
        return self.vars[key]

    def set(self, **kw) -> None:
        self.vars.update({k: str(v) for k, v in kw.items()})

    def model(self, name: str = "model", source: Path | None = None) -> Path:
        """A private copy of the base model folder (``{model}``)."""
        dst = self.root / name
        shutil.copytree(source or self.assets.model, dst)
        self.vars.setdefault(name, str(dst))
        return dst

    def data(self, name: str = "data") -> Path:
        """A private copy of the synthetic data (``{data}``, ``{labels}``, ``{ann}``, ``{images}``)."""
        dst = self.root / name
        shutil.copytree(self.assets.data, dst)
        if name == "data":
            self.set(data=dst, labels=dst / "labels.csv", ann=dst / "annotations.json", images=dst / "images",
                     counts=dst / "counts.csv")
        return dst

    def dir(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


@dataclass
class Cli:
    """``weakloc.cli.main(argv)`` in the forked child; argv items are ``str.format``-ed with ``Env.vars``."""

    argv: list[str]

    def describe(self) -> str:
        return "weakloc " + " ".join(self.argv)


@dataclass
class Api:
    """A Python call ``fn(env)`` in the forked child; its return value goes to the checks."""

    fn: Callable[[Env], Any]
    text: str = ""

    def describe(self) -> str:
        return self.text or getattr(self.fn, "__name__", "python call")


@dataclass
class Proc:
    """``python -m weakloc.cli argv`` as a real process (the installed entry point, its exit code)."""

    argv: list[str]

    def describe(self) -> str:
        return "python -m weakloc.cli " + " ".join(self.argv)


@dataclass
class Case:
    """One bad input, the call that takes it and the outcome(s) the issue asks for.

    Attributes:
        id: readable, unique: ``kind/what/command``.
        kind: image | labels | counts | coco | voc | yolo | model | option | api | train.
        build: writes the inputs into ``env.root`` and sets ``env.vars``.
        run: :class:`Cli`, :class:`Api` or :class:`Proc`.
        expect: accepted outcomes (``error``, ``skip``, ``ok``); several where the issue allows
            either (e.g. a 120-megapixel image may be read, or skipped with a reason).
        match: strings an error message must contain (formatted with ``Env.vars`` and ``Env.info``),
            e.g. the file name or the option's spelling; ``a|b`` accepts either.
        checks: per non-error outcome, ``check(env, result)`` raising AssertionError when the
            output is not what that outcome means.
        writes: folders the command may write to (formatted); anything else changed is a failure.
        train: let training start (else ``Trainer.fit`` is replaced by a stub that records what
            it was given, so argument checks are tested without training).
        requires: returns a reason to skip the case on this machine (e.g. running as root).
        warns: strings one ``warning:`` line of the output must contain, whatever the outcome
            (``a|b`` accepts either), e.g. a deprecated option's old and new spellings.
        note: what the issue says about this input.
    """

    id: str
    kind: str
    build: Callable[[Env], None]
    run: Cli | Api | Proc
    expect: tuple[str, ...]
    match: tuple[str, ...] = ()
    checks: dict[str, Callable] = field(default_factory=dict)
    writes: tuple[str, ...] = ("{out}",)
    train: bool = False
    timeout: float = 60.0
    requires: Callable[[], str | None] | None = None
    warns: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self):
        if isinstance(self.expect, str):
            self.expect = (self.expect,)
        if isinstance(self.match, str):
            self.match = (self.match,)
        if isinstance(self.warns, str):
            self.warns = (self.warns,)
        bad = [o for o in self.expect if o not in OUTCOMES]
        assert not bad, f"{self.id}: unknown outcome(s) {bad}"
        missing = [o for o in self.expect if o != "error" and o not in self.checks]
        assert not missing, f"{self.id}: outcome(s) {missing} need a check"
        assert "error" not in self.expect or self.match, f"{self.id}: an error case must say what the message names"


@dataclass
class Result:
    """What one run gave: CLI exit code and output, or the API's return value / exception."""

    code: int | None = None
    text: str = ""
    value: Any = None
    exc: BaseException | None = None
    reached_training: dict | None = None


@dataclass
class Verdict:
    observed: str
    detail: str
    output: str = ""
    seconds: float = 0.0

    def passed(self, case: Case) -> bool:
        return self.observed in case.expect

    def cause(self, case: Case) -> str:
        """Why a failing case fails, for routing: the observed class, or ``refused`` for good input refused."""
        if self.observed in ("error", "vague-error") and "error" not in case.expect:
            return "refused"
        return self.observed


# ----------------------------------------------------------------------------------------------
# classification (runs in the child for Cli/Api, in the parent for Proc)

_BOX = str.maketrans({c: " " for c in "╭╮╰╯│─┃━┏┓┗┛"})


def _fmt(text: str, env: Env) -> str:
    return text.format_map({**env.vars, **{k: v for k, v in env.info.items() if isinstance(v, (str, int, float))}})


def first_line(text: str) -> str:
    """The most telling line of an output: an error line, else the first non-progress line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pat in ("unexpected error", "error:", "Error", "Traceback"):
        for ln in lines:
            if pat in ln:
                return ln[:300]
    return (lines[-1] if lines else "(no output)")[:300]


def _error_message(text: str) -> tuple[str, bool]:
    """(message, single_line) of a clear CLI error: weakloc's ``error:`` line, or click's usage panel."""
    lines = text.splitlines()
    for n, ln in enumerate(lines):
        s = ln.strip()
        if s.startswith("error:"):
            rest = [x for x in lines[n + 1:] if x.strip()]
            return s, not rest
    usage = " ".join(text.translate(_BOX).split())
    if "Error" in usage:
        return usage[usage.index("Error"):], True  # click's own format: a panel, rewrapped
    return usage, False


def _names(msg: str, match: str) -> bool:
    """``msg`` contains ``match``, or one of its ``|``-separated alternatives."""
    return any(alt in msg for alt in match.split("|"))


def _success(case: Case, env: Env, res: Result) -> tuple[str, str]:
    failures = []
    for outcome in ("skip", "ok"):
        if outcome in case.expect:
            try:
                case.checks[outcome](env, res)
                return outcome, "passed its check"
            except AssertionError as e:
                failures.append(f"{outcome}-check: {str(e) or 'assertion failed'}"[:400])
            except Exception as e:  # noqa: BLE001 - a check that cannot read the output is a wrong result
                failures.append(f"{outcome}-check raised {type(e).__name__}: {e}"[:400])
    if "ok" in case.expect:
        return "wrong", "; ".join(failures)
    if "skip" in case.expect:
        return "silent", "not reported as skipped: " + "; ".join(failures)
    what = "training started" if res.reached_training is not None else "exit 0" if res.code == 0 else "returned normally"
    return "silent", f"accepted ({what}): {first_line(res.text)}"


def _warned(case: Case, env: Env, text: str) -> str | None:
    """Why the output lacks the ``warning:`` line ``case.warns`` asks for (None: it has it)."""
    if not case.warns:
        return None
    wanted = [_fmt(w, env) for w in case.warns]
    lines = text.splitlines()
    if any(ln.strip().startswith("warning:") and all(_names(ln, w) for w in wanted) for ln in lines):
        return None
    seen = [ln.strip()[:200] for ln in lines if "warning" in ln.lower()]
    return f"no one-line warning naming {wanted}" + (f" (saw: {seen[0]})" if seen else " (no warning printed)")


def judge(case: Case, env: Env, res: Result) -> tuple[str, str]:
    """Observed outcome and a one-line detail (``unwarned`` when the outcome is right but the
    warning ``case.warns`` asks for is missing)."""
    observed, detail = _judge(case, env, res)
    if observed in case.expect and (missing := _warned(case, env, res.text)):
        return "unwarned", missing
    return observed, detail


def _judge(case: Case, env: Env, res: Result) -> tuple[str, str]:
    from weakloc.errors import WeaklocError

    if TRACEBACK in res.text:
        tail = [ln for ln in res.text.splitlines() if ln.strip()]
        return "crash", "traceback printed: " + (tail[-1] if tail else "")[:300]
    if res.reached_training is not None:
        return _success(case, env, res)
    matches = [_fmt(m, env) for m in case.match]
    if isinstance(case.run, (Cli, Proc)):
        if res.exc is not None:
            return "crash", f"escaped main(): {type(res.exc).__name__}: {res.exc}"[:400]
        if res.code == 0:
            return _success(case, env, res)
        if res.code == 2:
            msg, one = _error_message(res.text)
            missing = [m for m in matches if not _names(msg, m)]
            if missing:
                return "vague-error", f"does not name {missing}: {msg[:300]}"
            return ("error", msg[:300]) if one else ("vague-error", f"message spans several lines: {msg[:300]}")
        if res.code == 1 and "unexpected error" in res.text:
            return "crash", first_line(res.text)
        return "crash", f"exit code {res.code}: {first_line(res.text)}"
    if res.exc is None:
        return _success(case, env, res)
    if isinstance(res.exc, WeaklocError):
        msg = str(res.exc)
        missing = [m for m in matches if not _names(msg, m)]
        if missing:
            return "vague-error", f"does not name {missing}: {type(res.exc).__name__}: {msg[:300]}"
        if "\n" in msg.strip():
            return "vague-error", f"message spans several lines: {msg[:300]}"
        return "error", f"{type(res.exc).__name__}: {msg[:300]}"
    return "crash", f"{type(res.exc).__name__}: {str(res.exc).splitlines()[0] if str(res.exc).strip() else ''}"[:400]


# ----------------------------------------------------------------------------------------------
# running a case (inside a worker)


class _ReachedTraining(BaseException):
    """Raised by the ``Trainer.fit`` stub: every argument check has passed and training would start."""


try:
    import lightning.pytorch as _pl

    _REAL_FIT = _pl.Trainer.fit
except ImportError:  # pragma: no cover
    _pl = _REAL_FIT = None


def _set_training(captured: dict, stub: bool) -> None:
    """``Trainer.fit`` as it is (``stub=False``) or a stub recording what it was given."""
    if _pl is None:
        return

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, *args, **kwargs):
        data = kwargs.get("datamodule")  # fine_tune's SplitValidation holds the two loaders
        if data is not None:
            train_dataloaders, val_dataloaders = data.train_loader, data.val_loader
        captured.update(trainer=self, module=model, train=train_dataloaders, val=val_dataloaders,
                        ckpt_path=kwargs.get("ckpt_path"))
        raise _ReachedTraining()

    _pl.Trainer.fit = fit if stub else _REAL_FIT


def _cli_warnings() -> None:
    """Warnings as the command line shows them (pytest records them instead)."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def execute(case: Case, env: Env, out_file: Path) -> dict:
    """Run ``case`` in this process (a worker), its output going to ``out_file``, and classify it."""
    captured: dict = {}
    _set_training(captured, stub=not case.train)
    _cli_warnings()
    res = Result()
    t0 = time.perf_counter()
    try:
        if isinstance(case.run, Proc):
            return _execute_process(case, env, t0)
        if isinstance(case.run, Cli):
            from weakloc.cli import main

            try:
                main([_fmt(a, env) for a in case.run.argv])
                res.code = 0
            except SystemExit as e:
                res.code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except _ReachedTraining:
                pass
            except BaseException as e:  # noqa: BLE001 - main() must not let anything escape
                res.exc = e
                traceback.print_exc()
        else:
            try:
                res.value = case.run.fn(env)
            except _ReachedTraining:
                pass
            except BaseException as e:  # noqa: BLE001
                res.exc = e
    finally:
        _set_training({}, stub=False)
    seconds = time.perf_counter() - t0
    if captured:
        res.reached_training = captured
        res.value = captured
    sys.stdout.flush()
    sys.stderr.flush()
    res.text = out_file.read_text(encoding="utf-8", errors="backslashreplace")
    observed, detail = judge(case, env, res)
    return {"observed": observed, "detail": detail, "output": res.text[-3000:], "seconds": seconds}


def _execute_process(case: Case, env: Env, t0: float) -> dict:
    argv = [_fmt(a, env) for a in case.run.argv]
    environ = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    try:
        p = subprocess.run([sys.executable, "-m", "weakloc.cli", *argv], cwd=env.root, capture_output=True,
                           timeout=max(5.0, case.timeout - 5), env=environ, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="backslashreplace") + (e.stderr or b"").decode(errors="backslashreplace")
        return {"observed": "hang", "detail": f"no result after {case.timeout:.0f} s", "output": text[-3000:],
                "seconds": time.perf_counter() - t0}
    text = p.stdout.decode(errors="backslashreplace") + p.stderr.decode(errors="backslashreplace")
    seconds = time.perf_counter() - t0
    if p.returncode < 0:
        return {"observed": "crash", "detail": f"killed by signal {signal.Signals(-p.returncode).name}: {first_line(text)}",
                "output": text[-3000:], "seconds": seconds}
    observed, detail = judge(case, env, Result(code=p.returncode, text=text))
    return {"observed": observed, "detail": detail, "output": text[-3000:], "seconds": seconds}


def _redirected(case: Case, env: Env, out_file: Path) -> dict:
    """:func:`execute` with fds 1 and 2 (and ``sys.stdout`` / ``sys.stderr``) going to ``out_file``,
    in the case's folder."""
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    faulthandler.enable(file=sys.stderr)  # a segfault's Python stack goes to the case's output
    os.chdir(env.root)
    try:
        return execute(case, env, out_file)
    except BaseException as e:  # noqa: BLE001 - a broken check or builder is the harness's fault
        return {"observed": "harness", "detail": f"{type(e).__name__}: {e}", "output": traceback.format_exc()[-3000:]}
    finally:
        os.chdir("/")


def _memory_limit() -> None:
    try:
        status = Path("/proc/self/status").read_text()
        vm = int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = vm + MEMORY_HEADROOM
        if hard == resource.RLIM_INFINITY or limit < hard:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------
# workers: forked once from the warmed-up test process, they run one case at a time


def _worker_main(rfd: int, wfd: int, assets: Assets, cases: dict[str, Case]) -> None:
    """A worker's loop: read a case (JSON line), run it, write the verdict (JSON line). Never returns."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and ends its workers
        sys.stdin = open(os.devnull)
        os.environ.pop("WEAKLOC_DEBUG", None)
        os.environ["COLUMNS"] = "200"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the same on every machine: no GPU in the corpus
        _memory_limit()
        import torch

        torch.set_num_threads(1)  # one core per worker; the parent's thread pool does not survive fork
        fin = os.fdopen(rfd, "r", encoding="ascii")
        fout = os.fdopen(wfd, "w", encoding="ascii")
        for line in fin:
            msg = json.loads(line)
            case = cases[msg["id"]]
            env = Env(Path(msg["root"]), assets)
            env.vars, env.info = msg["vars"], msg["info"]
            payload = _redirected(case, env, Path(msg["output"]))
            fout.write(json.dumps(payload, default=str) + "\n")
            fout.flush()
    except BaseException:  # noqa: BLE001
        code = 70
    finally:
        os._exit(code)


@dataclass
class _Flight:
    id: str
    env: Env
    before: dict
    deadline: float
    output: Path
    t0: float


class _Worker:
    def __init__(self, assets: Assets, cases: dict[str, Case], close_fds: list[int]):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            for fd in (to_w, from_r, *close_fds):
                try:
                    os.close(fd)
                except OSError:
                    pass
            _worker_main(to_r, from_w, assets, cases)
        os.close(to_r)
        os.close(from_w)
        self.pid, self.send_fd, self.recv_fd = pid, to_w, from_r
        self.buffer = b""
        self.flight: _Flight | None = None

    def send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode("ascii")
        view = memoryview(data)
        while view:
            view = view[os.write(self.send_fd, view):]

    def read_line(self) -> bytes | None:
        """A complete line if one has arrived, b"" at end of file, None if more is to come."""
        chunk = os.read(self.recv_fd, 1 << 16)
        if not chunk:
            return b""
        self.buffer += chunk
        if b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            return line
        return None

    def kill(self) -> int:
        """End the worker; its wait status."""
        for fd in (self.send_fd, self.recv_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(self.pid, 0)
        return status


class Runner:
    """Runs cases on ``workers`` forked workers, ahead of the tests that ask for them (in ``order``).

    The parent builds each case in its own folder, snapshots it, sends it to an idle worker and,
    when the verdict comes back (or the worker dies, or the time runs out), compares the folder
    again. A worker that died or hung is replaced; the case it ran is a crash or a hang.
    """

    def __init__(self, assets: Assets, cases: list[Case], order: list[str], make_root: Callable[[str], Path],
                 outputs: Path, workers: int = 2):
        self.assets = assets
        self.cases = {c.id: c for c in cases}
        self.pending = list(order)
        self.make_root = make_root
        self.outputs = outputs
        self.n_workers = workers
        self.workers: list[_Worker] = []
        self.results: dict[str, Verdict] = {}

    # -- public

    def result(self, case: Case) -> Verdict:
        if case.id not in self.results and case.id in self.pending:
            self.pending.remove(case.id)
            self.pending.insert(0, case.id)
        elif case.id not in self.results and not any(w.flight and w.flight.id == case.id for w in self.workers):
            self.pending.insert(0, case.id)
        if self.n_workers <= 0:
            return self._run_here(case)
        while case.id not in self.results:
            self._fill()
            self._wait()
        return self.results.pop(case.id)

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.workers = []

    # -- internals

    def _fill(self) -> None:
        while len(self.workers) < self.n_workers:
            self.workers.append(self._spawn())
        for w in self.workers:
            while w.flight is None and self.pending:
                cid = self.pending.pop(0)
                case = self.cases[cid]
                if case.requires is not None and case.requires():
                    continue  # the test skips it itself
                self._dispatch(w, case)

    def _spawn(self) -> _Worker:
        others = [fd for w in self.workers for fd in (w.send_fd, w.recv_fd)]
        return _Worker(self.assets, self.cases, others)

    def _prepare(self, case: Case) -> tuple[Env, dict, Path] | Verdict:
        root = self.make_root(case.id)
        env = Env(root, self.assets)
        try:
            case.build(env)
        except Exception as e:  # noqa: BLE001
            return Verdict("harness", f"the builder failed: {type(e).__name__}: {e}", traceback.format_exc()[-3000:])
        output = self.outputs / (re.sub(r"[^A-Za-z0-9._-]", "_", case.id)[:120] + ".out")
        return env, snapshot(root), output

    def _dispatch(self, w: _Worker, case: Case) -> None:
        prep = self._prepare(case)
        if isinstance(prep, Verdict):
            self.results[case.id] = prep
            return
        env, before, output = prep
        w.flight = _Flight(case.id, env, before, time.monotonic() + case.timeout, output, time.monotonic())
        w.send({"id": case.id, "root": str(env.root), "vars": env.vars, "info": _jsonable(env.info), "output": str(output)})

    def _wait(self) -> None:
        busy = [w for w in self.workers if w.flight is not None]
        if not busy:
            return
        timeout = max(0.0, min(w.flight.deadline for w in busy) - time.monotonic())
        ready, _, _ = select.select([w.recv_fd for w in busy], [], [], min(timeout, 5.0))
        now = time.monotonic()
        for w in busy:
            if w.recv_fd in ready:
                line = w.read_line()
                if line is None:
                    continue
                if line == b"":
                    status = w.kill()
                    self._finish(w, self._died(w.flight, status))
                    self.workers.remove(w)
                    continue
                payload = json.loads(line)
                self._finish(w, Verdict(payload["observed"], payload["detail"], payload.get("output", ""),
                                        payload.get("seconds", now - w.flight.t0)))
            elif now >= w.flight.deadline:
                w.kill()
                text = _read(w.flight.output)
                self._finish(w, Verdict("hang", f"no result after {self.cases[w.flight.id].timeout:.0f} s: {first_line(text)}",
                                        text[-3000:], now - w.flight.t0))
                self.workers.remove(w)

    def _died(self, flight: _Flight, status: int) -> Verdict:
        text = _read(flight.output)
        if os.WIFSIGNALED(status):
            what = f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            what = f"the worker exited with status {os.WEXITSTATUS(status)}"
        return Verdict("crash", f"{what}: {first_line(text)}", text[-3000:], time.monotonic() - flight.t0)

    def _finish(self, w: _Worker, verdict: Verdict) -> None:
        flight, w.flight = w.flight, None
        self.results[flight.id] = self._check_writes(self.cases[flight.id], flight.env, flight.before, verdict)

    def _check_writes(self, case: Case, env: Env, before: dict, verdict: Verdict) -> Verdict:
        stray = outside_writes(env.root, before, snapshot(env.root), [Path(_fmt(w, env)) for w in case.writes])
        if stray and verdict.observed not in ("crash", "hang"):
            allowed = [_fmt(w, env) for w in case.writes]
            return Verdict("outside", f"wrote outside {allowed}: {stray[:5]}", verdict.output, verdict.seconds)
        return verdict

    def _run_here(self, case: Case) -> Verdict:
        """No workers (``WEAKLOC_BADINPUT_WORKERS=0``): in this process, for debugging; no isolation."""
        self.pending.remove(case.id)
        prep = self._prepare(case)
        if isinstance(prep, Verdict):
            return prep
        env, before, output = prep
        old = sys.stdout, sys.stderr, os.dup(1), os.dup(2)
        try:
            with warnings.catch_warnings():
                payload = _redirected(case, env, output)
        finally:
            sys.stdout, sys.stderr = old[0], old[1]
            os.dup2(old[2], 1)
            os.dup2(old[3], 2)
            os.close(old[2])
            os.close(old[3])
        verdict = Verdict(payload["observed"], payload["detail"], payload.get("output", ""), payload.get("seconds", 0.0))
        return self._check_writes(case, env, before, verdict)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="backslashreplace")
    except OSError:
        return ""


def _jsonable(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


# ----------------------------------------------------------------------------------------------
# writes outside the allowed folders


def snapshot(root: Path) -> dict[str, tuple]:
    """``relative path -> (is_dir, size, mtime_ns)`` of everything under ``root`` (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            is_dir = os.path.isdir(p) and not os.path.islink(p)
            out[os.path.relpath(p, root)] = (is_dir, 0 if is_dir else st.st_size, 0 if is_dir else st.st_mtime_ns)
    return out


def outside_writes(root: Path, before: dict, after: dict, allowed: list[Path]) -> list[str]:
    """Paths created, changed or removed under ``root`` that are neither inside an allowed folder nor
    one of its parents (making ``-o a/b/c`` creates ``a`` and ``a/b``)."""
    roots = [os.path.normpath(os.path.abspath(a)) for a in allowed]

    def ok(rel: str) -> bool:
        p = os.path.normpath(os.path.join(root, rel))
        return any(p == a or p.startswith(a + os.sep) or a.startswith(p + os.sep) for a in roots)

    changed = [r for r in after if r not in before or (before[r] != after[r] and not after[r][0])]
    removed = [r for r in before if r not in after]
    return sorted(r for r in changed + removed if not ok(r))
