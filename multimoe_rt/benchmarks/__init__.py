"""The harnesses behind `multimoe-rt bench-batch`, `simulate`, `bench-qos`, `eval`, `bench-reliability` and
`demo`, and the GPU check's steps. They import the runtime like any user; the top-level `bench/` folder of a
checkout holds only thin scripts that call them.

Every harness writes its results (JSON, PNG) to one folder: ``--out DIR``, else ``$MULTIMOE_RESULTS``, else
``~/.cache/multimoe_rt/results``. A checkout's recorded results in ``bench/results/`` change only when asked
(``--out bench/results``).
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS_ENV = "MULTIMOE_RESULTS"
RESULTS_HELP = f"results folder (default ${RESULTS_ENV}, else ~/.cache/multimoe_rt/results)"


def results_dir(out=None, create: bool = True) -> Path:
    """The folder results go to: ``out``, else $MULTIMOE_RESULTS, else ~/.cache/multimoe_rt/results."""
    env = os.environ.get(RESULTS_ENV)
    path = Path(out) if out else Path(env) if env else Path.home() / ".cache" / "multimoe_rt" / "results"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
