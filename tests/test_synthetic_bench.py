"""The synthetic-shape batching bench end to end at a test shape: every system serves every request, the
roofline counter adds up, and the JSON carries one ratio entry per codec plan."""

import json
import os

import pytest
import torch

from multimoe_rt.benchmarks import synthetic


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # the variants' cache goes under ~/.cache
    try:
        yield synthetic.run("test", torch.float32, n_variants=3, seqs=6, prompt_len=5, new_tokens=4, reps=1,
                            calib_tokens=128, out_dir=home / "res", log=None)
    finally:
        if old is not None:
            os.environ["HOME"] = old


def test_every_system_serves_every_token(out):
    assert set(out["systems"]) == set(synthetic.SYSTEMS)
    for s, r in out["systems"].items():
        assert r["tokens_per_s"] > 0, s
    saved = json.loads(open(out["files"]["json"]).read())
    assert set(saved["ratios"]) == {*synthetic.CODECS, "mixed_plan", "mixed_shared"}
    for s, r in saved["ratios"].items():
        assert {"vs_one_variant", "vs_mixed_dense", "vs_transformers", "bytes_vs_transformers", "vs_roofline"} <= set(r), s


def test_the_roofline_counter_follows_the_plans(out):
    rows = out["systems"]
    expert = {s: rows[s]["step_bytes"]["expert_bytes"] for s in rows if "step_bytes" in rows[s]}
    # Dense own copies read more expert bytes than any delta plan, which read more than everything shared;
    # sign1 deltas are the smallest, int4 larger.
    assert expert["mixed_dense"] > expert["int4"] > expert["sign1"] > expert["mixed_shared"]
    assert rows["mixed_shared"]["step_bytes"]["expert_bytes"] == pytest.approx(
        rows["one_variant"]["step_bytes"]["expert_bytes"], rel=0.05)
    assert rows["mixed_dense"]["device_bytes"] > rows["int4"]["device_bytes"] > rows["sign1"]["device_bytes"]
