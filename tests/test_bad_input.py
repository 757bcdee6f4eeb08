"""The bad-input corpus (issue 16): hundreds of broken, hostile or out-of-range inputs, each run
through the commands that take it, each asserting the outcome the issue asks for -- a clear
one-line error naming the input, a skip that is reported, or a correct result -- and that no
traceback reaches the user and nothing is written outside the output folder.

The cases live in ``tests/badinput`` (built at test time, no binary fixtures). They run on
workers forked from this process, ahead of the tests that report them (see ``badinput.harness``);
``WEAKLOC_BADINPUT_WORKERS`` sets how many (default: 2, or 1 on one core; 0 runs them here, for
debugging). A summary per kind and outcome is printed at the end; ``WEAKLOC_BADINPUT_FAILURES=FILE``
(or ``python -m tests.badinput.report --failures FILE``) also writes the failing cases grouped by cause.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from badinput.corpus import all_cases, build_assets, warm_up  # noqa: E402
from badinput.harness import Case, Runner  # noqa: E402

CASES: list[Case] = all_cases()
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def runner(request, tmp_path_factory):
    assets = build_assets(tmp_path_factory.mktemp("badinput_assets"))
    warm_up(assets)
    order = [item.callspec.params["case"].id for item in request.session.items
             if getattr(item, "callspec", None) is not None and isinstance(item.callspec.params.get("case"), Case)]
    cases_root = tmp_path_factory.mktemp("badinput_cases")
    index = {c.id: n for n, c in enumerate(CASES)}

    def make_root(cid: str) -> Path:
        root = cases_root / f"{index[cid]:04d}_{re.sub(r'[^A-Za-z0-9._-]', '_', cid)[:60]}"
        root.mkdir()
        return root

    workers = int(os.environ.get("WEAKLOC_BADINPUT_WORKERS", min(2, os.cpu_count() or 1)))
    r = Runner(assets, CASES, order, make_root, tmp_path_factory.mktemp("badinput_outputs"), workers=workers)
    yield r
    r.close()


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not RESULTS:
        return
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        for ln in summarize(RESULTS):
            reporter.write_line(ln)
    target = os.environ.get("WEAKLOC_BADINPUT_RESULTS")
    if target:
        Path(target).write_text(json.dumps(RESULTS, indent=1, ensure_ascii=True))
    failures_file = os.environ.get("WEAKLOC_BADINPUT_FAILURES")
    if failures_file:
        from badinput.report import failures, summary

        Path(failures_file).write_text("\n".join(summary(RESULTS) + failures(RESULTS)) + "\n")


def summarize(results: dict[str, dict]) -> list[str]:
    """Counts per kind and observed outcome, and how many cases behave as the issue asks."""
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for r in results.values():
        by_kind[r["kind"]][r["observed"]] += 1
    outcomes = sorted({o for c in by_kind.values() for o in c})
    lines = [f"bad-input corpus: {len(results)} case(s) run, {sum(r['passed'] for r in results.values())} as the issue asks"]
    lines.append("kind".ljust(8) + "".join(o.rjust(12) for o in outcomes) + "total".rjust(8))
    for kind in sorted(by_kind):
        c = by_kind[kind]
        lines.append(kind.ljust(8) + "".join(str(c.get(o, 0)).rjust(12) for o in outcomes) + str(sum(c.values())).rjust(8))
    return lines


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, runner):
    if case.requires is not None and (reason := case.requires()):
        pytest.skip(reason)
    verdict = runner.result(case)
    passed = verdict.passed(case)
    RESULTS[case.id] = {"kind": case.kind, "expect": list(case.expect), "observed": verdict.observed,
                        "cause": None if passed else verdict.cause(case), "detail": verdict.detail,
                        "command": case.run.describe(), "passed": passed, "seconds": round(verdict.seconds, 2),
                        "note": case.note}
    assert passed, (f"{case.id}: expected {'/'.join(case.expect)}, got {verdict.observed}: {verdict.detail}\n"
                    f"command: {case.run.describe()}\n--- output (tail) ---\n{verdict.output[-1500:]}")


# --- the harness itself can fail: each outcome class is recognised -----------------------------------


def _harness_cases():
    import time as _time

    from badinput.harness import Api, Assets, Cli, Env

    def seg(env: Env):
        import signal as _signal

        os.kill(os.getpid(), _signal.SIGSEGV)

    def raise_value(env: Env):
        raise ValueError("not a WeaklocError")

    def raise_two_lines(env: Env):
        from weakloc.errors import OptionError

        raise OptionError("threshold: first line\nsecond line")

    def sleep(env: Env):
        _time.sleep(60)

    def write_outside(env: Env):
        (env.root / "stray.txt").write_text("outside the output folder")
        return 1

    def nothing(env: Env):
        return None

    def warn(env: Env):
        print("warning: train --old is deprecated; use --new (docs/changelog.md)")

    ok = {"ok": lambda env, res: None}
    return [
        (Case("self/segfault", "api", lambda env: None, Api(seg), "ok", checks=ok), "crash"),
        (Case("self/after_segfault", "api", lambda env: None, Api(nothing), "ok", checks=ok), "ok"),
        (Case("self/value_error", "api", lambda env: None, Api(raise_value), "error", match=("x",)), "crash"),
        (Case("self/two_lines", "api", lambda env: None, Api(raise_two_lines), "error", match=("threshold",)), "vague-error"),
        (Case("self/sleep", "api", lambda env: None, Api(sleep), "ok", checks=ok, timeout=3), "hang"),
        (Case("self/outside", "api", lambda env: None, Api(write_outside), "ok", checks=ok), "outside"),
        (Case("self/silent", "api", lambda env: None, Api(nothing), "error", match=("x",)), "silent"),
        (Case("self/usage", "option", lambda env: None, Cli(["synth", "{out}", "--n", "abc"]), "error", match=("--n",)), "error"),
        (Case("self/warned", "api", lambda env: None, Api(warn), "ok", checks=ok, warns=("--old", "--new")), "ok"),
        (Case("self/unwarned", "api", lambda env: None, Api(nothing), "ok", checks=ok, warns=("--old", "--new")), "unwarned"),
        (Case("self/wrong_warning", "api", lambda env: None, Api(warn), "ok", checks=ok, warns=("--old", "--other")), "unwarned"),
    ], Assets


def test_harness_recognises_each_outcome(tmp_path):
    pairs, Assets = _harness_cases()
    cases = [c for c, _ in pairs]
    counter = iter(range(1000))

    def make_root(cid: str) -> Path:
        root = tmp_path / f"case{next(counter)}"
        root.mkdir()
        return root

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    runner = Runner(Assets(tmp_path, tmp_path, tmp_path), cases, [c.id for c in cases], make_root, outputs, workers=1)
    try:
        got = {c.id: runner.result(c).observed for c in cases}
    finally:
        runner.close()
    assert got == {c.id: want for c, want in pairs}


def test_cli_turns_an_unexpected_exception_into_one_line(tmp_path, monkeypatch, capsys):
    import weakloc.data.synthetic as synthetic
    from weakloc.cli import main

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(synthetic, "write_synthetic", boom)
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", str(tmp_path / "out"), "--n", "4", "--size", "32"])
    text = capsys.readouterr()
    lines = [ln for ln in (text.out + text.err).splitlines() if ln.strip() and "━" not in ln]
    assert exit_info.value.code == 1
    assert len(lines) == 1 and "unexpected error" in lines[0] and "RuntimeError: boom" in lines[0] and "--debug" in lines[0], lines
    assert "Traceback" not in text.out + text.err
    with pytest.raises(RuntimeError, match="boom"):  # --debug: the exception itself, for its traceback
        main(["synth", str(tmp_path / "out"), "--n", "4", "--size", "32", "--debug"])
