"""Continuous batching at realistic layer shapes (``multimoe-rt bench-batch --synthetic mid|large
[--family mixtral|deepseek_v3|gpt_oss]``).

The tiny zoos (hidden 32 and 128) spend their time on overhead; decode at real shapes is bound by the bytes it
reads. So this bench builds random-init variants of one family's MoE at real per-layer shapes
(``synthetic_models.py``) and serves them every way at once, in one run:

* ``one_variant``  : every request to the base (one variant's experts and non-expert set).
* ``mixed_dense``  : requests spread over all variants, each variant with its own dense expert copies.
* ``mixed_shared`` : the same mix with every expert shared (one variant's expert bytes): what mixing costs.
* ``sign1`` / ``int4`` / ``lowrank16``: every fine-tuned expert stored as the base's plus a compressed delta.
* ``mixed_plan``   : the mixed plan (``plan.mixed``): per entry, share / one of the codecs above / a dense copy,
                     by measured calibration loss (random-token batches), in the int4 plan's bytes.
* ``transformers`` : every variant's full transformers model (the family's own class) resident, batched
                     ``generate`` per variant.

A system whose plan the project refuses for the family (GPT-OSS's biased experts: no deltas, no measured-loss
plan) is not run; ``skipped`` in the JSON holds the refusal (the plan's own PlanError message).

The variants: the base is transformers' random init (std ``initializer_range``); each fine-tune adds to every
routed expert matrix W a delta of relative norm ``DELTA["relative_norm"]`` whose energy is ``DELTA["lowrank_energy"]``
in a random rank-``DELTA["rank"]`` part and the rest i.i.d. Gaussian noise (a fine-tune's update is low rank
plus a full-rank tail); every non-expert matrix moves by 2% of its standard deviation.

Reported per system: saturated tokens/s, the decode step time, device bytes, and the bytes a decode step reads
(the roofline counter: the non-expert sets of the variants in the batch, the distinct experts and deltas the
routed tokens touch, in expectation under uniform routing, and the KV cache). The roofline time of a step is
max(bytes / measured copy bandwidth, FLOPs / measured matmul rate in the dtype), measured on this machine
(``ceilings.py``); ``vs_roofline`` is the measured decode step over it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ..errors import PlanError
from ..plotting import NO_PLOT, pyplot
from . import results_dir
from .ceilings import measure_ceilings
from .synthetic_models import DELTA, build_variants, model_class, shape_config

CODECS = ("sign1", "int4", "lowrank16")
SYSTEMS = ("one_variant", "mixed_dense", "mixed_shared", *CODECS, "mixed_plan", "transformers")
PLAN_SYSTEMS = {"mixed_dense", "mixed_shared", *CODECS, "mixed_plan"}


# ---------------------------------------------------------------- the plans

def make_plans(vs, dtype, systems, calib_tokens: int, log=print) -> tuple[dict, dict]:
    """``(system -> Plan, system -> why it is skipped)`` for the plan-based systems asked for: a plan the project
    refuses for this family (PlanError) skips its system with the refusal as the reason."""
    plans, skipped = {}, {}
    for s in systems:
        if s not in PLAN_SYSTEMS and s != "one_variant":
            continue
        try:
            plans[s] = _make_plan(s, vs, dtype, plans, calib_tokens, log)
        except PlanError as e:
            skipped[s] = str(e)
            log(f"skipping {s}: {e}")
    return plans, skipped


def _make_plan(s: str, vs, dtype, plans: dict, calib_tokens: int, log):
    from multimoe_rt import plan as plan_mod

    if s in ("one_variant", "mixed_dense"):
        return plans.get("mixed_dense") or plans.get("one_variant") or plan_mod.make_plan(vs, share=0.0, dtype=dtype)
    if s == "mixed_shared":
        return plan_mod.make_plan(vs, share=1.0, dtype=dtype)
    if s in CODECS:
        log(f"planning {s}: every fine-tuned expert as the base's plus a {s} delta")
        return plan_mod.make_plan(vs, share=1.0, delta=s, dtype=dtype)
    if s == "mixed_plan":
        from multimoe_rt import criterion

        int4 = plans.get("int4") or plan_mod.make_plan(vs, share=1.0, delta="int4", dtype=dtype)
        g = torch.Generator().manual_seed(1)
        vocab = vs[0].config["vocab_size"]
        # Random tokens stand in for text: the variants are random too; what is measured is the procedure's cost.
        batches = {n: criterion.lm_batches(torch.randint(0, vocab, (calib_tokens,), generator=g), seq_len=64,
                                           max_tokens=calib_tokens, batch_size=4)
                   for n in vs.names[1:]}
        log(f"measuring the mixed plan's costs ({len(vs.names) - 1} variants x every expert x share + {len(CODECS)} codecs)")
        costs = criterion.measure_costs(vs, batches, codecs=CODECS, progress=False, calibration="random tokens")
        return plan_mod.make_plan(vs, budget_bytes=int4.expert_bytes, metric="loss", costs=costs,
                                  codecs=list(CODECS), dtype=dtype)
    raise PlanError(f"no plan for system {s!r}")


# ---------------------------------------------------------------- the roofline counter

def _delta_spec(d: dict) -> str:
    parts = []
    if d["lowrank_rank"] > 0:
        parts.append(f"lowrank{d['lowrank_rank']}")
    if d["int4"] >= 0:
        parts.append("int4")
    if d["sign1"] >= 0:
        parts.append("sign1")
    return "+".join(parts)


def step_bytes(engine, vs, variants_in_batch: dict, context: int) -> dict:
    """Expected bytes one decode step reads: ``vs`` the VariantSet, ``variants_in_batch`` maps variant index ->
    sequences in the step, ``context`` the tokens each sequence has cached.

    Routing is taken as uniform (random-init routers are close to it): a (layer, expert) entry read by n tokens
    is touched with probability 1 - (1 - k/E)^n. A dense slot is touched if any of the variants reading it
    (its own, the ones that share it, the deltas built on it) touches it; a delta by its own variant's tokens.
    Non-expert: every tensor of each variant's set in the batch (attention in whatever form, shared experts,
    dense layers, router) but the embedding table, of which a step reads only its rows. The KV cache: the bytes
    per cached token of the engine's own cache (latent for DeepSeek), over each layer's window.
    """
    from multimoe_rt.delta import DESC_COLUMNS, spec_nbytes

    model = engine.model
    slab, table = model.slab, model.table
    H, I, E, k = vs.hidden_size, vs.intermediate_size, vs.num_experts, vs.top_k
    itemsize = slab.w1.element_size()
    n1 = slab.w1.shape[1]
    miss = 1.0 - k / E
    pools = slab.deltas
    slots = table.slots.cpu()
    expert = 0.0
    for layer in range(slots.shape[1]):
        slot_tokens, delta_p = {}, 0.0
        for v, n in variants_in_batch.items():
            for e in range(E):
                i = int(slots[v, layer, e])
                if pools is None:
                    slot_tokens[i] = slot_tokens.get(i, 0) + n
                    continue
                d = dict(zip(DESC_COLUMNS, pools._desc_host[i]))
                slot_tokens[d["base"]] = slot_tokens.get(d["base"], 0) + n
                spec = _delta_spec(d)
                if spec:
                    delta_p += (1 - miss ** n) * spec_nbytes(spec, n1, H, I, itemsize)
        expert += sum((1 - miss ** n) * slab.slot_nbytes for n in slot_tokens.values()) + delta_p
    weights = model.weights
    embed = weights.embed[0]
    # A tied table is the LM head too: a step then reads all of it.
    per_set = weights.set_nbytes - (0 if weights.tied else embed.numel() * embed.element_size())
    non_expert = len(variants_in_batch) * per_set
    kv = model.kv
    per_token_layer = kv.nbytes / (len(kv.tensors()[0]) * kv.max_seqs * kv.max_len)
    windows = model.attention.windows
    seqs = sum(variants_in_batch.values())
    kv_bytes = seqs * per_token_layer * sum(min(context, w or context) for w in windows)
    # FLOPs: per token, 2 x every matrix it multiplies (the non-expert set but the embedding lookup, k experts
    # per MoE layer); attention over the context is left out (short contexts here).
    matmul_params = sum(t[0].numel() for t in weights.stacked.values()) - (0 if weights.tied else embed.numel())
    flops = 2 * seqs * (matmul_params + slots.shape[1] * k * (n1 * H + H * I))
    return {"bytes": expert + non_expert + kv_bytes, "expert_bytes": expert, "non_expert_bytes": non_expert,
            "kv_bytes": kv_bytes, "flops": flops}


# ---------------------------------------------------------------- systems

def _trace(names, n: int, prompt_len: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(names[i % len(names)], torch.randint(3, vocab, (prompt_len,), generator=g).tolist()) for i in range(n)]


def run_engine(engine, trace, new_tokens: int) -> dict:
    """Saturated: every request queued at once. The decode step time is read off the tail where every sequence
    decodes (from the last first token to the last finish), so prefill does not blur it."""
    t0 = time.perf_counter()
    handles = [engine.submit(v, p, max_new_tokens=new_tokens, ignore_eos=True) for v, p in trace]
    for h in handles:
        h.result()
    end = max(h.finish for h in handles)
    tokens = sum(len(h.tokens) for h in handles)
    decode = (end - max(h.first_token for h in handles)) / max(1, new_tokens - 1)
    return {"tokens": tokens, "wall_s": end - t0, "tokens_per_s": tokens / (end - t0), "decode_step_s": decode,
            "outputs": [list(h.tokens) for h in handles]}


def run_transformers(models: dict, trace, new_tokens: int) -> dict:
    """One batched greedy ``generate`` per variant over all of its requests (equal prompt lengths: no padding).
    ``outputs``: the generated tokens per request, in trace order."""
    t0 = time.perf_counter()
    tokens, outputs = 0, [None] * len(trace)
    for v, model in models.items():
        rows = [i for i, (u, _) in enumerate(trace) if u == v]
        if not rows:
            continue
        ids = torch.tensor([trace[i][1] for i in rows], device=model.device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
        for i, o in zip(rows, out[:, ids.shape[1]:].tolist()):
            outputs[i] = o
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "outputs": outputs}


def agreement(measured: dict) -> dict:
    """Per engine system, the share of requests whose greedy tokens equal transformers' (the last repetition of
    each): 1.0 for exact plans in fp32; deltas and sharing change the function, and bf16 may flip near-ties."""
    if not measured.get("transformers"):
        return {}
    ref = measured["transformers"][-1]["outputs"]
    return {s: sum(a == b for a, b in zip(runs[-1]["outputs"], ref)) / len(ref)
            for s, runs in measured.items() if s not in ("transformers", "one_variant") and runs}


def run(shape: str = "mid", dtype=torch.bfloat16, n_variants: int = 4, seqs: int = 32, prompt_len: int = 16,
        new_tokens: int = 16, reps: int = 2, systems=SYSTEMS, device="cpu", seed: int = 0, calib_tokens: int = 512,
        out_dir=None, log=print, family: str = "mixtral") -> dict:
    log = log or (lambda *_: None)
    from multimoe_rt.checkpoint import VariantSet
    from multimoe_rt.engine import Engine
    from multimoe_rt.machine import machine_info

    device = torch.device(device)
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    dirs = build_variants(shape, n_variants, dtype, seed, family, log)
    vs = VariantSet.from_dirs(list(dirs.values()), names=list(dirs))
    vocab = vs[0].config["vocab_size"]
    max_len = prompt_len + new_tokens + 8
    plans, skipped = make_plans(vs, dtype, systems, calib_tokens, log)
    engines = {}
    for s in plans:
        if s == "one_variant" and "mixed_dense" in engines:
            engines[s] = engines["mixed_dense"]
            continue
        log(f"loading {s}")
        try:
            engines[s] = Engine.from_pretrained(vs, plan=plans[s], max_seqs=seqs, max_len=max_len, device=device,
                                                dtype=dtype, max_step_tokens=seqs * prompt_len + seqs)
        except PlanError as e:  # what the slab refuses to hold for this family (e.g. deltas of biased experts)
            skipped[s] = str(e)
            log(f"skipping {s}: {e}")
    systems = tuple(s for s in systems if s not in skipped)
    mixed_trace = _trace(vs.names, seqs, prompt_len, vocab, seed)
    one_trace = [(vs.names[0], p) for _, p in mixed_trace]
    traces = {s: one_trace if s == "one_variant" else mixed_trace for s in systems}
    for s, e in engines.items():  # warm-up: every code path once (allocations, first-call dispatch)
        run_engine(e, traces[s][:max(2, len(vs.names))], 2)
    measured = {s: [] for s in systems}
    hf = None
    if "transformers" in systems:
        log("loading every variant's transformers model")
        cls = model_class(family)
        hf = {n: cls.from_pretrained(d, dtype=dtype).to(device).eval() for n, d in dirs.items()}
        run_transformers({n: hf[n] for n in list(hf)[:1]}, mixed_trace[:2], 2)
    for rep in range(reps):
        for s in systems:
            r = run_transformers(hf, mixed_trace, new_tokens) if s == "transformers" else run_engine(engines[s], traces[s], new_tokens)
            measured[s].append(r)
            log(f"  rep {rep}: {s:13} {r['tokens_per_s']:8.1f} tokens/s")
    ceilings = measure_ceilings(device, dtype=dtype)
    bw, peak = ceilings["copy_GBps"] * 1e9 / 2, ceilings["matmul_TFLOPs"] * 1e12  # copy moves 2 bytes per byte read
    rows = {}
    for s in systems:
        tps = [m["tokens_per_s"] for m in measured[s]]
        row = {"tokens_per_s": statistics.median(tps), "tokens_per_s_runs": tps}
        if s == "transformers":
            # Every full model, plus a KV cache as large as the engines' (what a batched generate holds at most).
            kv = next(iter(engines.values())).memory_footprint()["kv_cache_bytes"] if engines else 0
            row["device_bytes"] = kv + sum(t.numel() * t.element_size() for m in hf.values() for t in m.parameters())
        else:
            e = engines[s]
            row["device_bytes"] = e.memory_footprint()["total_device_bytes"]
            in_batch = {0: seqs} if s == "one_variant" else {v: seqs // len(vs.names) + (v < seqs % len(vs.names))
                                                              for v in range(min(seqs, len(vs.names)))}
            sb = step_bytes(e, vs, in_batch, prompt_len + new_tokens // 2)
            roof = max(sb["bytes"] / bw, sb["flops"] / peak)
            step = statistics.median(m["decode_step_s"] for m in measured[s])
            row.update(decode_step_s=step, step_bytes=sb, roofline_step_s=roof,
                       roofline_bound="bytes" if sb["bytes"] / bw >= sb["flops"] / peak else "flops",
                       vs_roofline=step / roof)
        rows[s] = row
    for e in {id(e): e for e in engines.values()}.values():
        e.shutdown()
    out = {"bench": "batching-synthetic", "family": family, "shape": shape, "config": shape_config(family, shape),
           "experts": {"hidden": vs.hidden_size, "intermediate": vs.intermediate_size, "experts": vs.num_experts,
                       "top_k": vs.top_k, "moe_layers": vs.num_layers},
           "delta_recipe": DELTA, "dtype": str(dtype).replace("torch.", ""), "variants": n_variants,
           "sequences": seqs, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "reps": reps,
           "device": str(device), "machine": machine_info(), "ceilings": ceilings, "systems": rows,
           "ratios": ratios(rows), "skipped": skipped, "greedy_agreement_with_transformers": agreement(measured),
           "notes": ["tokens_per_s: medians of interleaved repetitions (each system once per repetition)",
                     "step_bytes: expected bytes of one decode step under uniform routing (see module docstring)",
                     "transformers: one batched generate per variant, one after another",
                     "skipped: systems whose plan the project refuses for this family, with the refusal"]}
    out["files"] = write(out, out_dir)
    return out


def ratios(rows: dict) -> dict:
    """One entry per codec plan (and the shared plan): its throughput and bytes against the others."""
    out = {}
    tps = {s: r["tokens_per_s"] for s, r in rows.items()}
    for s in (*CODECS, "mixed_plan", "mixed_shared"):
        if s not in rows:
            continue
        r = {"vs_roofline": rows[s].get("vs_roofline")}
        for other, key in (("one_variant", "vs_one_variant"), ("mixed_dense", "vs_mixed_dense"),
                           ("transformers", "vs_transformers")):
            if other in tps:
                r[key] = tps[s] / tps[other]
        if "transformers" in rows:
            r["bytes_vs_transformers"] = rows[s]["device_bytes"] / rows["transformers"]["device_bytes"]
        out[s] = r
    return out


def table(out: dict) -> str:
    rows = out["systems"]
    one = rows.get("one_variant", {}).get("tokens_per_s")
    x = out["experts"]
    lines = [f"{out['family']} {out['shape']} (H {x['hidden']}, expert I {x['intermediate']}, {x['experts']} experts "
             f"top-{x['top_k']}), {out['dtype']}, {out['variants']} variants, {out['sequences']} sequences, "
             f"{out['machine']['cpu']}",
             f"{'system':14} {'tokens/s':>9} {'vs one':>7} {'device MB':>10} {'step MB read':>12} {'step ms':>8} "
             f"{'roofline ms':>11} {'vs roof':>8}"]
    for s, r in rows.items():
        sb = r.get("step_bytes", {})
        lines.append(f"{s:14} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / one if one else float('nan'):7.2f} "
                     f"{r['device_bytes'] / 1e6:10.1f} {sb.get('bytes', float('nan')) / 1e6:12.1f} "
                     f"{1e3 * r.get('decode_step_s', float('nan')):8.1f} {1e3 * r.get('roofline_step_s', float('nan')):11.1f} "
                     f"{r.get('vs_roofline', float('nan')):8.2f}")
    lines += [f"{s:14} skipped: {why}" for s, why in out.get("skipped", {}).items()]
    return "\n".join(lines)


def write(out: dict, out_dir) -> dict:
    out_dir = results_dir(out_dir)
    # Mixtral keeps the name its committed results carry; the other families add theirs.
    family = "" if out["family"] == "mixtral" else f"-{out['family']}"
    tag = f"batching-synthetic-{out['shape']}-{out['dtype']}{family}" + ("" if out["variants"] == 4 else f"-{out['variants']}v")
    files = {"json": str(out_dir / f"{tag}.json")}
    Path(files["json"]).write_text(json.dumps(out, indent=1, default=str))
    plt = pyplot()
    if plt is None:
        files["plot"] = NO_PLOT
        return files
    rows = out["systems"]
    names = list(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [rows[s]["tokens_per_s"] for s in names], color="tab:blue")
    a.set_ylabel("saturated tokens/s")
    b.bar(names, [rows[s]["device_bytes"] / 1e6 for s in names], color="tab:gray", label="device")
    b.bar(names, [rows[s].get("step_bytes", {}).get("bytes", 0) / 1e6 for s in names], color="tab:orange",
          label="read per decode step")
    b.set_ylabel("MB")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=40, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{out['family']}, {out['shape']} shape, {out['dtype']}, {out['variants']} variants, {out['sequences']} sequences "
                 f"({out['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    files["plot"] = str(out_dir / f"{tag}.png")
    fig.savefig(files["plot"], dpi=110)
    plt.close(fig)
    return files


def gpu_check(device, dry: bool, deadline: float, log=print) -> dict:
    """The GPU check's step 8: the large shape in bf16 on the GPU (the test shape on a dry run), one repetition
    of the systems that fit its time limit."""
    device = torch.device(device)
    shape, dtype = ("test", torch.float32) if dry else ("large", torch.bfloat16)
    systems = ("one_variant", "mixed_dense", "mixed_shared", "sign1", "int4", "transformers")
    out = run(shape, dtype, 4, seqs=32, prompt_len=16, new_tokens=16, reps=1, systems=systems, device=device,
              out_dir=None, log=log)
    return {"shape": shape, "dtype": out["dtype"], "ceilings": out["ceilings"], "ratios": out["ratios"],
            "rows": [dict(system=s, **{k: v for k, v in r.items() if k != "tokens_per_s_runs"})
                     for s, r in out["systems"].items()], "json": out["files"]["json"]}
