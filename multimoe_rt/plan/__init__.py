"""Similarity-based expert consolidation (the paper's Algorithm 1, "Initial Expert Loader").

Fine-tuned variants keep most experts close to the base. We measure how far each variant's
expert is from the anchor's (same layer, same expert index), store one shared copy per
(layer, expert), and then give the most different experts their own copy while the budget
allows. Byte-identical experts (e.g. frozen during fine-tuning) always share, at no cost.

The result is a :class:`Plan`: plain data (JSON, versioned) saying which slab slot serves each
(variant, layer, expert), where each slot's weights come from, and what it costs.
:func:`load_slab` turns a plan into an ``ExpertSlab`` + ``SlotTable``.

Everything here streams one expert at a time: host memory stays at a few experts, never the
size of the variant set. One module per job, imported in this order (each only from those above):

    common       PlanError, byte sizes, slab dtypes, progress bar
    fingerprint  expert hash, checkpoint fingerprints and tensor bytes
    calibration  recorded / Gaussian inputs for the output metric
    distance     Distances: relative L2, cosine, output difference, duplicates
    format       Plan: the JSON document, its checks and summary
    policy       make_plan: share / threshold / budget, offload
    loading      load_slab: plan -> ExpertSlab + SlotTable
    heatmap      the picture
    mutate       plan mutations and the check a loaded mutant must pass (fuzzing; not re-exported here:
                 it needs hypothesis, a test dependency)
"""

from .calibration import calibration_from_text, gaussian_calibration, record_calibration
from .common import PlanError, format_size, parse_size
from .distance import Distances, compute_distances, relative_l2
from .fingerprint import checkpoint_fingerprint, checkpoint_tensor_bytes, expert_hash
from .format import FORMAT_VERSION, Plan
from .heatmap import heatmap
from .loading import load_slab, source_expert
from .policy import METRICS, REPRESENTATIVES, SCOPES, make_plan, non_expert_nbytes

__all__ = [
    "FORMAT_VERSION", "METRICS", "REPRESENTATIVES", "SCOPES", "Distances", "Plan", "PlanError",
    "calibration_from_text", "checkpoint_fingerprint", "checkpoint_tensor_bytes", "compute_distances",
    "expert_hash", "format_size", "gaussian_calibration", "heatmap", "load_slab", "make_plan",
    "non_expert_nbytes", "parse_size", "record_calibration", "relative_l2", "source_expert",
]
