"""The quality study's systems and scoring (used by ``bench/quality.py``, which runs and reports).

Variants and their evaluation sets, seq2seq scoring, the systems under test as ``Runner``s (transformers
models, merged models, MultiVariantModel with or without reconfiguration), the calibration inputs, and
``Bench``: scores a system on every variant's sets with a cache keyed by what the system computes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import plan as plan_mod
from ..checkpoint import VariantSet
from ..criterion import seq2seq_batches
from ..families import get_family
from ..model import MODEL_CLASSES, MultiVariantModel, hf_generate
from ..reconfig import tied_aliases
from ..tokenizer import ByteTokenizer
from . import zoo as zoo_mod
from .data import DATASETS, data_dir
from .evaluate import perplexity, rouge1, rouge_tokens

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
# (metric, scope): the first is the main policy (it also gets the mean representative and no-reconfig curves);
# "loss" ranks by the measured calibration-loss cost of sharing each expert (multimoe_rt.criterion)
POLICIES = (("l2", "global"), ("l2", "per_layer"), ("output", "global"), ("loss", "global"))
# every non-duplicate entry stored as base + this delta (one system each)
UNIFORM_DELTAS = ("sign1", "lowrank8", "lowrank16", "lowrank32", "int4", "lowrank8+sign1")
# device-byte budgets of the mixed plan, as a fraction of the variants as separate models (experts + non-expert)
MIXED_RATIOS = (0.28, 0.30, 0.32, 0.34, 0.36, 0.40, 0.45)
# the mixed plan again with lowrank codecs only: the codec whose torch (CPU) path costs <= 1.3x the dense expert
# at decode (bench/kernels.py --only codecs); sign1 and int4 unpack to a dense matrix per call there
FAST_CODECS = ("lowrank4", "lowrank8", "lowrank16", "lowrank32")
FAST_RATIOS = (0.36, 0.40, 0.45)
CALIB_TOKENS = 2048
TA_GRID = (0.2, 0.3, 0.5, 0.7, 1.0)
TIES_GRID = (0.3, 0.5, 0.7, 1.0, 1.5)
GENERAL_SETS = ("wikitext2", "ptb")
WITHIN = 0.02
SCHEMA_VERSION = 1


def causal(family: str) -> bool:
    """A decoder-only family (perplexity on text windows) rather than Switch's seq2seq (target NLL on pairs)."""
    return not get_family(family).encoder_decoder


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
            task = "lm" if causal(family) else "span"
        out[name] = {"domain": domain, "task": "lm" if causal(family) else task}
    return out


def zoo_params(dirs: dict[str, Path], family: str) -> dict:
    """The recipe parameters the variants were built with (manifest), else the full-size recipe's."""
    manifest = Path(next(iter(dirs.values()))).parent / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["params"]
    return zoo_mod.recipe_params({"mixtral": "mixtral-tiny", "qwen3_moe": "qwen3-moe-tiny"}.get(family, "switch-tiny"))


def validation_tokens(domain: str) -> torch.Tensor:
    """The zoo's held-out tail of a domain's training file (bytes; never trained on by the zoo)."""
    raw = (data_dir() / zoo_mod.TRAIN_FILES[domain]).read_bytes()
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    return ids[int(len(ids) * (1 - zoo_mod.HELD_OUT_FRACTION)):]


def _set_key(family: str, domain: str, task: str) -> str:
    return domain if causal(family) else f"{task}/{domain}"


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
    if not pairs:
        raise QualityError("seq2seq_nll: no pairs")
    total, scored = 0.0, 0
    for batch in seq2seq_batches(pairs, decoder_start_id, batch_size):
        tgt = batch["labels"]
        logp = torch.log_softmax(model_fn(batch["input_ids"], batch["decoder_input_ids"]).float(), dim=-1)
        total += -logp.gather(-1, tgt[..., None].to(logp.device)).sum(dtype=torch.float64).item()
        scored += tgt.numel()
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
        return hf_generate(get(v), family, enc, max_new_tokens=n, eos_token_id=eos)

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
            return call(v, lambda: hf_generate(mvm.model, mvm.family, enc, max_new_tokens=n, eos_token_id=eos))

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
    tied = {n for names in tied_aliases(model).values() for n in names[1:]}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise QualityError(f"merged state dict does not fit {model_cls.__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------- memory


def separate_bytes(vs: VariantSet, dtype) -> int:
    """Device bytes of the variants as separate models (experts + non-expert tensors) in ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    H, I = vs.hidden_size, vs.intermediate_size
    per_expert = ((2 * I if vs.gated else I) * H + H * I) * itemsize
    experts = vs.num_layers * vs.num_experts * per_expert
    return len(vs) * (experts + plan_mod.non_expert_nbytes(vs[0], dtype))


def plan_device_bytes(p, vs: VariantSet, dtype) -> int:
    """Device bytes of serving every variant at once under plan ``p`` in ``dtype``: the slab (dense slots and
    delta pools, scales and factors in ``dtype``) plus every variant's non-expert set."""
    from ..delta import DESC_BYTES, spec_nbytes

    itemsize = torch.empty((), dtype=dtype).element_size()
    slot = p.slot_nbytes // torch.empty((), dtype=plan_mod.common.to_dtype(p.dtype)).element_size() * itemsize
    n1 = 2 * p.intermediate_size if p.gated else p.intermediate_size
    deltas = sum(spec_nbytes(d["spec"], n1, p.hidden_size, p.intermediate_size, itemsize) for d in p.deltas)
    if p.deltas:
        deltas += DESC_BYTES * len(p.slot_sources)
    return ((p.num_device_slots + p.cache_slots) * slot + deltas
            + len(vs) * plan_mod.non_expert_nbytes(vs[0], dtype))


def memory_of_plan(p, vs: VariantSet) -> dict:
    """Device bytes and memory ratio (against the variants as separate models) in fp32 and bf16."""
    out = {}
    for tag, dt in (("", torch.float32), ("_bf16", torch.bfloat16)):
        b = plan_device_bytes(p, vs, dt)
        out[f"device_bytes{tag}"] = b
        out[f"ratio{tag}"] = b / separate_bytes(vs, dt)
    return out


def memory_of_models(n_models: int, vs: VariantSet) -> dict:
    """``n_models`` whole models resident (the originals: one per variant; a merge: one for all)."""
    return {"device_bytes": n_models * separate_bytes(vs, torch.float32) // len(vs), "ratio": n_models / len(vs),
            "device_bytes_bf16": n_models * separate_bytes(vs, torch.bfloat16) // len(vs),
            "ratio_bf16": n_models / len(vs)}


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
        if causal(self.family):
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


def cost_batches(vs: VariantSet, val_data: dict, own: dict, family: str, window: int | None,
                 decoder_start: int | None, tokens: int = CALIB_TOKENS) -> dict:
    """Calibration batches of each variant for the ``loss`` criterion: its own domain's validation text
    (the zoo's held-out tail, never the test split); variants without a domain use the general sets'."""
    from ..criterion import lm_batches, seq2seq_batches

    out = {}
    for name in vs.names:
        key = own[name] or _set_key(family, GENERAL_SETS[0], "span")
        data = val_data[key]
        if causal(family):
            out[name] = lm_batches(data, seq_len=window, max_tokens=tokens, batch_size=8)
        else:
            pairs, n = [], 0
            for p in data:
                if n >= tokens:
                    break
                pairs.append(p)
                n += len(p[1])
            out[name] = seq2seq_batches(pairs, decoder_start, batch_size=16)
    return out


def _calibration(vs: VariantSet, val_data: dict, own: dict, family: str, tokens: int = 512):
    """Recorded MoE inputs of the anchor on validation text of every domain present (equal shares)."""
    keys = sorted({k for k in own.values() if k} | set(val_data) & {_set_key(family, d, "span") for d in GENERAL_SETS})
    per = max(1, tokens // max(1, len(keys)))
    anchor = vs[0]
    if causal(family):
        ids = [val_data[k][:per].tolist() for k in keys]
    else:
        ids = [sum((p[0] for p in val_data[k]), [])[:per] for k in keys]
    ids = [i for chunk in ids for i in chunk]
    from ..tokenizer import TOKENIZER_FILE
    if (Path(anchor.path) / TOKENIZER_FILE).exists() and max(ids) < 256:
        text = bytes(ids).decode("utf-8", errors="replace")
        return plan_mod.calibration_from_text(anchor, text, max_tokens=tokens), "calibration_from_text"
    # no byte tokenizer (user checkpoints, test models): record on the validation ids directly
    model = load_hf(anchor.path, family)
    batches = [torch.tensor([ids[i:i + 128]]) for i in range(0, len(ids), 128)]
    inputs = [{"input_ids": b} if causal(family) else {"input_ids": b, "decoder_input_ids": b} for b in batches]
    return plan_mod.record_calibration(model, anchor.moe_layers, inputs, max_tokens=tokens), "record_calibration"
