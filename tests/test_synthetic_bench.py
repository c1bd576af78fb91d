"""The synthetic-shape batching bench end to end at a test shape, for every family it builds: every system serves
every request (or is skipped with the plan's refusal), the exact plan's greedy tokens equal transformers', the
roofline counter adds up, and the JSON carries one ratio entry per codec plan run."""

import json
import os

import pytest
import torch

from multimoe_rt.benchmarks import synthetic, synthetic_models
from multimoe_rt.errors import UsageError

# GPT-OSS's experts carry biases: the plan keeps or shares them, never as deltas, so no codec and no measured-loss
# plan (which ranks codecs) runs for it.
REFUSED = {"mixtral": set(), "deepseek_v3": set(), "gpt_oss": {*synthetic.CODECS, "mixed_plan"}}


@pytest.fixture(scope="module", params=synthetic_models.FAMILIES)
def out(request, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # the variants' cache goes under ~/.cache
    try:
        yield synthetic.run("test", torch.float32, n_variants=3, seqs=6, prompt_len=5, new_tokens=4, reps=1,
                            calib_tokens=128, out_dir=home / "res", log=None, family=request.param)
    finally:
        if old is not None:
            os.environ["HOME"] = old


def test_every_system_serves_every_token_or_is_skipped_with_the_reason(out):
    refused = REFUSED[out["family"]]
    assert set(out["systems"]) == set(synthetic.SYSTEMS) - refused
    assert set(out["skipped"]) == refused
    for s, why in out["skipped"].items():
        assert "bias" in why, (s, why)  # the plan's own refusal, not a blank
    for s, r in out["systems"].items():
        assert r["tokens_per_s"] > 0, s
    saved = json.loads(open(out["files"]["json"]).read())
    assert saved["family"] == out["family"] and saved["skipped"] == out["skipped"]
    assert set(saved["ratios"]) == {*synthetic.CODECS, "mixed_plan", "mixed_shared"} - refused
    for s, r in saved["ratios"].items():
        assert {"vs_one_variant", "vs_mixed_dense", "vs_transformers", "bytes_vs_transformers", "vs_roofline"} <= set(r), s
    table = synthetic.table(saved)
    assert out["family"] in table.splitlines()[0]
    assert all(f"{s}" in table and "skipped" in table for s in refused)


def test_the_exact_plan_decodes_transformers_greedy_tokens(out):
    # Own dense copies in fp32: the same function as each variant's transformers model, so every request's greedy
    # continuation is the same (the engine batches all variants at once; transformers runs each alone).
    assert out["greedy_agreement_with_transformers"]["mixed_dense"] == 1.0


def test_the_json_and_table_name_the_family(out):
    name = os.path.basename(out["files"]["json"])
    if out["family"] == "mixtral":
        assert name == "batching-synthetic-test-float32-3v.json"  # the committed Mixtral results keep their names
    else:
        assert name == f"batching-synthetic-test-float32-{out['family']}-3v.json"


def test_the_roofline_counter_follows_the_plans(out):
    rows = out["systems"]
    expert = {s: rows[s]["step_bytes"]["expert_bytes"] for s in rows if "step_bytes" in rows[s]}
    assert expert["mixed_dense"] > expert["mixed_shared"]
    if out["family"] != "gpt_oss":
        # Dense own copies read more expert bytes than any delta plan, which read more than everything shared;
        # sign1 deltas are the smallest, int4 larger.
        assert expert["mixed_dense"] > expert["int4"] > expert["sign1"] > expert["mixed_shared"]
        assert rows["mixed_dense"]["device_bytes"] > rows["int4"]["device_bytes"] > rows["sign1"]["device_bytes"]
    assert rows["mixed_shared"]["step_bytes"]["expert_bytes"] == pytest.approx(
        rows["one_variant"]["step_bytes"]["expert_bytes"], rel=0.05)
    for s in expert:
        sb = rows[s]["step_bytes"]
        assert sb["kv_bytes"] > 0 and sb["non_expert_bytes"] > 0, s


def test_the_kv_counter_reads_each_layers_window(out):
    # gpt_oss's test window (3) is shorter than the context (5 prompt + 2): its sliding layer reads 3 positions
    # per sequence, its full layer the whole context; the other families read the whole context in every layer.
    sb = out["systems"]["one_variant"]["step_bytes"]
    context = 5 + 4 // 2
    cfg = out["config"]
    if out["family"] == "deepseek_v3":
        per_token_layer = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
        positions = cfg["num_hidden_layers"] * context
    else:
        per_token_layer = 2 * cfg["num_key_value_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) * 4
        positions = sum(min(context, cfg["sliding_window"]) if t == "sliding_attention" else context
                        for t in cfg.get("layer_types", ["full_attention"] * cfg["num_hidden_layers"]))
    assert sb["kv_bytes"] == pytest.approx(out["sequences"] * per_token_layer * positions)


def test_an_unknown_family_or_shape_is_one_clear_line():
    with pytest.raises(UsageError, match="unknown family 'qwen'.*mixtral"):
        synthetic_models.shape_config("qwen", "mid")
    with pytest.raises(UsageError, match="unknown shape 'huge'"):
        synthetic_models.shape_config("gpt_oss", "huge")
