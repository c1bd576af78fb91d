"""The quality study's results: aggregation over seeds, the curves and the within-2% summary, prose findings,
the table and the plot (used by ``bench/quality.py``; ``rerender`` redoes them from a saved JSON)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

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


def within(result) -> dict:
    """Per variant and policy: the highest sharing level whose own-domain ppl is within 2% of the original
    (``highest``), and the highest level up to which every level is (``all_up_to``)."""
    orig = _find(result, "original")
    out = {}
    for v in result["variants"]:
        k = result["own_set"][v]
        if k is None:
            continue
        ref = orig["results"][v][k]["ppl"]
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
    result["findings"] = findings(result)
    if plot:
        result["plot"] = plot_result(result, Path(json_path).with_suffix(".png"))
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
    lines.append("findings:")
    lines += [f"  - {f}" for f in result["findings"]]
    return "\n".join(lines)


def _x(system, v, nominal):
    """Plot position: the variant's achieved sharing (the nominal level for the anchor, which has none)."""
    a = achieved(system, v)
    return nominal if a is None else a


def plot_result(result, path) -> str | None:
    """Own-domain perplexity vs sharing fraction, one panel per variant; merges as horizontal lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("quality: matplotlib is not installed; no plot written (pip install 'multimoe_rt[plot]')",
              file=sys.stderr)
        return None
    variants = [v for v in result["variants"] if result["own_set"][v]]
    if not variants:
        return None
    fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 4.2), squeeze=False)
    orig = _find(result, "original")
    for ax, v in zip(axes[0], variants):
        k = result["own_set"][v]
        colours = ("tab:blue", "tab:orange", "tab:green", "tab:olive")
        for pol, style, c in zip(result["protocol"]["policies"], ("o-", "s-", "^-", "x--"), colours):
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
    axes[0][0].set_ylabel("perplexity" if result["family"] == "mixtral" else "target perplexity")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    pr = result["protocol"]
    how = (f"window {pr['window']}, {pr['tokens_scored'][result['own_set'][variants[0]]]} tokens on own set"
           if result["family"] == "mixtral" else f"{pr['n_pairs']} pairs per set")
    fig.suptitle(f"{result['label']}: own-domain quality vs sharing ({how})", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
