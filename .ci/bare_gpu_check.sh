#!/usr/bin/env bash
# The bare GPU machine, emulated on CPU: a fresh copy of the checkout and a clean venv holding the GPU image's
# packages (triton 3.6 with numpy >= 2.4: the interpreter shim must carry it; no fastapi, uvicorn or openai),
# nothing of the project installed, and no package index for the check (it installs with --no-index). Then `bash bench/gpu_check.sh --dry-run`, which must install the project itself and
# run every step. Fails if the check fails (a failed step, a failed row of ours), if the CPU extension did not
# build, if the JSON lacks a step, or if anything replaced the preinstalled torch or triton.
set -euo pipefail
cd "$(dirname "$0")/.."
src="$(pwd)"
work="$(mktemp -d /tmp/multimoe_bare.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/src" "$work/out"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/src"   # no .venv, no build/, no _C
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
# The GPU image's packages (its torch is 2.11 with CUDA; the CPU 2.13 on local disk stands in), installed here
# from the index; the check itself then installs the project with --no-index, as it must on the image.
"$py" -m pip install -q torch==2.13.0 "triton==${MULTIMOE_BARE_TRITON:-3.6.0}" "transformers==5.17.0" safetensors \
  "numpy>=2.4" pytest hypothesis matplotlib httpx tqdm prometheus-client ninja "setuptools>=70.1"
before="$("$py" -c 'import torch, triton; print(torch.__version__, triton.__version__)')"
echo "bare_gpu_check: clean venv with torch/triton $before; project not installed:"
if (cd "$work" && "$py" -c "import multimoe_rt" 2>/dev/null); then echo "bare_gpu_check: multimoe_rt is importable before the check"; exit 1; fi
status=0
( cd "$work/src" && PATH="$work/venv/bin:$PATH" PYTHON="$py" OUT="$work/out" OMP_NUM_THREADS=1 GPU_CHECK_LIMIT_SCALE="${GPU_CHECK_LIMIT_SCALE:-2}" \
    timeout 900 bash bench/gpu_check.sh --dry-run ) || status=$?
after="$("$py" -c 'import torch, triton; print(torch.__version__, triton.__version__)')"
"$py" - "$work/out/gpu_check-dryrun.json" "$before" "$after" <<'PY' || status=1
import json, sys
path, before, after = sys.argv[1:4]
r = json.load(open(path))
steps = r["steps"]
want = ["1_install", "2_env", "3_tests", "4_kernels", "5_switch", "6_batched_forward", "7_delta_codecs", "8_synthetic"]
problems = [f"step {s} missing from the JSON" for s in want if s not in steps]
problems += [f"step {s} failed: {d['error'][:300]}" for s, d in steps.items() if "error" in d]
inst = steps.get("1_install", {})
if inst.get("skipped", {}).get("pip install"):
    problems.append("the dry run did not install the project: " + inst["skipped"]["pip install"])
if not inst.get("offline"):
    problems.append("the install step did not run offline (--no-index)")
if not (inst.get("import") or {}).get("ext"):
    problems.append(f"CPU extension not built: {(inst.get('import') or {}).get('reason')}")
rows = steps.get("4_kernels", {}).get("rows", [])
ours = [x for x in rows if x["impl"].startswith("ours")]
if not ours or any("median_ms" not in x for x in ours):
    problems.append("rows of ours not all timed: " + "; ".join(f"{x['impl']} M={x['M']}: {x.get('error') or x.get('skipped')}"
                                                            for x in ours if "median_ms" not in x)[:600])
if before != after:
    problems.append(f"torch/triton changed: {before} -> {after}")
limits = r.get("limits_s", {})
if sum(limits.values()) > 360:
    problems.append(f"step limits add up to {sum(limits.values())} s > 360 s")
over = [f"{s} {d['wall_s']} s > {d['limit_s']} s" for s, d in steps.items()
        if d.get("limit_s") and d.get("wall_s", 0) > d["limit_s"] + 1]
problems += [f"step over its limit: {o}" for o in over]
print(f"bare_gpu_check: {len(steps)} steps, {len(ours)} rows of ours, limits {limits}, "
      f"install {inst.get('wall_s')} s, total {r.get('total_s')} s")
for p in problems:
    print("bare_gpu_check: FAIL:", p)
sys.exit(1 if problems else 0)
PY
[ "$status" = 0 ] && echo "bare_gpu_check: ok" || echo "bare_gpu_check: FAILED (status $status)"
exit "$status"
