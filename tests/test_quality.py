"""Smoke test of bench/quality.py on tiny random Mixtral variants with a fake data slice (seconds).

Checks the JSON schema, that sharing 0 reproduces the original models (fp32: rel err <= 1e-5 on perplexity,
the two paths sum the experts in different orders), that every system scored the same tokens, that the plot is
written, and the batched seq2seq NLL against ``evaluate.seq2seq_loss`` (float64 sums: rel err <= 1e-9 on toy logits).
"""
import json
import math
from pathlib import Path

import pytest
import torch

from multimoe_rt.cli import build_parser
from multimoe_rt.lab.evaluate import seq2seq_loss
from tiny_models import MIXTRAL, save_variants

FP32 = 1e-5


def _quality():
    from multimoe_rt.benchmarks import quality

    return quality


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    q = _quality()
    tmp = tmp_path_factory.mktemp("quality")
    paths = save_variants(tmp, "mixtral", n=3)
    # names that are data set names give each variant an own-domain set (as zoo manifests do)
    dirs = {"wikitext2": paths[0], "ptb": paths[1], "shakespeare": paths[2]}
    g = torch.Generator().manual_seed(0)
    vocab = MIXTRAL["vocab_size"]
    test = {k: torch.randint(0, vocab, (200,), generator=g) for k in dirs}
    val = {k: torch.randint(0, vocab, (100,), generator=g) for k in dirs}
    threads = torch.get_num_threads()
    # one thread: these models are tiny, and on a shared 2-core machine OpenMP workers fighting other jobs
    # make the run ~8x slower
    torch.set_num_threads(1)
    try:
        res = q.run_quality(dirs, label="tiny", window=16, max_windows=4, val_windows=2, seeds=2,
                            levels=(0.0, 0.5, 1.0), ta_grid=(0.3, 1.0), ties_grid=(1.0,), out_dir=tmp / "out",
                            test_data=test, val_data=val, progress=False, uniform_deltas=("sign1", "lowrank4"),
                            mixed_ratios=(0.1, 0.75), codecs=("sign1", "lowrank4"), fast_ratios=(0.8,))
    finally:
        torch.set_num_threads(threads)
    return q, res


def test_json_schema(result):
    q, res = result
    doc = json.loads(Path(res["json"]).read_text())
    for key in ("schema", "label", "family", "variants", "eval_sets", "own_set", "protocol", "merge", "machine",
                "systems", "within_2pct", "findings", "elapsed_s"):
        assert key in doc, key
    for key in ("platform", "cpu", "torch"):
        assert doc["machine"][key]
    assert doc["variants"] == ["wikitext2", "ptb", "shakespeare"]
    assert doc["eval_sets"]["shakespeare"] == ["wikitext2", "ptb", "shakespeare"]
    kinds = {s["kind"] for s in doc["systems"]}
    assert kinds == {"original", "ours", "no_reconfig", "ours_random_seed", "ours_random", "merge", "ours_delta",
                     "ours_mixed"}
    # the mixed plan at 0.1 of the bytes cannot hold one copy per expert: skipped with the reason
    assert [s["name"] for s in doc["skipped_systems"]] == ["ours mixed @0.10"]
    names = [s["name"] for s in doc["systems"]]
    assert len(names) == len(set(names))
    for pol in ("l2/global", "l2/per_layer", "output/global", "loss/global"):
        assert q.ours_curve(doc, pol).keys() == {0.0, 0.5, 1.0}
    rnd = q.ours_curve(doc, "random")[0.5]["results"]["ptb"]["ptb"]
    seeds = [s["results"]["ptb"]["ptb"]["ppl"] for s in doc["systems"]
             if s["kind"] == "ours_random_seed" and s["share"] == 0.5]
    assert len(seeds) == 2 and len(set(seeds)) == 2  # the seeds drew different plans
    assert rnd["ppl"] == pytest.approx(sum(seeds) / 2) and (rnd["ppl_min"], rnd["ppl_max"]) == (min(seeds), max(seeds))
    assert {s.get("method") for s in doc["systems"] if s["kind"] == "merge"} == {"average", "task_arithmetic", "ties"}
    assert doc["merge"]["task_arithmetic"]["chosen_scale"] in (0.3, 1.0)
    for s in doc["systems"]:
        for v in doc["variants"]:
            for k in doc["eval_sets"][v]:
                r = s["results"][v][k]
                assert r["tokens_scored"] > 0 and math.isfinite(r["ppl"]) and r["ppl"] > 1
    for v in doc["variants"]:
        assert set(doc["within_2pct"][v]) >= {"set", "original_ppl", "l2/global", "random/global", "loss/global"}
        w = doc["within_2pct_memory_ratio"][v]
        # the originals are within 2% of themselves at ratio 1: every variant has an answer <= 1
        assert 0 < w["ratio"] <= 1 and w["policy"] and 0 < w["ratio_bf16"] <= 1
    for s in doc["systems"]:
        if s["kind"] not in ("no_reconfig", "ours_random_seed"):
            m = s["memory"]
            assert 0 < m["ratio"] <= 1 and m["device_bytes"] > 0
    orig = next(s for s in doc["systems"] if s["kind"] == "original")
    assert orig["memory"]["ratio"] == 1.0
    deltas = [s for s in doc["systems"] if s["kind"] == "ours_delta"]
    assert [s["spec"] for s in deltas] == ["sign1", "lowrank4"]
    allshared = next(s for s in doc["systems"] if s["kind"] == "ours" and s["share"] == 1.0
                     and s["representative"] == "anchor")
    own = next(s for s in doc["systems"] if s["kind"] == "ours" and s["share"] == 0.0)
    for s in deltas:  # a delta costs bytes over sharing, and far fewer than own copies
        assert allshared["memory"]["ratio"] < s["memory"]["ratio"] < own["memory"]["ratio"]
    assert set(doc["criterion"]) == {"ptb", "shakespeare"}
    fast = next(s for s in doc["systems"] if s.get("policy") == "mixed lowrank-only")
    assert fast["codecs"] == ["lowrank4"] and set(fast["deltas_by_spec"]) <= {"lowrank4"}
    assert q.format_table(doc).count("\n") > len(doc["systems"]) // 2


def test_share_zero_is_the_original(result):
    _, res = result
    orig = next(s for s in res["systems"] if s["kind"] == "original")
    zero = next(s for s in res["systems"] if s["kind"] == "ours" and s["share"] == 0.0)
    assert all(f == 0.0 for v, f in zero["sharing_actual"].items() if f is not None)
    for v in res["variants"]:
        for k in res["eval_sets"][v]:
            a, b = zero["results"][v][k]["ppl"], orig["results"][v][k]["ppl"]
            assert abs(a - b) <= FP32 * b, (v, k, a, b)
    # full sharing really changes the non-anchor variants (the bench is not comparing a model with itself)
    full = next(s for s in res["systems"] if s["kind"] == "ours" and s["share"] == 1.0
                and s["representative"] == "anchor")
    assert full["results"]["ptb"]["ptb"]["ppl"] != orig["results"]["ptb"]["ptb"]["ppl"]
    # no-reconfig at full sharing with the anchor representative is the base model for every variant
    nr = next(s for s in res["systems"] if s["kind"] == "no_reconfig" and s["share"] == 1.0
              and s["representative"] == "anchor")
    for v in res["variants"]:
        assert abs(nr["results"][v]["ptb"]["ppl"] / orig["results"]["wikitext2"]["ptb"]["ppl"] - 1) <= FP32


def test_same_tokens_for_every_system(result):
    _, res = result
    expected = 4 * 15  # 4 non-overlapping windows of 16 tokens, 15 predictions each
    assert res["protocol"]["tokens_scored"] == {"wikitext2": expected, "ptb": expected, "shakespeare": expected}
    for s in res["systems"]:
        for v in res["variants"]:
            for k in res["eval_sets"][v]:
                assert s["results"][v][k]["tokens_scored"] == expected, (s["name"], v, k)


def test_plot_written(result):
    _, res = result
    pytest.importorskip("matplotlib")
    path = Path(res["plot"])
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seq2seq_nll_matches_evaluate():
    q = _quality()
    g = torch.Generator().manual_seed(1)
    table = torch.randn(10, 10, generator=g)

    def fn(enc, dec):  # next-token logits from the decoder token and the encoder's first token
        return table[dec] + table[enc[:, :1]]

    pairs = [(torch.randint(0, 10, (5,), generator=g).tolist(), torch.randint(0, 10, (n,), generator=g).tolist())
             for n in (3, 3, 4, 3)]
    a = q.seq2seq_nll(fn, pairs, decoder_start_id=0, batch_size=2)
    b = seq2seq_loss(fn, pairs, decoder_start_id=0)
    assert a["tokens_scored"] == b["tokens_scored"] == 13
    assert abs(a["nll"] - b["nll"]) <= 1e-9 * abs(b["nll"])


def test_cli_parser():
    args = build_parser().parse_args(["eval", "--recipe", "both", "--small", "--max-windows", "5", "--seeds", "4"])
    assert (args.recipe, args.small, args.max_windows, args.seeds) == ("both", True, 5, 4)
    assert args.func.__name__ == "cmd_eval"
