"""The quality study's results: aggregation over seeds, the curves and the within-2% summary, prose findings,
the table and the plot (used by ``bench/quality.py``; ``rerender`` redoes them from a saved JSON)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from ..plotting import NO_PLOT, pyplot
from .quality_systems import WITHIN, QualityError


def _aggregate(per_seed: list[dict]) -> dict:
    out = {}
    for v in per_seed[0]:
        out[v] = {}
        for k in per_seed[0][v]:
            rs = [r[v][k] for r in per_seed]
            ppl = [r["ppl"] for r in rs]
            out[v][k] = {"ppl": statistics.fmean(ppl), "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                         "ppl_min": min(ppl), "ppl_max": max(ppl), "nll": statistics.fmean(r["nll"] for r in rs),
                         "tokens_scored": rs[0]["tokens_scored"]}
            if "rouge1" in rs[0]:
                out[v][k]["rouge1"] = statistics.fmean(r["rouge1"] for r in rs)
    return out


def _check_same_tokens(systems) -> dict:
    """Every system scored the same number of tokens on each set (same windows / pairs); returns the counts."""
    counts: dict[str, int] = {}
    for s in systems:
        for v, sets in s["results"].items():
            for k, r in sets.items():
                if counts.setdefault(k, r["tokens_scored"]) != r["tokens_scored"]:
                    raise QualityError(f"system {s['name']!r} scored {r['tokens_scored']} tokens on {k} "
                                       f"for {v}, others {counts[k]}")
    return counts


# ---------------------------------------------------------------- reading the results

def _find(result, kind, share=None, **kw):
    for s in result["systems"]:
        if s["kind"] == kind and (share is None or s.get("share") == share) and all(s.get(a) == b for a, b in kw.items()):
            return s
    return None


def ours_curve(result, policy: str, representative: str = "anchor") -> dict[float, dict]:
    """share -> system for a policy ("l2/global", "random", ...); shares 0 and 1 come from the common rows."""
    out = {}
    metric, _, scope = policy.partition("/")
    for share in result["protocol"]["levels"]:
        if share == 0.0:
            s = _find(result, "ours", share, representative="anchor")
        elif share == 1.0:
            s = _find(result, "ours", share, representative=representative)
        elif metric == "random":
            s = _find(result, "ours_random", share, representative=representative)
        else:
            s = _find(result, "ours", share, metric=metric, scope=scope, representative=representative)
        if s is not None:
            out[share] = s
    return out


def achieved(system, v: str) -> float | None:
    """The fraction of variant v's non-duplicate experts the system serves from the shared copy."""
    return (system.get("sharing_actual") or {}).get(v)


def _own_domains(result):
    """``(variant, its own-domain eval set, the original model's perplexity there)`` for each variant that has one."""
    orig = _find(result, "original")
    for v in result["variants"]:
        k = result["own_set"][v]
        if k is not None:
            yield v, k, orig["results"][v][k]["ppl"]


def within(result) -> dict:
    """Per variant and policy: the highest sharing level whose own-domain ppl is within 2% of the original
    (``highest``), and the highest level up to which every level is (``all_up_to``)."""
    out = {}
    for v, k, ref in _own_domains(result):
        out[v] = {"set": k, "original_ppl": ref}
        for pol in result["protocol"]["policies"]:
            curve = ours_curve(result, pol)
            ok = [s for s, sys_ in sorted(curve.items()) if sys_["results"][v][k]["ppl"] <= (1 + WITHIN) * ref]
            upto = None
            for s in sorted(curve):
                if s not in ok:
                    break
                upto = s
            out[v][pol] = {"highest": max(ok) if ok else None, "all_up_to": upto,
                           "achieved_at_highest": achieved(curve[max(ok)], v) if ok else None}
    return out


MEMORY_GOAL = 0.45
_NO_MEMORY_KINDS = ("ours_random_seed", "no_reconfig")


def policy_of(system) -> str:
    """The policy a system stands for in the memory comparison."""
    kind = system["kind"]
    if kind == "ours":
        if system.get("metric") is None:
            return {0.0: "own copies", 1.0: "all shared"}.get(system.get("share"), "ours") + (
                " (mean)" if system.get("representative") == "mean" else "")
        return f"{system['metric']}/{system['scope']}" + (" (mean)" if system.get("representative") == "mean" else "")
    if kind == "ours_random":
        return "random/global"
    if kind == "ours_delta":
        return f"delta {system['spec']}"
    if kind == "ours_mixed":
        return system.get("policy", "mixed (measured loss)")
    if kind == "merge":
        return f"merge {system['method']}"
    return kind


def memory_systems(result) -> list:
    return [s for s in result["systems"] if "memory" in s and s["kind"] not in _NO_MEMORY_KINDS]


def within_memory(result) -> dict:
    """Per variant (with an own domain): the smallest memory ratio (device bytes of all variants served at once,
    against the variants as separate models) at which its own-domain perplexity is within 2% of the original,
    which system and policy reached it; in fp32 (measured) and the same plans' bf16 bytes, and per policy."""
    out = {}
    for v, k, ref in _own_domains(result):
        ok = [s for s in memory_systems(result) if s["results"][v][k]["ppl"] <= (1 + WITHIN) * ref]
        entry = {"set": k, "original_ppl": ref, "goal": MEMORY_GOAL}
        for tag in ("", "_bf16"):
            best = min(ok, key=lambda s: (s["memory"][f"ratio{tag}"], s["results"][v][k]["ppl"]))
            entry[f"ratio{tag}"] = best["memory"][f"ratio{tag}"]
            entry[f"policy{tag}"] = policy_of(best)
            entry[f"system{tag}"] = best["name"]
            entry[f"ppl{tag}"] = best["results"][v][k]["ppl"]
        entry["meets_goal"] = entry["ratio"] <= MEMORY_GOAL
        per = {}
        for s in ok:
            pol = policy_of(s)
            r = s["memory"]["ratio"]
            if pol not in per or r < per[pol]:
                per[pol] = r
        entry["per_policy"] = dict(sorted(per.items(), key=lambda kv: kv[1]))
        out[v] = entry
    return out


def _ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in range(i, j + 1):
            r[order[t]] = (i + j) / 2
        i = j + 1
    return r


def _corr(a, b):
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return statistics.correlation(a, b)


def criterion_summary(costs, dist, names) -> dict:
    """Per variant: how the measured cost of sharing relates to the weight distance (Pearson and Spearman
    over its measured entries), and the mean measured cost of each option (nats per token)."""
    out = {}
    for v, name in enumerate(names):
        if costs.base_nll[v] is None:
            continue
        cells = [(costs.loss[v][l][e], dist.l2[v][l][e]) for l in range(len(costs.loss[v]))
                 for e in range(len(costs.loss[v][l])) if costs.loss[v][l][e] is not None]
        share = [c["share"] for c, _ in cells]
        l2 = [d for _, d in cells]
        out[name] = {"entries": len(cells), "own_nll": costs.base_nll[v], "tokens": costs.tokens[v],
                     "pearson_share_cost_vs_l2": _corr(share, l2),
                     "spearman_share_cost_vs_l2": _corr(_ranks(share), _ranks(l2)),
                     "mean_cost": {o: statistics.fmean(c[o] for c, _ in cells) for o in costs.options} if cells else {}}
    return out


def findings(result) -> list[str]:
    """Plain statements, including the unflattering ones."""
    out = []
    orig = _find(result, "original")
    merges = [s for s in result["systems"] if s["kind"] == "merge"]
    main = result["protocol"]["policies"][0]
    levels = [s for s in result["protocol"]["levels"] if s > 0]
    for v in result["variants"]:
        k = result["own_set"][v]
        if k is None:
            continue
        best_merge = min(merges, key=lambda s: s["results"][v][k]["ppl"])
        bm = best_merge["results"][v][k]["ppl"]
        curve = ours_curve(result, main)
        worse = [f"{s:.2f} ({curve[s]['results'][v][k]['ppl']:.3f})" for s in levels
                 if s in curve and curve[s]["results"][v][k]["ppl"] > bm]
        if worse:
            out.append(f"{v} on {k}: ours ({main}) is WORSE than the best merging baseline {best_merge['name']} "
                       f"(ppl {bm:.3f}) at sharing {', '.join(worse)}.")
        else:
            out.append(f"{v} on {k}: ours ({main}) beats every merging baseline (best {best_merge['name']}, "
                       f"ppl {bm:.3f}) at every sharing level.")
    rnd = ours_curve(result, "random")
    anchor = result["variants"][0]
    result["policy_vs_random"] = {}
    for pol in result["protocol"]["policies"][:-1]:
        curve = ours_curve(result, pol)
        bad, tied, total = [], 0, 0
        for s in levels:
            if s == 1.0 or s not in curve or s not in rnd:
                continue
            for v in result["variants"]:
                # the anchor keeps its own experts under every anchor-representative plan; on the general sets a
                # variant often gets *better* by sharing the base's experts, so only its own domain says whether
                # a policy kept it close to the original
                if v == anchor or result["own_set"][v] is None:
                    continue
                for k in [result["own_set"][v]]:
                    ours_ppl = curve[s]["results"][v][k]["ppl"]
                    r = rnd[s]["results"][v][k]
                    if ours_ppl == r["ppl"] and r["ppl_std"] == 0.0:
                        tied += 1  # identical experts chosen by every seed and the policy: nothing to compare
                        continue
                    total += 1
                    if ours_ppl >= r["ppl"]:
                        bad.append(f"{v}/{k}@{s:.2f} ({ours_ppl:.3f} vs {r['ppl']:.3f}+-{r['ppl_std']:.3f})")
        result["policy_vs_random"][pol] = {"no_better": bad, "compared": total, "identical": tied}
        if bad:
            out.append(f"{pol} is NO BETTER than the random control (mean over seeds) in {len(bad)}/{total} "
                       f"own-domain cells (non-anchor variants, levels 0.25-0.75): " + "; ".join(bad[:12])
                       + (f"; ... ({len(bad) - 12} more in the JSON)" if len(bad) > 12 else ""))
        elif total:
            out.append(f"{pol} beats the random control (mean over seeds) in all {total} own-domain cells.")
    lv = [s for s in levels if s < 1.0]
    if lv and len(result["variants"]) > 2:
        c = ours_curve(result, main)
        spread = "; ".join(f"@{s:.2f}: " + ", ".join(f"{v} {achieved(c[s], v):.2f}" for v in result["variants"][1:]
                                                     if achieved(c[s], v) is not None) for s in lv if s in c)
        out.append(f"the sharing level is a fraction over ALL non-anchor experts: {main} shares the variants closest "
                   f"to the anchor more than the others (achieved per-variant fractions {spread}), so a variant's "
                   f"row at a nominal level is not its own sharing level; the plot's x axis is the achieved "
                   f"per-variant fraction.")
    nr = _find(result, "no_reconfig", 1.0, representative="anchor")
    o1 = _find(result, "ours", 1.0, representative="anchor")
    if nr and o1:
        gain = [f"{v}: {nr['results'][v][result['own_set'][v]]['ppl']:.3f} -> "
                f"{o1['results'][v][result['own_set'][v]]['ppl']:.3f}"
                for v in result["variants"][1:] if result["own_set"][v]]
        if gain:
            out.append("own non-expert layers at full sharing (no-reconfig -> ours, own-domain ppl): " + "; ".join(gain))
    wm = result.get("within_2pct_memory_ratio") or {}
    if wm:
        parts = [f"{v} {d['ratio']:.3f} ({d['policy']}; bf16 {d['ratio_bf16']:.3f}, {d['policy_bf16']})"
                 for v, d in wm.items()]
        miss = [v for v, d in wm.items() if not d["meets_goal"]]
        out.append("smallest memory ratio (all variants served at once, against separate models) at which each variant "
                   "stays within 2% of its own perplexity: " + "; ".join(parts) + ". "
                   + (f"Goal <= {MEMORY_GOAL} met by every variant." if not miss else
                      f"Goal <= {MEMORY_GOAL} NOT met by {', '.join(miss)}."))
    crit = result.get("criterion") or {}
    if crit:
        cs = [f"{v} {d['spearman_share_cost_vs_l2']:+.2f}" for v, d in crit.items()
              if d.get("spearman_share_cost_vs_l2") is not None]
        if cs:
            rho = [d["spearman_share_cost_vs_l2"] for d in crit.values() if d.get("spearman_share_cost_vs_l2") is not None]
            verdict = ("weight distance does not say what sharing costs here" if max(rho) < 0.3 else
                       "weight distance tracks the cost of sharing here, imperfectly" if min(rho) > 0.3 else
                       "weight distance tracks the cost for some variants and not for others")
            out.append("measured cost of sharing an expert vs its relative L2 distance (Spearman, per variant): "
                       + ", ".join(cs) + f" ({verdict}).")
    if orig is not None:
        zero = _find(result, "ours", 0.0)
        diffs = [abs(zero["results"][v][k]["ppl"] / orig["results"][v][k]["ppl"] - 1)
                 for v in result["variants"] for k in result["eval_sets"][v]]
        out.append(f"ours at sharing 0 vs the original models: max relative ppl difference {max(diffs):.2e}.")
    return out


def rerender(json_path, plot: bool = True) -> dict:
    """Recompute the summaries (within-2%, findings) and the plot of a saved result; measurements unchanged."""
    result = json.loads(Path(json_path).read_text())
    result["within_2pct"] = within(result)
    if any("memory" in s for s in result["systems"]):
        result["within_2pct_memory_ratio"] = within_memory(result)
    result["findings"] = findings(result)
    if plot:
        result["plot"] = plot_result(result, Path(json_path).with_suffix(".png"))
        if "within_2pct_memory_ratio" in result:
            result["plot_memory"] = plot_memory(result, Path(json_path).with_name(Path(json_path).stem + "_memory.png"))
    Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _short(k: str) -> str:
    return (k.replace("wikitext2", "wt2").replace("shakespeare", "shak").replace("pycode", "py")
            .replace("continue/", "cont/"))


def format_table(result) -> str:
    cols = [(v, k) for v in result["variants"] for k in result["eval_sets"][v]]
    w = 9
    lines = [f"{result['label']}: {result['protocol']['metric']}; tokens scored per set: "
             + ", ".join(f"{k}={n}" for k, n in result["protocol"]["tokens_scored"].items())]
    head1 = f"{'system':<38}" + "".join(f"{v[:w - 1]:>{w}}" for v, _ in cols)
    head2 = f"{'':<38}" + "".join(f"{_short(k)[:w - 1]:>{w}}" for _, k in cols)
    lines += [head1, head2]
    for s in result["systems"]:
        if s["kind"] == "ours_random_seed":
            continue
        cells = []
        for v, k in cols:
            r = s["results"][v][k]
            cells.append(f"{r['ppl']:>{w}.3f}")
        lines.append(f"{s['name'][:38]:<38}" + "".join(cells))
        if s["kind"] == "ours_random":
            lines.append(f"{'   +- (sample std over seeds)':<38}" + "".join(f"{s['results'][v][k]['ppl_std']:>{w}.3f}"
                                                                          for v, k in cols))
    rouge = [(s["name"], v, k, s["results"][v][k]["rouge1"]) for s in result["systems"]
             for v, k in cols if "rouge1" in s["results"][v][k] and s["kind"] != "ours_random_seed"]
    if rouge:
        lines.append("ROUGE-1 (words, greedy, first examples) on continuation sets:")
        for name, v, k, r in rouge:
            lines.append(f"  {name[:38]:<38} {v}/{k}: {r:.3f}")
    lines.append("achieved per-variant sharing (fraction of the variant's non-duplicate experts served by the "
                 "shared copy) at each nominal level:")
    for pol in result["protocol"]["policies"]:
        curve = ours_curve(result, pol)
        cells = []
        for lvl in sorted(curve):
            if 0.0 < lvl < 1.0:
                cells.append(f"@{lvl:.2f} " + " ".join(
                    f"{achieved(curve[lvl], v):.2f}" for v in result["variants"] if achieved(curve[lvl], v) is not None))
        lines.append(f"  {pol:<14} ({' '.join(result['variants'][1:])}): " + " | ".join(cells))
    lines.append(f"within {WITHIN:.0%} of the original on the own domain (highest sharing level; "
                 "'all up to' = every level up to it):")
    for v, d in result["within_2pct"].items():
        parts = [f"{pol}: {x['highest']} (all up to {x['all_up_to']}"
                 + (f"; achieved {x['achieved_at_highest']:.2f}" if x.get("achieved_at_highest") is not None else "")
                 + ")" for pol, x in d.items() if isinstance(x, dict)]
        lines.append(f"  {v:<14} {d['set']:<16} " + "; ".join(parts))
    wm = result.get("within_2pct_memory_ratio") or {}
    if wm:
        lines.append("memory ratio (device bytes of all variants at once / separate models; fp32, bf16) per system:")
        for s in memory_systems(result):
            m = s["memory"]
            lines.append(f"  {s['name'][:40]:<40} {m['ratio']:6.3f} {m['ratio_bf16']:6.3f}")
        lines.append(f"smallest memory ratio within {WITHIN:.0%} of the original on the own domain:")
        for v, d in wm.items():
            lines.append(f"  {v:<14} {d['set']:<16} fp32 {d['ratio']:.3f} ({d['policy']}, ppl {d['ppl']:.3f}); "
                         f"bf16 {d['ratio_bf16']:.3f} ({d['policy_bf16']})")
    lines.append("findings:")
    lines += [f"  - {f}" for f in result["findings"]]
    return "\n".join(lines)


def _panels(result, width: float, height: float):
    """``(plt, fig, axes, variants)``: one panel per variant that has an own-domain set; None without
    matplotlib (said on stderr) or without such a variant."""
    plt = pyplot()
    if plt is None:
        print(f"quality: {NO_PLOT}", file=sys.stderr)
        return None
    variants = [v for v in result["variants"] if result["own_set"][v]]
    if not variants:
        return None
    fig, axes = plt.subplots(1, len(variants), figsize=(width * len(variants), height), squeeze=False)
    return plt, fig, axes, variants


def plot_memory(result, path) -> str | None:
    """Own-domain perplexity against the memory ratio (fp32 device bytes of every variant served at once over
    the variants as separate models), one panel per variant, one curve per policy."""
    panels = _panels(result, 3.8, 4.4)
    if panels is None:
        return None
    plt, fig, axes, variants = panels
    orig = _find(result, "original")
    curves = {}
    for s in memory_systems(result):
        pol = policy_of(s)
        if s["kind"] == "ours" and s.get("metric") is None:
            for p in result["protocol"]["policies"]:  # own copies / all shared end every sharing curve
                if s.get("representative") == "anchor":
                    curves.setdefault(p, []).append(s)
            continue
        if s["kind"] == "ours_delta" and s["spec"].startswith("lowrank") and "+" not in s["spec"]:
            pol = "delta lowrank (rank 8/16/32)"
        curves.setdefault(pol, []).append(s)
    style = {"l2/global": ("o-", "tab:blue"), "l2/per_layer": ("s-", "tab:orange"), "output/global": ("^-", "tab:green"),
             "loss/global": ("D-", "tab:red"), "random/global": ("x--", "tab:olive"),
             "delta lowrank (rank 8/16/32)": ("P-", "tab:purple"), "mixed (measured loss)": ("*-", "black"),
             "mixed lowrank-only": ("*:", "tab:brown")}
    markers = iter(("v", "<", ">", "h", "p", "8", "d", "H"))
    for ax, v in zip(axes[0], variants):
        k = result["own_set"][v]
        ref = orig["results"][v][k]["ppl"]
        for pol, systems in curves.items():
            pts = sorted((s["memory"]["ratio"], s["results"][v][k]["ppl"], s["results"][v][k].get("ppl_std", 0.0))
                         for s in systems)
            xs, ys, err = zip(*pts)
            if pol.startswith("merge") or (pol.startswith("delta") and len(pts) == 1):
                fmt, col = style.get(pol, (next(markers, "o"), None))
                ax.plot(xs, ys, fmt if len(fmt) == 1 else fmt[0], color=col, label=pol, ms=6, ls="none")
            elif pol == "random/global":
                ax.errorbar(xs, ys, yerr=err, fmt=style[pol][0], color=style[pol][1], label="random (mean +- std)",
                            capsize=3, ms=4)
            elif pol in style:
                ax.plot(xs, ys, style[pol][0], color=style[pol][1], label=pol, ms=4)
        ax.axhline(ref, color="black", ls=":", lw=1, label="original")
        ax.axhline((1 + WITHIN) * ref, color="grey", ls="--", lw=0.8, label="original +2%")
        ax.axvline(MEMORY_GOAL, color="grey", ls="-.", lw=0.8, label=f"goal {MEMORY_GOAL}x")
        lo = min(s["results"][v][k]["ppl"] for s in memory_systems(result))
        ax.set_ylim(lo * 0.98, ref * 1.35)
        ax.set_xlim(0.15, 1.02)
        ax.set_title(f"{v} on {k}", fontsize=9)
        ax.set_xlabel("memory ratio (fp32 device bytes / separate models)")
    axes[0][0].set_ylabel("perplexity" if result["family"] != "switch" else "target perplexity")
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.suptitle(f"{result['label']}: own-domain quality vs device bytes (every variant served at once)", fontsize=10)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _x(system, v, nominal):
    """Plot position: the variant's achieved sharing (the nominal level for the anchor, which has none)."""
    a = achieved(system, v)
    return nominal if a is None else a


def plot_result(result, path) -> str | None:
    """Own-domain perplexity vs sharing fraction, one panel per variant; merges as horizontal lines."""
    panels = _panels(result, 3.6, 4.2)
    if panels is None:
        return None
    plt, fig, axes, variants = panels
    orig = _find(result, "original")
    for ax, v in zip(axes[0], variants):
        k = result["own_set"][v]
        pols = result["protocol"]["policies"]
        colours = {"l2/global": "tab:blue", "l2/per_layer": "tab:orange", "output/global": "tab:green",
                   "loss/global": "tab:red", "random/global": "tab:olive"}
        styles = {"l2/global": "o-", "l2/per_layer": "s-", "output/global": "^-", "loss/global": "D-",
                  "random/global": "x--"}
        for pol, style, c in zip(pols, (styles.get(p, "o-") for p in pols), (colours.get(p) for p in pols)):
            curve = ours_curve(result, pol)
            levels = sorted(curve)
            xs = [_x(curve[s], v, s) for s in levels]
            ys = [curve[s]["results"][v][k]["ppl"] for s in levels]
            if pol.startswith("random"):
                err = [curve[s]["results"][v][k].get("ppl_std", 0.0) for s in levels]
                ax.errorbar(xs, ys, yerr=err, fmt=style, color=c, label="random (mean +- std)", capsize=3, ms=4)
            else:
                ax.plot(xs, ys, style, color=c, label=pol, ms=4)
        mean = ours_curve(result, result["protocol"]["policies"][0], "mean")
        if len(mean) > 2:
            levels = sorted(mean)
            ax.plot([_x(mean[s], v, s) for s in levels], [mean[s]["results"][v][k]["ppl"] for s in levels], "d:", color="tab:cyan",
                    label="l2/global mean-expert", ms=4)
        nr = sorted((_x(s, v, s["share"]), s["results"][v][k]["ppl"]) for s in result["systems"]
                    if s["kind"] == "no_reconfig" and s["representative"] == "anchor")
        if nr and v != result["variants"][0]:
            ax.plot(*zip(*nr), "v:", color="grey", label="no-reconfig (base non-expert)", ms=4)
        ax.axhline(orig["results"][v][k]["ppl"], color="black", ls=":", lw=1, label="original")
        for s, c in zip([s for s in result["systems"] if s["kind"] == "merge"], ("tab:red", "tab:purple", "tab:brown")):
            ax.axhline(s["results"][v][k]["ppl"], color=c, ls="--", lw=1, label=s["name"])
        ax.set_title(f"{v} on {k}", fontsize=9)
        ax.set_xlabel("achieved sharing of this variant" if v != result["variants"][0] else "nominal sharing level")
        ax.set_xticks(result["protocol"]["levels"])
    axes[0][0].set_ylabel("perplexity" if result["family"] != "switch" else "target perplexity")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    pr = result["protocol"]
    how = (f"window {pr['window']}, {pr['tokens_scored'][result['own_set'][variants[0]]]} tokens on own set"
           if result["family"] != "switch" else f"{pr['n_pairs']} pairs per set")
    fig.suptitle(f"{result['label']}: own-domain quality vs sharing ({how})", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
