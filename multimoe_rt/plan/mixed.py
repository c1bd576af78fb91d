"""The mixed plan: for each (variant, layer, expert) choose between sharing the base's copy, the base plus a
compressed delta (which codec, what size) and an own dense copy, under a byte budget, by measured cost.

``Costs`` is what the measurement gives (``multimoe_rt.criterion.measure_costs``): for every non-anchor,
non-duplicate entry and every option, the change of the variant's mean calibration loss (nats per token)
when that one expert is replaced by the option's approximation, everything else the variant's own. An own
dense copy costs 0 by definition. Costs are assumed additive across entries (first order); the plan records
the sum it predicts per variant, and the quality bench measures the real thing.

``choose`` solves the multiple-choice knapsack "minimise the summed predicted loss subject to the bytes"
greedily on each entry's lower convex hull of (bytes, cost): start every entry at its cheapest option
(sharing: 0 bytes), then repeatedly take the upgrade with the largest loss reduction per byte that still
fits. On convex hulls this greedy is optimal up to the last upgrade that does not fit.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field

from ..delta import DeltaError, canonical_spec, spec_nbytes
from .common import PlanError

SHARE, DENSE = "share", "dense"
# Options measured by default: the codecs and sizes the plan may choose between (bytes per expert, fp32 / bf16,
# of the mixtral-tiny zoo's [512,128]+[128,256] expert: sign1 3.5% / 6.6%, lowrank8 8.3%, int4 15% / 28%).
DEFAULT_CODECS = ("sign1", "lowrank4", "lowrank8", "lowrank16", "lowrank32", "lowrank8+sign1", "int4")


@dataclass
class Costs:
    """Measured cost of each option per entry. ``loss[v][l][e]`` maps option -> calibration-loss change
    (None for the anchor's and duplicate entries); ``base_nll[v]`` is the variant's own loss."""
    anchor: int
    options: list
    loss: list
    base_nll: list
    tokens: list
    calibration: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Costs":
        try:
            return cls(**d)
        except TypeError as exc:
            raise PlanError(f"not a costs document ({exc})") from exc

    def cost(self, v: int, l: int, e: int, option: str) -> float:
        if option == DENSE:
            return 0.0
        cell = self.loss[v][l][e]
        if cell is None or option not in cell:
            raise PlanError(f"costs have no measurement of option {option!r} for variant {v} layer {l} expert {e} "
                            f"(measured: {sorted(cell) if cell else 'none'})")
        return float(cell[option])

    def share_values(self) -> list:
        """[V][L][E] the measured cost of sharing (0 where not measured): the ``loss`` metric's ranking."""
        return [[[0.0 if c is None else float(c[SHARE]) for c in row] for row in var] for var in self.loss]


def canonical_option(option: str) -> str:
    if option in (SHARE, DENSE):
        return option
    try:
        return canonical_spec(option)
    except DeltaError as exc:
        raise PlanError(f"plan option {option!r}: {exc}") from exc


def option_nbytes(option: str, n1: int, hidden: int, intermediate: int, itemsize: int, slot_nbytes: int) -> int:
    if option == SHARE:
        return 0
    if option == DENSE:
        return slot_nbytes
    return spec_nbytes(option, n1, hidden, intermediate, itemsize)


def _hull(points: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """Lower-left convex hull of (bytes, cost, option) from the cheapest-bytes point: each next point is the
    one with the largest cost reduction per byte among those that reduce the cost."""
    points = sorted(points, key=lambda p: (p[0], p[1]))
    hull = [points[0]]
    while True:
        b0, c0, _ = hull[-1]
        best = None
        for p in points:
            if p[0] > b0 and p[1] < c0:
                eff = (c0 - p[1]) / (p[0] - b0)
                if best is None or eff > best[0] + 1e-15 or (abs(eff - best[0]) <= 1e-15 and p[0] < best[1][0]):
                    best = (eff, p)
        if best is None:
            return hull
        hull.append(best[1])


def choose(unit_options: list[list[tuple[int, float, str]]], budget: int) -> list[int]:
    """Per unit, the index (into its option list) chosen: minimise the summed cost within ``budget`` bytes.

    ``unit_options[u]`` lists (bytes, cost, option) of unit u; the option with the fewest bytes (ties: lowest
    cost) is every unit's start, and must fit: the caller budgets it. With room for every unit's own dense copy
    the answer is exact (every unit dense), whatever the measured costs say: a cost measured at or below zero
    is calibration noise, not a reason to approximate a weight that fits."""
    dense = [next((j for j, p in enumerate(opts) if p[2] == DENSE), None) for opts in unit_options]
    if None not in dense and sum(opts[j][0] for opts, j in zip(unit_options, dense)) <= budget:
        return dense
    hulls = [_hull(opts) for opts in unit_options]
    pos = [0] * len(hulls)
    spent = sum(h[0][0] for h in hulls)
    if spent > budget:
        raise PlanError(f"the cheapest option of every entry already needs {spent} B, over the {budget} B left")
    heap = []

    def push(u):
        h, i = hulls[u], pos[u]
        if i + 1 < len(h):
            (b0, c0, _), (b1, c1, _) = h[i], h[i + 1]
            heapq.heappush(heap, (-(c0 - c1) / (b1 - b0), b1 - b0, u))

    for u in range(len(hulls)):
        push(u)
    while heap:
        _, extra, u = heapq.heappop(heap)
        if spent + extra <= budget:
            spent += extra
            pos[u] += 1
            push(u)
            continue
        # the next hull step does not fit: the best smaller step of this unit that does, if any
        h, i = hulls[u], pos[u]
        b0, c0, _ = h[i]
        fits = [p for p in unit_options[u] if b0 < p[0] <= b0 + budget - spent and p[1] < c0]
        if fits:
            p = max(fits, key=lambda p: ((c0 - p[1]) / (p[0] - b0), -p[0]))
            spent += p[0] - b0
            hulls[u] = h[:i + 1] + [p]
            pos[u] += 1
    chosen = []
    for u, opts in enumerate(unit_options):
        target = hulls[u][pos[u]]
        chosen.append(next(j for j, p in enumerate(opts) if p == target))
    return chosen
