"""The command line: user errors answered in one line (exit 2) before any heavy work, --debug for the
traceback, --version, generate streamed to the terminal, zoo list|path|clean, results folder."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from multimoe_rt import cli
from multimoe_rt.benchmarks import results_dir
from multimoe_rt.cli import args as cli_args
from multimoe_rt.cli import commands as cli_commands
from multimoe_rt.cli import zoo as cli_zoo
from multimoe_rt.cli import main
from tiny_models import save_variants


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_variants(tmp_path_factory.mktemp("cli"), "mixtral", n=2)


def one_line_error(capsys, argv, *needles):
    """Run the CLI; expect exit 2 and exactly one stderr line naming the problem."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "Writing model shards" not in line and "Loading weights" not in line]
    assert rc == 2, err
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]
    assert "Traceback" not in err[0]
    return err[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("multimoe-rt ")


def test_user_errors_are_one_line(dirs, tmp_path, capsys, monkeypatch):
    # anything heavy would be a bug here: every one of these must be answered before loading or training
    monkeypatch.setattr(cli_commands, "_zoo_dirs", lambda *a, **k: pytest.fail("the zoo was touched"))
    d0, d1 = map(str, dirs)
    out = str(tmp_path / "p.json")
    one_line_error(capsys, ["plan", str(tmp_path / "missing"), "-o", out], "missing: no such directory")
    one_line_error(capsys, ["plan", d0, d1, "--budget", "abc", "-o", out], "--budget", "cannot parse size 'abc'")
    one_line_error(capsys, ["plan", d0, d1, "--threshold", "nan", "-o", out], "--threshold", "finite")
    one_line_error(capsys, ["plan", d0, d1, "--share", "1.5", "-o", out], "--share", "[0, 1]")
    one_line_error(capsys, ["plan", d0, d1, "--share", "0.5", "-o", str(tmp_path / "no" / "p.json")],
                   "folder", "does not exist", "mkdir -p")
    one_line_error(capsys, ["plan", d0, d1, "--share", "0.5", "--names", "a,b,c", "-o", out], "3 names for 2")
    one_line_error(capsys, ["plan", d0, d1, "--share", "0.5", "--anchor", "5", "-o", out], "--anchor 5")
    one_line_error(capsys, ["bench-qos", "--rates", "0"], "--rates", "must be > 0")
    one_line_error(capsys, ["bench-qos", "--rates", "2,x"], "'x' is not a number")
    one_line_error(capsys, ["bench-qos", "-n", "0"], "--requests")
    one_line_error(capsys, ["bench-qos", "--systems", "ours,mig"], "--systems", "mig")
    one_line_error(capsys, ["bench-qos", "--share", "2"], "--share")
    one_line_error(capsys, ["demo", "-n", "0"], "--requests")
    one_line_error(capsys, ["demo", "--recipe", "switch-tiny"], "--recipe", "invalid choice")
    monkeypatch.setenv("MULTIMOE_DATA", str(tmp_path))
    one_line_error(capsys, ["demo", "--small"], "MULTIMOE_DATA", "SHA256SUMS")
    monkeypatch.delenv("MULTIMOE_DATA")
    if not torch.cuda.is_available():
        one_line_error(capsys, ["demo", "--device", "cuda"], "CUDA is not available", "--device cpu")
    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, ["eval", "--out", str(tmp_path / "afile")], "is a file")
    one_line_error(capsys, ["generate", d0, d1, "--prompt-ids", "3,4", "-v", "nope"], "--variant 'nope'")
    one_line_error(capsys, ["generate", d0, d1], "--prompt")
    one_line_error(capsys, ["generate", d0, d1, "--prompt-ids", "3,x"], "--prompt-ids")
    one_line_error(capsys, ["nonsense"], "invalid choice")


def test_damaged_files_are_one_line_and_debug_shows_the_traceback(dirs, tmp_path, capsys):
    d0 = str(dirs[0])
    bad = tmp_path / "trunc"
    shutil.copytree(dirs[1], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    out = str(tmp_path / "p.json")
    one_line_error(capsys, ["plan", d0, str(bad), "--share", "0.5", "-o", out, "--quiet"],
                   "trunc/model.safetensors: truncated safetensors file", "--debug")
    from multimoe_rt.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="truncated"):
        main(["--debug", "plan", d0, str(bad), "--share", "0.5", "-o", out, "--quiet"])
    with pytest.raises(CheckpointError, match="truncated"):
        main(["plan", d0, str(bad), "--share", "0.5", "-o", out, "--quiet", "--debug"])
    plan = tmp_path / "plan.json"
    plan.write_text("[1, 2]")
    one_line_error(capsys, ["generate", d0, str(dirs[1]), "--prompt-ids", "3,4", "--plan", str(plan)],
                   "not a plan: expected a JSON object")


def test_generate_streams_the_variants_greedy_tokens(dirs, tmp_path, capsys):
    from multimoe_rt.model import MultiVariantModel
    from multimoe_rt.tokenizer import ByteTokenizer

    mine = []
    for d in dirs:  # give the tiny models the byte tokenizer (ids 33.. are inside their 64-token vocabulary)
        shutil.copytree(d, tmp_path / d.name)
        ByteTokenizer().save(tmp_path / d.name)
        mine.append(tmp_path / d.name)
    want = MultiVariantModel.from_pretrained(mine).generate("mixtral-v1", torch.tensor([[33, 35, 37]]),
                                                            max_new_tokens=6)
    capsys.readouterr()
    assert main(["generate", *map(str, mine), "-v", "mixtral-v1", "-p", "!#%", "-n", "6", "--ignore-eos",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text == ByteTokenizer().decode(want.reshape(-1).tolist()) + "\n"
    assert main(["generate", *map(str, dirs), "-v", "mixtral-v1", "--prompt-ids", "33,35,37", "-n", "6",
                 "--ignore-eos", "--quiet", "--share", "0"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in want.reshape(-1).tolist()]


def _fake_entry(root, small_zoo):
    src = next(iter(small_zoo["mixtral"].values())).parent
    entry = root / src.name
    shutil.copytree(src, entry)
    return entry


def test_zoo_list_path_clean(small_zoo, tmp_path, capsys):
    root = tmp_path / "cache"
    entry = _fake_entry(root, small_zoo)
    temp = root / f".{entry.name}.tmp-12345"
    (temp / "base").mkdir(parents=True)
    assert main(["zoo", "list", "--cache", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"zoo cache: {root}" in out and f"{entry.name}" in out and "ok" in out and "temporary" in out
    assert main(["zoo", "path", "--root", "--cache", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root)
    assert main(["zoo", "path", "--small", "--cache", str(root)]) == 0  # the entry a command would use
    assert Path(capsys.readouterr().out.strip()).parent == root
    # a damaged entry is named, and the command that would reuse it says exactly what to delete
    victim = entry / "ptb" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:1000])
    assert main(["zoo", "list", "--cache", str(root)]) == 0
    assert "DAMAGED" in capsys.readouterr().out
    assert cli_zoo.check_zoo_entry(entry) is not None
    assert main(["zoo", "clean", "--cache", str(root)]) == 0  # temporaries only
    assert not temp.exists() and entry.exists()
    assert main(["zoo", "clean", "--cache", str(root), "--damaged"]) == 0
    assert not entry.exists()
    capsys.readouterr()
    one_line_error(capsys, ["zoo", "clean", "--cache", str(root), "--entry", "nope"], "no zoo entry 'nope'")


def test_damaged_zoo_entry_is_refused_with_the_path_to_delete(small_zoo, tmp_path, monkeypatch):
    from multimoe_rt.errors import UsageError

    root = tmp_path / "cache"
    entry = _fake_entry(root, small_zoo)
    monkeypatch.setattr(cli_zoo, "_zoo_entry", lambda *a, **k: entry)
    victim = entry / "shakespeare" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(UsageError, match=rf"{entry} is damaged .*truncated.* rm -r {entry}"):
        cli_zoo._zoo_dirs("mixtral-tiny", True, quiet=True)
    # checksums, where the manifest has them, catch a flipped byte that keeps the size
    shutil.rmtree(entry)
    entry = _fake_entry(root, small_zoo)
    man = json.loads((entry / "manifest.json").read_text())
    import hashlib

    man["files_sha256"] = {str(p.relative_to(entry)): hashlib.sha256(p.read_bytes()).hexdigest()
                           for p in entry.rglob("*.safetensors")}
    (entry / "manifest.json").write_text(json.dumps(man))
    assert cli_zoo.check_zoo_entry(entry) is None
    f = entry / "ptb" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "checksum differs" in cli_zoo.check_zoo_entry(entry)


def test_ctrl_c_removes_this_processes_unfinished_zoo_build(tmp_path, monkeypatch, capsys):
    root = tmp_path / "cache"
    temp = root / f".mixtral-tiny-small-0123456789ab.tmp-{os.getpid()}"
    other = root / ".mixtral-tiny-small-0123456789ab.tmp-1"

    def interrupted(args):
        (temp / "base").mkdir(parents=True)
        other.mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_zoo_build", interrupted)
    assert main(["zoo", "build", "--cache", str(root), "--quiet"]) == 130
    assert not temp.exists() and other.exists()  # another process's build is left alone
    assert "interrupted" in capsys.readouterr().err


def test_results_go_to_one_documented_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTIMOE_RESULTS", str(tmp_path / "r"))
    assert results_dir(create=False) == tmp_path / "r"
    assert results_dir(tmp_path / "o", create=False) == tmp_path / "o"
    monkeypatch.delenv("MULTIMOE_RESULTS")
    assert results_dir(create=False) == Path.home() / ".cache" / "multimoe_rt" / "results"
    args = cli.build_parser().parse_args(["eval", "--small"])
    assert args.out is None and cli_args._results(args) == results_dir(create=False)


def test_plan_arguments_a_new_user_gets_wrong(tmp_path, capsys):
    dirs = save_variants(tmp_path, "mixtral", n=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()  # the save's progress output
    one_line_error(capsys, ["plan", str(empty), "--share", "0.5"], "no config.json")
    one_line_error(capsys, ["generate", str(empty), "--prompt-ids", "1,2"], "no config.json")
    out = str(tmp_path / "p.json")
    one_line_error(capsys, ["plan", str(dirs[0]), str(dirs[0]), "--share", "0.5", "-o", out], "given twice", "--names")
    one_line_error(capsys, ["plan", *map(str, dirs), "--budget", "30Mb", "-o", out], "capital B")
    # A budget too small for one copy per expert: the fix is named as the flag, not a Python keyword.
    one_line_error(capsys, ["plan", *map(str, dirs), "--budget", "1KB", "-o", out, "--quiet"],
                   "--offload")


def test_help_of_the_heavy_commands_imports_no_harness():
    """`--help` answers from the parser alone: neither the QoS harness nor the demo's is imported."""
    import subprocess
    import sys

    code = ("import sys\nfrom multimoe_rt.cli import main\nfor cmd in ('bench-qos', 'demo'):\n"
            "    try:\n        main([cmd, '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('multimoe_rt.benchmarks.qos', 'multimoe_rt.benchmarks.demo') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: multimoe-rt bench-qos" in out and "usage: multimoe-rt demo" in out
    assert out.strip().splitlines()[-1] == "[]"


def test_demo_serves_the_variants_live_on_the_plan_within_2pct(tmp_path, monkeypatch, capsys):
    """The demo's core on tiny random variants: the JSON holds every per-variant field, the budgets are tried
    smallest first and the chosen one is the first within 2%, and the engine's greedy tokens equal each variant's
    own transformers model (a 1.05x budget holds every expert dense, exact by construction; at exactly 1.0x the
    mixed plan's per-slot delta descriptors would not fit)."""
    from multimoe_rt.benchmarks import demo

    dirs = {d.name: d for d in save_variants(tmp_path, "mixtral", n=3)}
    g = torch.Generator().manual_seed(0)
    test, val = ({"wikitext2": torch.randint(3, 64, (600,), generator=g)} for _ in range(2))
    out = demo.run(dirs, ratios=(1.05, 0.4), n_sat=6, n_poisson=3, shape=(4, 5), window=32, max_windows=3,
                   val_windows=2, calib_tokens=64, test_data=test, val_data=val, out_dir=tmp_path / "r",
                   progress=False, log=None)
    doc = json.loads(Path(out["files"]["json"]).read_text())
    assert Path(out["files"]["plot"]).is_file() and out["files"]["plot"].endswith(".png")
    names = list(dirs)
    assert doc["variants"] == names and doc["within"] == 0.02
    # budgets smallest first: 0.4x cannot hold one copy of each expert, 1.05x holds them all
    assert [c["budget_ratio"] for c in doc["candidates"]] == [0.4, 1.05]
    assert not doc["candidates"][0]["within"] and "cannot hold" in doc["candidates"][0]["why"]
    chosen = doc["candidates"][1]
    assert chosen["within"] and doc["plan"]["budget_ratio"] == 1.05 and not doc["plan"]["exact_fallback"]
    assert all(chosen["val_ppl"][v] <= 1.02 * chosen["own_val_ppl"][v] for v in names)
    assert doc["plan"]["deltas_by_spec"] == {}
    full = doc["per_variant"][names[0]]["full_model_bytes"]
    for v in names:
        r = doc["per_variant"][v]
        assert r["greedy_equal"] and r["greedy_same_prefix"] == 5, (v, doc["greedy"][v])
        assert doc["greedy"][v]["engine"] == doc["greedy"][v]["transformers"]
        assert r["ppl"] == pytest.approx(r["own_model_ppl"], rel=1e-5)   # dense copies: the same function
        assert r["full_model_bytes"] == full and 0 < r["device_bytes"] <= full
        for k in ("tokens_per_s", "transformers_tokens_per_s", "ttft_mean_s", "transformers_ttft_mean_s"):
            assert r[k] > 0, k
    t = doc["total"]
    assert t["device_bytes"] == sum(doc["per_variant"][v]["device_bytes"] for v in names)
    assert t["separate_bytes"] == len(names) * full
    assert t["bytes_ratio"] == pytest.approx(t["device_bytes"] / t["separate_bytes"])
    assert doc["serving"]["saturated"]["engine"]["tokens"] == 6 * 5
    assert doc["serving"]["poisson"]["transformers"]["requests"] == 3
    text = demo.table(out)
    assert all(v in text for v in names) and "1.05x the bytes" in text


def test_demo_variants_are_checked_against_the_zoo(tmp_path, monkeypatch, capsys):
    zoo = {"base": tmp_path / "base", "ptb": tmp_path / "ptb"}
    monkeypatch.setattr(cli_commands, "_zoo_dirs", lambda *a, **k: dict(zoo))
    monkeypatch.setattr(cli_commands, "_bench_module", lambda name: pytest.fail(f"harness {name} imported"))
    one_line_error(capsys, ["demo", "--variants", "base,nope"], "--variants ['nope'] not among ['base', 'ptb']")
    one_line_error(capsys, ["demo", "--variants", "ptb"], "at least 2 variants")
