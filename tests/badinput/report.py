"""Run the bad-input corpus and summarise it: counts per kind and observed outcome, and the failing
cases grouped by cause (crash, hang, silent, wrong, vague-error, refused, outside) with the first
line of what happened, for routing fixes.

    python -m tests.badinput.report                       # run the corpus, print the summary
    python -m tests.badinput.report --failures FILE       # also write the failing cases to FILE
    python -m tests.badinput.report --results R.json      # summarise an earlier run's results
    python -m tests.badinput.report -- -k coco            # extra pytest arguments after --
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CAUSES = ("crash", "hang", "silent", "wrong", "outside", "vague-error", "refused", "harness")


def run_corpus(extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        env = {**os.environ, "WEAKLOC_BADINPUT_RESULTS": str(out)}
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_bad_input.py"), "-q", "-p", "no:cacheprovider",
               "--tb=no", "-rN", *extra]
        subprocess.run(cmd, cwd=ROOT, env=env)
        return json.loads(out.read_text()) if out.is_file() else {}


def summary(results: dict) -> list[str]:
    kinds = sorted({r["kind"] for r in results.values()})
    observed = sorted({r["observed"] for r in results.values()})
    expected = Counter(o for r in results.values() for o in r["expect"][:1])
    lines = [f"{len(results)} case(s); {sum(r['passed'] for r in results.values())} behave as the issue asks; "
             f"intended outcomes (first listed): " + ", ".join(f"{k} {v}" for k, v in sorted(expected.items())), ""]
    lines.append("observed".ljust(10) + "".join(k.rjust(9) for k in kinds) + "total".rjust(8))
    for o in observed:
        row = [sum(1 for r in results.values() if r["kind"] == k and r["observed"] == o) for k in kinds]
        lines.append(o.ljust(10) + "".join(str(n).rjust(9) for n in row) + str(sum(row)).rjust(8))
    row = [sum(1 for r in results.values() if r["kind"] == k) for k in kinds]
    lines.append("total".ljust(10) + "".join(str(n).rjust(9) for n in row) + str(sum(row)).rjust(8))
    causes = Counter(r["cause"] for r in results.values() if not r["passed"])
    lines += ["", "failing, by cause: " + ", ".join(f"{c} {causes[c]}" for c in CAUSES if causes.get(c)) if causes else "no failures"]
    return lines


def failures(results: dict) -> list[str]:
    by_cause: dict[str, list] = defaultdict(list)
    for cid, r in results.items():
        if not r["passed"]:
            by_cause[r["cause"]].append((cid, r))
    lines = []
    for cause in CAUSES + tuple(sorted(set(by_cause) - set(CAUSES))):
        items = by_cause.get(cause)
        if not items:
            continue
        lines += ["", f"== {cause} ({len(items)}) =="]
        for cid, r in sorted(items):
            detail = " ".join(r["detail"].split())[:260]
            lines.append(f"{cid}  [expect {'/'.join(r['expect'])}]  {detail}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    extra = args[args.index("--") + 1:] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, help="summarise this results JSON instead of running the corpus")
    p.add_argument("--failures", type=Path, help="write the failing cases, grouped by cause, to this file")
    a = p.parse_args(args)
    results = json.loads(a.results.read_text()) if a.results else run_corpus(extra)
    if not results:
        print("no results", file=sys.stderr)
        return 1
    text = summary(results)
    print("\n".join(text))
    if a.failures:
        a.failures.write_text("\n".join(text + failures(results)) + "\n")
        print(f"failing cases written to {a.failures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
