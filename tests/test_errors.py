"""The project's error classes, and a fast pass of the reliability suite (multimoe_rt/benchmarks/reliability.py): bursts with bad
requests, shutdown midway, a foreign thread submitting and cancelling, injected faults, reader fuzzing, RSS over
switches."""

import json

import pytest

from multimoe_rt import errors
from tiny_models import save_variants



def test_every_error_class_is_a_multimoe_error_and_keeps_its_builtin_base():
    from multimoe_rt.checkpoint import CheckpointError
    from multimoe_rt.engine import QueueFull
    from multimoe_rt.plan import PlanError
    from multimoe_rt.reconfig import SwitchError
    from multimoe_rt.errors import EngineClosed, RequestError

    expected = {CheckpointError: ValueError, PlanError: ValueError, RequestError: ValueError, QueueFull: ValueError,
                EngineClosed: RuntimeError, SwitchError: RuntimeError, errors.UnknownVariant: KeyError,
                errors.UsageError: ValueError}
    for cls, builtin in expected.items():
        assert issubclass(cls, errors.MultimoeError) and issubclass(cls, builtin), cls
    # one class each, wherever it is imported from
    assert CheckpointError is errors.CheckpointError and PlanError is errors.PlanError
    assert RequestError is errors.RequestError and SwitchError is errors.SwitchError
    assert str(errors.UnknownVariant("unknown variant 'x'")) == "unknown variant 'x'"  # no KeyError quotes


def _reliability():
    from multimoe_rt.benchmarks import reliability

    return reliability


def test_reliability_suite_fast_pass(tmp_path):
    """0 lost, 0 wrong, only clean errors, on tiny variants with small counts (the bench runs 1,000 requests)."""
    rel = _reliability()
    dirs = {p.name: p for p in save_variants(tmp_path, "mixtral", n=3)}
    res = rel.run(dirs, n=80, threads=6, switches=60, fuzz_files=60, fuzz_plans=40, progress=False)
    text = rel.table(res)
    assert res["passed"], text
    b = res["burst"]
    assert b["lost"] == 0 and b["wrong"] == 0 and b["rejected"] == b["bad"] == 4 and b["ok"] == 76
    s = res["burst_shutdown"]
    assert s["accounted"] and s["lost"] == 0 and s["wrong"] == 0
    f = res["foreign_thread"]
    assert f["wrong"] == 0 and f["ok"] == 80 and f["foreign_requests"] > 0
    assert b["set_loads"] > 0 and f["set_loads"] > 0  # serving reloaded sets under the load
    assert {x["fault"] for x in res["faults"]} >= {"set load raises mid-copy", "NaN tensor at load",
                                                   "truncated shard at load", "allocation failure in a forward"}
    assert all(x["clean_error"] and x["serves_after"] for x in res["faults"])
    assert res["fuzz_safetensors"]["cases"] >= 60 and res["fuzz_safetensors"]["other"] == 0
    assert res["fuzz_plans"]["cases"] >= 40 and res["fuzz_plans"]["other"] == 0
    assert res["fuzz_plans"]["wrong_weights"] == 0
    assert res["rss"]["switches"] == 60
    assert res["alone_vs_transformers"] == "3/3"
    path = rel.write(res, tmp_path / "out")
    assert json.loads(path.read_text())["passed"] is True
    assert "verdict: PASS" in text


@pytest.mark.parametrize("argv", [["bench-reliability", "--requests", "0"], ["bench-reliability", "--out"]])
def test_bench_reliability_arguments_checked(argv, capsys):
    from multimoe_rt.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
