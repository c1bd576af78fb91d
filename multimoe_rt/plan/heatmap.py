"""The picture of a plan: per variant a layers x experts grid coloured by who serves each expert."""

from __future__ import annotations

import os

from ..plotting import pyplot
from .common import PlanError, format_size
from .format import Plan

_STATUS_CODE = {"anchor": 0, "duplicate": 1, "shared": 2, "own": 3}
_COLOURS = ["#4c72b0", "#8c8c8c", "#55a868", "#dd8452", "#c44e52", "#b5cf6b", "#9467bd", "#e7ba52", "#17becf"]
_LABELS = ["anchor variant", "exact duplicate (merged, free)", "shared (merged)", "own copy",
           "host tier (offloaded)", "base + sign1 delta", "base + lowrank delta", "base + int4 delta",
           "base + combined delta"]
_ANNOTATE_MAX = 256  # cells per panel up to which each cell is labelled with its choice and measured cost


def _delta_code(spec: str) -> int:
    kinds = spec.split("+")
    if len(kinds) > 1:
        return 8
    return 5 if spec == "sign1" else 6 if spec.startswith("lowrank") else 7


def _short(choice: str) -> str:
    return (choice.replace("lowrank", "L").replace("sign1", "S").replace("int4", "Q4").replace("dense", "own")
            .replace("share", "sh").replace("duplicate", "dup").replace("anchor", ""))


def heatmap(plan: Plan, path: str | os.PathLike) -> None:
    """PNG of the layout: per variant a layers x experts grid coloured by who serves it."""
    plt = pyplot()
    if plt is None:  # a PlanError, as every failure of the plan package (the quality harness catches it)
        raise PlanError("heatmap needs matplotlib: pip install 'multimoe_rt[plot]'")
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    V, L, E = plan.num_variants, plan.num_layers, plan.num_experts
    # fixed inches for title and legend so they never overlap the grids, whatever L is
    annotate = plan.choice is not None and L * E <= _ANNOTATE_MAX
    title_h = 0.8 if plan.entry_cost is not None else 0.4
    height = 1.4 + 0.4 + title_h + (0.5 if annotate else 0.3) * L
    fig, axes = plt.subplots(1, V, figsize=(max(6.0, 1.2 + (0.7 if annotate else 0.5) * E * V), height),
                             squeeze=False)
    cmap = ListedColormap(_COLOURS)
    S = len(plan.slot_sources)

    def code(v, l, e):
        i = plan.slots[v][l][e]
        if i >= S:
            return _delta_code(plan.deltas[i - S]["spec"])
        return 4 if plan.slot_location[i] == "host" else _STATUS_CODE[plan.status[v][l][e]]

    for v, ax in enumerate(axes[0]):
        grid = [[code(v, l, e) for e in range(E)] for l in range(L)]
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(_COLOURS) - 0.5, aspect="auto",
                  interpolation="nearest")
        if annotate and v != plan.anchor:
            for l in range(L):
                for e in range(E):
                    text = _short(plan.choice[v][l][e])
                    if plan.entry_cost is not None and plan.status[v][l][e] not in ("anchor", "duplicate", "own"):
                        text += f"\n{1000 * plan.entry_cost[v][l][e]:+.2f}"
                    ax.text(e, l, text, ha="center", va="center", fontsize=5)
        ax.set_title(f"{plan.variant_names[v]}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
        if v == 0:
            ax.set_ylabel("MoE layer")
    costs = ("\ncells: choice (sh shared, S sign1, L<r> lowrank, Q4 int4, own) and its measured cost "
             "(1e-3 nats/token)") if plan.entry_cost is not None else ""
    fig.suptitle(f"{plan.metric} / {plan.scope} / {plan.representative}: slab "
                 f"{format_size(plan.expert_bytes)} vs {format_size(plan.separate_expert_bytes)} "
                 f"separate; sharing {100 * plan.sharing_fraction():.0f}%"
                 + (f", deltas {100 * plan.delta_fraction():.0f}%" if plan.deltas else "") + costs, fontsize=9)
    used = {code(v, l, e) for v in range(V) for l in range(L) for e in range(E)} | {0, 1, 2, 3}
    fig.legend(handles=[Patch(color=c, label=t) for i, (c, t) in enumerate(zip(_COLOURS, _LABELS)) if i in used],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / height, 1, 1 - title_h / height))
    fig.savefig(path, dpi=120)
    plt.close(fig)
