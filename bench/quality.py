"""Output quality of consolidated variants against the original variants and model-merging baselines.

The paper's second claim: serving variants through shared experts plus each variant's own non-expert layers
keeps quality close to the original variants, better than merging them into one model. This bench measures it.

Systems, each evaluated on every variant's evaluation sets in one run:
  original             each variant's own full weights, run by transformers itself.
  ours <policy> @s     MultiVariantModel with a consolidation plan at sharing fraction s (``plan.make_plan(share=s)``)
                       for each ranking policy: l2/global, l2/per_layer, output/global (expert output distance on
                       recorded MoE inputs of the anchor, from ``calibration_from_text`` on validation text) and the
                       seeded random control (``--seeds`` seeds, reported as mean +- sample std, min/max in the JSON);
                       anchor representative for all, mean representative for l2/global. At s = 0 every variant keeps
                       its own experts whatever the policy, and at s = 1 nothing is ranked, so those two levels are one
                       system per representative.
  no-reconfig @s       what serving looks like without Algorithm 2: variant v's row of the slot table (l2/global
                       plan at s, anchor representative) but the BASE (anchor) variant's non-expert layers for every
                       variant. At s = 1 with the anchor representative this is exactly the base model for everyone;
                       "no-reconfig mean @1.00" uses the mean-expert representative with the base's non-expert layers.
  merge average / task-arithmetic / ties
                       one merged model (``multimoe_rt.lab.merge.merge_variants``, base = the anchor) for all variants;
                       the task-arithmetic and TIES scales are chosen on validation text (mean validation NLL of
                       every variant on its own domain), never on the test split.

Data. Perplexity is byte-level (ByteTokenizer) with the windowed protocol of ``multimoe_rt.lab.evaluate.perplexity``:
window = the model's context, capped window count, identical windows and scored tokens for every system (checked).
Mixtral-family sets: WikiText-2 test, PTB test, and the variant's own domain test split. Switch-family sets: the
variant's task (span corruption, or prefix continuation) rebuilt with the zoo's own data construction on test text,
seeded so every system sees the same pairs; WikiText-2 and PTB span corruption for every variant; ROUGE-1 (words) of
greedy outputs on a few examples for continuation tasks. Validation text = the zoo's held-out tail (last 5%) of each
domain's training file, which no zoo model was trained on.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from multimoe_rt.lab import merge as merge_mod
from multimoe_rt import plan as plan_mod
from multimoe_rt.lab import zoo as zoo_mod
from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.lab.data import DATASETS, data_dir
from multimoe_rt.lab.evaluate import perplexity, rouge1, rouge_tokens, tokenize_dataset
from multimoe_rt.machine import machine_info
from multimoe_rt.model import MODEL_CLASSES, MultiVariantModel
from multimoe_rt.tokenizer import ByteTokenizer

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
# (metric, scope): the first is the main policy (it also gets the mean representative and no-reconfig curves)
POLICIES = (("l2", "global"), ("l2", "per_layer"), ("output", "global"))
TA_GRID = (0.2, 0.3, 0.5, 0.7, 1.0)
TIES_GRID = (0.3, 0.5, 0.7, 1.0, 1.5)
GENERAL_SETS = ("wikitext2", "ptb")
WITHIN = 0.02
SCHEMA_VERSION = 1


class QualityError(RuntimeError):
    """The bench cannot run as asked; the message says what is missing."""


# ---------------------------------------------------------------- variants, domains, data


def variant_info(dirs: dict[str, Path], family: str) -> dict[str, dict]:
    """Domain and task of each variant: from the zoo manifest next to the directory, else from its name.

    A directory named like a data set (ptb, shakespeare, ...) gets that domain; otherwise it has none and is
    evaluated on the general sets only.
    """
    out = {}
    for name, path in dirs.items():
        meta = None
        manifest = Path(path).parent / "manifest.json"
        if manifest.is_file():
            meta = json.loads(manifest.read_text()).get("variants", {}).get(Path(path).name)
        if meta is not None:
            domain, task = meta.get("domain"), meta.get("task", "lm")
        else:
            domain = name if name in DATASETS else None
            task = "lm" if family == "mixtral" else "span"
        out[name] = {"domain": domain, "task": task if family == "switch" else "lm"}
    return out


def zoo_params(dirs: dict[str, Path], family: str) -> dict:
    """The recipe parameters the variants were built with (manifest), else the full-size recipe's."""
    manifest = Path(next(iter(dirs.values()))).parent / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["params"]
    return zoo_mod.recipe_params("mixtral-tiny" if family == "mixtral" else "switch-tiny")


def validation_tokens(domain: str) -> torch.Tensor:
    """The zoo's held-out tail of a domain's training file (bytes; never trained on by the zoo)."""
    raw = (data_dir() / zoo_mod.TRAIN_FILES[domain]).read_bytes()
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    return ids[int(len(ids) * (1 - zoo_mod.HELD_OUT_FRACTION)):]


def _set_key(family: str, domain: str, task: str) -> str:
    return domain if family == "mixtral" else f"{task}/{domain}"


def eval_plan(info: dict[str, dict], family: str) -> tuple[dict[str, list[str]], dict[str, str | None]]:
    """Per variant: its evaluation set keys (general sets first) and its own-domain key (or None)."""
    sets, own = {}, {}
    for name, meta in info.items():
        general = [_set_key(family, d, "span") for d in GENERAL_SETS]
        own_key = _set_key(family, meta["domain"], meta["task"]) if meta["domain"] else None
        sets[name] = general + ([own_key] if own_key and own_key not in general else [])
        own[name] = own_key
    return sets, own


def make_pairs(ids: torch.Tensor, task: str, params: dict, n: int, seed: int, tok: ByteTokenizer) -> list:
    """``n`` (encoder ids, target ids) pairs built exactly as the zoo builds its training batches."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    while len(pairs) < n:
        src, tgt = zoo_mod._seq2seq_batch(ids, task, params, tok, g)
        pairs.extend(zip(src.tolist(), tgt.tolist()))
    return pairs[:n]


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def seq2seq_nll(model_fn, pairs, decoder_start_id: int, batch_size: int = 16) -> dict:
    """Teacher-forced target NLL, batching pairs of equal lengths (no padding, so nothing to mask wrongly).

    Same quantity as ``multimoe_rt.lab.evaluate.seq2seq_loss`` (tests check it), faster for many short pairs.
    """
    groups: dict[tuple, list] = {}
    for enc, tgt in pairs:
        groups.setdefault((len(enc), len(tgt)), []).append((enc, tgt))
    total, scored = 0.0, 0
    for group in groups.values():
        for b0 in range(0, len(group), batch_size):
            chunk = group[b0:b0 + batch_size]
            enc = torch.tensor([p[0] for p in chunk], dtype=torch.long)
            tgt = torch.tensor([p[1] for p in chunk], dtype=torch.long)
            dec = torch.cat([torch.full((len(chunk), 1), decoder_start_id, dtype=torch.long), tgt[:, :-1]], 1)
            logits = model_fn(enc, dec)
            logp = torch.log_softmax(logits.float(), dim=-1)
            total += -logp.gather(-1, tgt[..., None].to(logp.device)).sum(dtype=torch.float64).item()
            scored += tgt.numel()
    if not scored:
        raise QualityError("seq2seq_nll: no pairs")
    mean = total / scored
    return {"ppl": math.exp(mean), "nll": mean, "tokens_scored": scored, "pairs": len(pairs)}


class Runner:
    """One system: how to get logits (and greedy outputs) for a variant."""

    def __init__(self, lm, s2s, gen, key):
        self.lm, self.s2s, self.gen, self.key = lm, s2s, gen, key


def hf_runner(models: dict, family: str, key_prefix: str) -> Runner:
    """transformers models: ``models[variant]`` (or one shared model under key None)."""
    def get(v):
        return models[v] if v in models else models[None]

    def lm(v, ids):
        return get(v)(input_ids=ids, use_cache=False).logits

    def s2s(v, enc, dec):
        return get(v)(input_ids=enc, decoder_input_ids=dec, use_cache=False).logits

    def gen(v, enc, n, eos):
        out = get(v).generate(input_ids=enc, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                              pad_token_id=get(v).config.pad_token_id)
        return out[:, 1:] if family == "switch" else out[:, enc.shape[1]:]

    # a shared model gives the same numbers for every variant: cache by model, not by variant
    return Runner(lm, s2s, gen, lambda v: (key_prefix, v if v in models else None))


def mvm_runner(mvm: MultiVariantModel, key_prefix: str, non_expert_of: str | None = None) -> Runner:
    """Ours. With ``non_expert_of`` every variant uses that variant's non-expert layers and its own table row
    (the no-reconfiguration system)."""
    names = mvm.names

    def call(v, fn):
        if non_expert_of is None:
            mvm.use(v)
        else:
            mvm.use(non_expert_of)
            mvm.active.value = names.index(v)  # the row of v, read by every SlabExperts
        return fn()

    def lm(v, ids):
        with mvm.lock, torch.inference_mode():
            return call(v, lambda: mvm.model(input_ids=ids, use_cache=False).logits)

    def s2s(v, enc, dec):
        with mvm.lock, torch.inference_mode():
            return call(v, lambda: mvm.model(input_ids=enc, decoder_input_ids=dec, use_cache=False).logits)

    def gen(v, enc, n, eos):
        with mvm.lock, torch.inference_mode():
            out = call(v, lambda: mvm.model.generate(input_ids=enc, max_new_tokens=n, do_sample=False,
                                                     eos_token_id=eos, pad_token_id=mvm.model.config.pad_token_id))
        return out[:, 1:] if mvm.family == "switch" else out[:, enc.shape[1]:]

    def key(v):
        # two variants with the same slots and the same non-expert layers are the same model
        row = tuple(torch.as_tensor(mvm.plan.slots[names.index(v)]).flatten().tolist())
        return (key_prefix, row, non_expert_of or v)

    return Runner(lm, s2s, gen, key)


def load_hf(path, family: str):
    cls = MODEL_CLASSES[family][1]
    return cls.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True).eval()


def load_merged(state_dict: dict, like_config: dict, family: str):
    """A transformers model holding a merged state dict (every tensor must be there: strict load)."""
    config_cls, model_cls = MODEL_CLASSES[family]
    model = model_cls(config_cls.from_dict(dict(like_config)))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # tied aliases (lm head / decoder embeddings) are absent from a checkpoint's non-expert names
    tied = {n for names in _tied(model).values() for n in names[1:]}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise QualityError(f"merged state dict does not fit {model_cls.__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def _tied(model) -> dict[int, list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return by_id


# ---------------------------------------------------------------- the bench


class Bench:
    def __init__(self, vs: VariantSet, info, sets, own, test_data, val_data, family, window, stride, max_windows,
                 val_windows, batch_size, n_rouge, decoder_start, eos, progress):
        self.vs, self.info, self.sets, self.own = vs, info, sets, own
        self.test_data, self.val_data = test_data, val_data
        self.family, self.window, self.stride = family, window, stride
        self.max_windows, self.val_windows, self.batch_size = max_windows, val_windows, batch_size
        self.n_rouge, self.decoder_start, self.eos = n_rouge, decoder_start, eos
        self.progress = progress
        self.cache: dict = {}
        self.evals = 0

    def score(self, runner: Runner, v: str, key: str, split: str = "test") -> dict:
        ck = (runner.key(v), key, split)
        if ck in self.cache:
            return self.cache[ck]
        data = (self.test_data if split == "test" else self.val_data)[key]
        if self.family == "mixtral":
            mw = self.max_windows if split == "test" else self.val_windows
            r = perplexity(lambda ids: runner.lm(v, ids), data, self.window, self.stride, mw, self.batch_size)
            r = {"ppl": r["ppl"], "nll": r["nll"], "tokens_scored": r["tokens_scored"], "windows": r["windows"]}
        else:
            r = seq2seq_nll(lambda e, d: runner.s2s(v, e, d), data, self.decoder_start, self.batch_size)
            if split == "test" and key.startswith("continue/") and self.n_rouge:
                r["rouge1"] = self.rouge(runner, v, data[:self.n_rouge])
        self.cache[ck] = r
        self.evals += 1
        return r

    def rouge(self, runner, v, pairs) -> float:
        """Mean ROUGE-1 F1 (words) of greedy outputs against the reference continuations."""
        tok = ByteTokenizer()
        enc = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        n = max(len(p[1]) for p in pairs)
        out = runner.gen(v, enc, n, self.eos)
        scores = [rouge1(rouge_tokens(tok.decode(o.tolist())), rouge_tokens(tok.decode(p[1])))
                  for o, p in zip(out, pairs)]
        return sum(scores) / len(scores)

    def run_system(self, runner: Runner) -> dict:
        return {v: {k: self.score(runner, v, k) for k in self.sets[v]} for v in self.vs.names}

    def val_objective(self, runner: Runner) -> float:
        """Mean validation NLL of every variant with a domain, on its own domain."""
        vals = [self.score(runner, v, self.own[v], "val")["nll"] for v in self.vs.names if self.own[v]]
        if not vals:
            raise QualityError("no variant has a known domain: cannot choose merge scales on validation text")
        return sum(vals) / len(vals)


def _calibration(vs: VariantSet, val_data: dict, own: dict, family: str, tokens: int = 512):
    """Recorded MoE inputs of the anchor on validation text of every domain present (equal shares)."""
    keys = sorted({k for k in own.values() if k} | set(val_data) & {_set_key(family, d, "span") for d in GENERAL_SETS})
    per = max(1, tokens // max(1, len(keys)))
    anchor = vs[0]
    if family == "mixtral":
        ids = [val_data[k][:per].tolist() for k in keys]
    else:
        ids = [sum((p[0] for p in val_data[k]), [])[:per] for k in keys]
    ids = [i for chunk in ids for i in chunk]
    from multimoe_rt.tokenizer import TOKENIZER_FILE
    if (Path(anchor.path) / TOKENIZER_FILE).exists() and max(ids) < 256:
        text = bytes(ids).decode("utf-8", errors="replace")
        return plan_mod.calibration_from_text(anchor, text, max_tokens=tokens), "calibration_from_text"
    # no byte tokenizer (user checkpoints, test models): record on the validation ids directly
    model = load_hf(anchor.path, family)
    batches = [torch.tensor([ids[i:i + 128]]) for i in range(0, len(ids), 128)]
    inputs = [{"input_ids": b} if family == "mixtral" else {"input_ids": b, "decoder_input_ids": b} for b in batches]
    return plan_mod.record_calibration(model, anchor.moe_layers, inputs, max_tokens=tokens), "record_calibration"


def run_quality(dirs, *, label: str | None = None, window: int | None = None, stride: int | None = None,
                max_windows: int = 48, val_windows: int | None = None, batch_size: int = 16, seeds: int = 3,
                levels=LEVELS, n_pairs: int = 48, n_rouge: int = 8, ta_grid=TA_GRID, ties_grid=TIES_GRID,
                ties_density: float = 0.2, out_dir=None, plot: bool = True, test_data: dict | None = None,
                val_data: dict | None = None, progress: bool = True) -> dict:
    """Evaluate every system on every variant's sets; write JSON (and a PNG) under ``out_dir`` if given.

    dirs: {name: HF directory} (base/anchor first) or a list of directories (names from directory names).
    test_data / val_data: {set key: token ids (Mixtral) or pairs (Switch)} overriding the shared/data sets
    (tests use this with tiny random models).
    """
    t_start = time.perf_counter()
    if not isinstance(dirs, dict):
        dirs = {Path(d).name: Path(d) for d in dirs}
    dirs = {n: Path(p) for n, p in dirs.items()}
    vs = VariantSet.from_dirs(list(dirs.values()), names=list(dirs))
    family = vs.family
    info = variant_info(dirs, family)
    sets, own = eval_plan(info, family)
    params = zoo_params(dirs, family)
    label = label or f"{family}-{len(vs)}"
    tok = ByteTokenizer()
    cfg = vs[0].config
    if family == "mixtral":
        window = window or int(params.get("seq") or min(int(cfg.get("max_position_embeddings", 2048)), 2048))
        stride = stride or window
    decoder_start = int(cfg.get("decoder_start_token_id") or 0) if family == "switch" else None
    eos = cfg.get("eos_token_id")
    val_windows = val_windows or max(2, max_windows // 2)

    # ---- data: identical for every system
    needed = sorted({k for ks in sets.values() for k in ks})
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    if test_data is None:
        test_data = {}
        for k in needed:
            task, _, domain = k.rpartition("/")
            ids = tokenize_dataset(domain, "test", tok)
            test_data[k] = ids if family == "mixtral" else make_pairs(ids, task, params, n_pairs, 7, tok)
    if val_data is None:
        val_data = {}
        for k in needed:
            task, _, domain = k.rpartition("/")
            ids = validation_tokens(domain)
            val_data[k] = ids if family == "mixtral" else make_pairs(ids, task, params, n_pairs, 11, tok)
    missing = [k for k in needed if k not in test_data or k not in val_data]
    if missing:
        raise QualityError(f"no test/validation data for evaluation sets {missing}")

    bench = Bench(vs, info, sets, own, test_data, val_data, family, window, stride, max_windows, val_windows,
                  batch_size, n_rouge, decoder_start, eos, progress)
    systems: list[dict] = []

    def add(name, kind, runner, **meta):
        t0 = time.perf_counter()
        res = bench.run_system(runner)
        systems.append({"name": name, "kind": kind, **meta, "results": res})
        log(f"  {name:<36} {time.perf_counter() - t0:6.1f} s")
        return res

    # ---- 1. originals (transformers, own weights)
    log(f"[{label}] {len(vs)} variants {vs.names}; sets {needed}")
    originals = {n: load_hf(p, family) for n, p in dirs.items()}
    add("original", "original", hf_runner(originals, family, "original"))
    del originals

    # ---- 2./3. ours and no-reconfig
    log(f"[{label}] expert distances (+ output distance on recorded calibration states)")
    calib, calib_how = _calibration(vs, val_data, own, family)
    dist = plan_mod.compute_distances(vs, anchor=0, output=True, calib=calib)
    main_metric, main_scope = POLICIES[0]

    def ours(share, metric, scope, representative, seed=0):
        p = plan_mod.make_plan(vs, share=share, metric=metric, scope=scope, representative=representative,
                               seed=seed, distances=dist, dtype=torch.float32)
        return MultiVariantModel(vs, p, device="cpu", dtype=torch.float32), p

    def sharing(p) -> dict:
        # the achieved fraction of each variant's non-duplicate entries served by the shared copy
        out = {}
        for v, name in enumerate(vs.names):
            st = [s for layer in p.status[v] for s in layer]
            n = st.count("shared") + st.count("own")
            out[name] = st.count("shared") / n if n else None
        return out

    for share in levels:
        edge = share in (0.0, 1.0)
        policies = [POLICIES[0]] if edge else list(POLICIES)
        for metric, scope in policies:
            reps = ["anchor"] if share == 0.0 else ["anchor", "mean"] if (metric, scope) == POLICIES[0] else ["anchor"]
            for rep in reps:
                mvm, p = ours(share, metric, scope, rep)
                pol = "any" if edge else f"{metric}/{scope}"
                tag = f"{share:.2f}"
                add(f"ours {pol} {rep} @{tag}", "ours", mvm_runner(mvm, f"ours-{pol}-{rep}-{tag}"),
                    metric=None if edge else metric, scope=None if edge else scope, representative=rep,
                    share=share, seed=None, sharing_actual=sharing(p))
                if rep == "anchor" and (metric, scope) == POLICIES[0]:
                    add(f"no-reconfig {rep} @{tag}", "no_reconfig",
                        mvm_runner(mvm, f"noreconf-{pol}-{rep}-{tag}", non_expert_of=vs.names[0]),
                        metric=None if edge else metric, scope=None if edge else scope, representative=rep,
                        share=share, sharing_actual=sharing(p))
                if rep == "mean" and share == 1.0:
                    add(f"no-reconfig {rep} @{tag}", "no_reconfig",
                        mvm_runner(mvm, f"noreconf-{pol}-{rep}-{tag}", non_expert_of=vs.names[0]),
                        metric=None, scope=None, representative=rep, share=share, sharing_actual=sharing(p))
        if not edge:
            per_seed = []
            for seed in range(seeds):
                mvm, p = ours(share, "random", "global", "anchor", seed)
                add(f"ours random seed{seed} anchor @{share:.2f}", "ours_random_seed",
                    mvm_runner(mvm, f"random-{seed}-{share}"), metric="random", scope="global",
                    representative="anchor", share=share, seed=seed, sharing_actual=sharing(p))
                per_seed.append(systems[-1]["results"])
            fracs = [s_["sharing_actual"] for s_ in systems[-seeds:]]
            systems.append({"name": f"ours random ({seeds} seeds) anchor @{share:.2f}", "kind": "ours_random",
                            "metric": "random", "scope": "global", "representative": "anchor", "share": share,
                            "seeds": list(range(seeds)), "results": _aggregate(per_seed),
                            "sharing_actual": {v: None if fracs[0][v] is None else
                                               statistics.fmean(f[v] for f in fracs) for v in vs.names}})

    # ---- 4. merging baselines: one model for all variants
    log(f"[{label}] merging baselines (scales chosen on validation text)")
    merges = {}
    avg = load_merged(merge_mod.merge_variants(vs, "average"), cfg, family)
    add("merge average", "merge", hf_runner({None: avg}, family, "merge-average"), method="average")
    for method, grid, extra in (("task_arithmetic", ta_grid, {}), ("ties", ties_grid, {"density": ties_density})):
        curve = {}
        best = None
        for s in grid:
            m = load_merged(merge_mod.merge_variants(vs, method, base=0, scale=s, **extra), cfg, family)
            obj = bench.val_objective(hf_runner({None: m}, family, f"merge-{method}-{s}"))
            curve[str(s)] = obj
            if best is None or obj < best[0]:
                best = (obj, s, m)
        merges[method] = {"grid": list(grid), "val_nll": curve, "chosen_scale": best[1], **extra}
        add(f"merge {method.replace('_', '-')} x{best[1]}", "merge",
            hf_runner({None: best[2]}, family, f"merge-{method}-{best[1]}"), method=method, scale=best[1], **extra)

    # ---- checks, summary, output
    tokens = _check_same_tokens(systems)
    result = {
        "schema": SCHEMA_VERSION, "label": label, "family": family, "variants": vs.names,
        "dirs": {n: str(p) for n, p in dirs.items()}, "variant_info": info, "eval_sets": sets, "own_set": own,
        "protocol": {"window": window, "stride": stride, "max_windows": max_windows, "val_windows": val_windows,
                     "batch_size": batch_size, "n_pairs": n_pairs if family == "switch" else None,
                     "n_rouge": n_rouge if family == "switch" else None, "levels": list(levels), "seeds": seeds,
                     "calibration": calib_how, "policies": [f"{m}/{s}" for m, s in POLICIES] + ["random/global"],
                     "metric": "byte perplexity" if family == "mixtral" else "target perplexity (exp mean NLL)",
                     "tokens_scored": tokens},
        "merge": merges, "machine": machine_info(), "systems": systems, "evaluations": bench.evals,
    }
    result["within_2pct"] = within(result)
    result["findings"] = findings(result)
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result["json"] = str(out_dir / f"quality_{label}.json")
        if plot:
            result["plot"] = plot_result(result, out_dir / f"quality_{label}.png")
        Path(result["json"]).write_text(json.dumps(result, indent=1) + "\n")
    return result


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


# ---------------------------------------------------------------- command line


def zoo_dirs(recipe: str, small: bool, cache_dir=None, progress=True) -> dict[str, Path]:
    """The zoo's directories; the full zoo is built (minutes) if it is not in the cache."""
    return zoo_mod.build(recipe, small=small, cache_dir=cache_dir, progress=progress)


def run_from_args(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    jobs = []
    if args.variants:
        jobs.append(({Path(d).name: Path(d) for d in args.variants}, None))
    else:
        recipes = ["mixtral-tiny", "switch-tiny"] if args.recipe == "both" else [args.recipe]
        for r in recipes:
            jobs.append((zoo_dirs(r, args.small, args.cache, not args.quiet), f"{r}{'-small' if args.small else ''}"))
    for dirs, label in jobs:
        res = run_quality(dirs, label=label, window=args.window, stride=args.stride, max_windows=args.max_windows,
                          batch_size=args.batch_size, seeds=args.seeds, n_pairs=args.pairs, out_dir=out,
                          plot=not args.no_plot, progress=not args.quiet)
        print(format_table(res))
        print(f"JSON: {res['json']}" + (f"   plot: {res['plot']}" if res.get("plot") else "")
              + f"   ({res['evaluations']} evaluations, {res['elapsed_s']} s)")
    return 0


def main(argv=None) -> int:
    from multimoe_rt.cli import build_parser
    args = build_parser().parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
