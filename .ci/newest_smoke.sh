#!/usr/bin/env bash
# Drift alarm: the newest resolution of every dependency, WITHOUT constraints.txt, so a release that breaks us
# shows up in the next CI run rather than on a user's machine. A quick smoke only (the extension is skipped to
# keep it short): import next to transformers' hub kernels, one forward against transformers, one engine request.
set -euo pipefail
cd "$(dirname "$0")/.."
src="$(pwd)"
work="$(mktemp -d /tmp/multimoe_newest.XXXXXX)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install -q torch==2.13.0 setuptools wheel ninja   # torch pinned: an open range pulls a multi-GB CUDA build
MULTIMOE_NO_EXT=1 pip install -q --no-build-isolation "$src"
pip list 2>/dev/null | grep -i -E '^(transformers|triton|numpy|safetensors|fastapi|pydantic|kernels) ' | tr -s ' ' | sed 's/^/newest_smoke: /'
cd "$work"
SRC="$src" python - <<'PY'
import os, sys, tempfile
from pathlib import Path

import transformers.integrations.hub_kernels  # noqa: F401  (imports HF's `kernels` where transformers wants it)
import torch
import multimoe_rt
from multimoe_rt.engine import Engine

sys.path.insert(0, str(Path(os.environ["SRC"]) / "tests"))
from tiny_models import reference, rel_err, save_variants

tmp = Path(tempfile.mkdtemp())
dirs = save_variants(tmp, "mixtral", n=2)
mv = multimoe_rt.from_pretrained([str(d) for d in dirs], share=0.0)
ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
ref = reference("mixtral", dirs[1])
with torch.no_grad():
    err = rel_err(mv.forward(mv.names[1], ids), ref(ids).logits)
assert err < 1e-4, f"forward differs from transformers: {err:.3g}"
with Engine.from_pretrained([str(d) for d in dirs], max_seqs=4, max_len=64) as engine:
    got = engine.generate(engine.names[1], ids[0].tolist(), max_new_tokens=5)
want = ref.generate(ids, max_new_tokens=5, do_sample=False)[0, 7:].tolist()
assert got and got == want[:len(got)], f"engine {got} != transformers {want}"  # the engine stops at EOS
print(f"newest_smoke: ok (forward rel err {err:.1e}, engine tokens = transformers tokens)")
PY
