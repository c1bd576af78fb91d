"""multimoe_rt.benchmarks.batching end to end on tiny models: every system serves the trace and the JSON carries the ratios."""

import json

from multimoe_rt.benchmarks import batching
from tiny_models import save_variants


def test_batching_bench_runs_every_system_and_writes_the_ratios(tmp_path):
    bench = batching
    dirs = save_variants(tmp_path, "mixtral", n=3)
    out = bench.run({d.name: d for d in dirs}, shapes=("paper",), n_sat=6, n_sweep=4, rate_factors=(0.5,),
                    max_seqs=8, progress=False, tag="t", out_dir=tmp_path / "res")
    saved = json.loads((tmp_path / "res" / "t.json").read_text())
    paper = saved["shapes"]["paper"]
    assert set(paper["saturated"]) == {"mixed", "one_variant", "grouped", "per_variant", "batch1", "transformers"}
    for system, r in paper["saturated"].items():
        assert r["requests"] == 6 and r["tokens"] == 6 * 25, system  # every request got all its tokens
        assert 0 < r["ttft_mean"] <= r["turnaround_mean"]
    assert {r["system"] for r in paper["sweep"]} == set(paper["saturated"])
    for key in ("mixed_vs_batch1_throughput", "mixed_vs_single_variant_throughput", "mixed_vs_transformers_throughput"):
        assert saved["ratios"][key] > 0
    text = bench.table(out)
    assert all(f"\n{system} " in text for system in paper["saturated"])
