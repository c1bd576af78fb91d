"""The picture of a plan: per variant a layers x experts grid coloured by who serves each expert."""

from __future__ import annotations

import os

from .common import PlanError, format_size
from .format import Plan

_STATUS_CODE = {"anchor": 0, "duplicate": 1, "shared": 2, "own": 3}
_COLOURS = ["#4c72b0", "#8c8c8c", "#55a868", "#dd8452", "#c44e52"]
_LABELS = ["anchor variant", "exact duplicate (merged, free)", "shared (merged)", "own copy",
           "host tier (offloaded)"]


def heatmap(plan: Plan, path: str | os.PathLike) -> None:
    """PNG of the layout: per variant a layers x experts grid coloured by who serves it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise PlanError("heatmap needs matplotlib: pip install 'multimoe_rt[plot]'") from exc
    V, L, E = plan.num_variants, plan.num_layers, plan.num_experts
    # fixed inches for title and legend so they never overlap the grids, whatever L is
    height = 1.4 + 0.8 + 0.3 * L
    fig, axes = plt.subplots(1, V, figsize=(max(6.0, 1.2 + 0.5 * E * V), height), squeeze=False)
    cmap = ListedColormap(_COLOURS)
    for v, ax in enumerate(axes[0]):
        grid = [[4 if plan.slot_location[plan.slots[v][l][e]] == "host"
                 else _STATUS_CODE[plan.status[v][l][e]] for e in range(E)] for l in range(L)]
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(_COLOURS) - 0.5, aspect="auto",
                  interpolation="nearest")
        ax.set_title(f"{plan.variant_names[v]}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
        if v == 0:
            ax.set_ylabel("MoE layer")
    fig.suptitle(f"{plan.metric} / {plan.scope} / {plan.representative}: slab "
                 f"{format_size(plan.expert_bytes)} vs {format_size(plan.separate_expert_bytes)} "
                 f"separate; sharing {100 * plan.sharing_fraction():.0f}%", fontsize=9)
    fig.legend(handles=[Patch(color=c, label=t) for c, t in zip(_COLOURS, _LABELS)],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / height, 1, 1 - 0.4 / height))
    fig.savefig(path, dpi=120)
    plt.close(fig)
