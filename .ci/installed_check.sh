#!/usr/bin/env bash
# The installed path, as a user gets it: a fresh venv, `pip install .` (a wheel, not editable) with the tested
# constraints, then from a directory outside the checkout: every subcommand's --help (no traceback), a
# bench-batch --small run into --out, and simulate paper into $MULTIMOE_RESULTS. Fails on the first problem.
set -euo pipefail
cd "$(dirname "$0")/.."
src="$(pwd)"
work="$(mktemp -d /tmp/multimoe_installed.XXXXXX)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install -q -c constraints.txt torch==2.13.0 setuptools wheel ninja
t0=$SECONDS
pip install -q -c constraints.txt --no-build-isolation "$src"
echo "installed_check: pip install . in $((SECONDS - t0)) s"
cd "$work"
python - <<'PY'
import subprocess, sys
from multimoe_rt.cli import build_parser, PASS_THROUGH
import argparse

def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from commands(sub, prefix + (name,))

cmds = sorted(set(commands(build_parser())) | {(c,) for c in PASS_THROUGH})
bad = []
for cmd in cmds:
    r = subprocess.run(["multimoe-rt", *cmd, "--help"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or "Traceback" in r.stdout + r.stderr or "usage" not in r.stdout.lower():
        bad.append(f"multimoe-rt {' '.join(cmd)} --help: rc={r.returncode}: {(r.stderr or r.stdout)[-400:]}")
print(f"installed_check: {len(cmds)} subcommands' --help: {len(cmds) - len(bad)} ok")
for b in bad:
    print("installed_check: FAIL:", b)
sys.exit(1 if bad else 0)
PY
python -c "import multimoe_rt, sys; assert '$src' not in multimoe_rt.__file__, multimoe_rt.__file__; print('installed_check: multimoe_rt from', multimoe_rt.__file__)"
multimoe-rt bench-batch --small --quiet --out "$work/bench"
test -s "$work/bench/batching-small.json"
MULTIMOE_RESULTS="$work/results" multimoe-rt simulate paper --quiet
test -s "$work/results/simulate_paper.json"
echo "installed_check: ok"
