"""zoo.py: the small zoo builds, is named by a deterministic hash, records what it did, freezes what it says it
freezes, and its variants really differ from the base. Weight comparisons are exact (bytes)."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from multimoe_rt.lab import data, zoo
from multimoe_rt.checkpoint import load_variant
from multimoe_rt.cli import main as cli_main
from multimoe_rt.tokenizer import TOKENIZER_FILE, ByteTokenizer


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_small_zoo_layout(small_zoo):
    assert list(small_zoo["mixtral"]) == ["base", "ptb", "shakespeare", "pycode", "ptb-frozen"]
    assert list(small_zoo["switch"]) == ["base", "ptb", "shakespeare", "pycode", "wiki-continue"]
    for family in small_zoo.values():
        for d in family.values():
            assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
            assert ByteTokenizer.load(d).vocab_size == json.loads((d / "config.json").read_text())["vocab_size"]
            assert (d / TOKENIZER_FILE).is_file()


def test_hash_is_deterministic_and_names_the_entry(small_zoo):
    root = data.data_dir()
    params = zoo.recipe_params("mixtral-tiny", small=True)
    sums = data.checksums(zoo._used_files(params), root)
    h = zoo.recipe_hash("mixtral-tiny", True, sums)
    assert h == zoo.recipe_hash("mixtral-tiny", True, dict(sums))
    assert small_zoo["mixtral"]["base"].parent.name == f"mixtral-tiny-small-{h}"
    assert h != zoo.recipe_hash("mixtral-tiny", False, sums)
    changed = dict(sums)
    changed["ptb/validation.txt"] = "0" * 64
    assert h != zoo.recipe_hash("mixtral-tiny", True, changed)
    assert zoo.entry_dir("mixtral-tiny", small=True, cache_dir=small_zoo["mixtral"]["base"].parent.parent) == \
        small_zoo["mixtral"]["base"].parent


def test_manifest(small_zoo):
    for family, recipe in (("mixtral", "mixtral-tiny"), ("switch", "switch-tiny")):
        entry = small_zoo[family]["base"].parent
        m = zoo.load_manifest(entry)
        params = zoo.recipe_params(recipe, small=True)
        assert m["recipe"] == recipe and m["small"] is True and m["params"] == params
        sums = {rel.removeprefix("./"): h for h, rel in
                (line.split() for line in (data.data_dir() / "SHA256SUMS").read_text().splitlines())}
        assert m["data_sha256"] and all(sums[k] == v for k, v in m["data_sha256"].items())
        assert list(m["variants"]) == list(small_zoo[family])
        for name, info in m["variants"].items():
            steps = params["base"]["steps"] if name == "base" else params["variants"][name]["steps"]
            assert len(info["loss_curve"]) == steps == info["steps"]
            assert all(x == x and x > 0 for x in info["loss_curve"])
            row = m["summary"][name]
            assert row["ppl"] > 1 and row["base_ppl"] > 1
            if name != "base":
                # the summary matches the checkpoints on disk, recomputed here from the raw tensors
                b, v = load_variant(small_zoo[family]["base"]), load_variant(small_zoo[family][name])
                dist = sorted(float(torch.cat([(x.double() - y.double()).flatten() for x, y in zip(
                    v.expert(layer, e), b.expert(layer, e))]).norm() / torch.cat(
                    [y.double().flatten() for y in b.expert(layer, e)]).norm())
                    for layer in range(len(b.moe_layers)) for e in range(b.num_experts))
                d = row["expert_rel_l2"]
                assert d["count"] == len(dist) and d["identical"] == sum(x == 0 for x in dist)
                assert d["min"] == pytest.approx(dist[0]) and d["max"] == pytest.approx(dist[-1])
        # the base's training loss went down
        c = m["variants"]["base"]["loss_curve"]
        assert sum(c[-5:]) < sum(c[:5])


def test_frozen_layers_are_byte_identical_to_base(small_zoo):
    base, frozen = load_variant(small_zoo["mixtral"]["base"]), load_variant(small_zoo["mixtral"]["ptb-frozen"])
    L = len(base.moe_layers)
    m = zoo.load_manifest(small_zoo["mixtral"]["base"].parent)
    assert m["variants"]["ptb-frozen"]["frozen_expert_layers"] == list(range(L // 2))
    fb = safe_open(str(small_zoo["mixtral"]["base"] / "model.safetensors"), "pt")
    ff = safe_open(str(small_zoo["mixtral"]["ptb-frozen"] / "model.safetensors"), "pt")
    for layer in range(L):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            a, b = fb.get_tensor(key), ff.get_tensor(key)
            same = a.numpy().tobytes() == b.numpy().tobytes()
            assert same == (layer < L // 2), (key, same)
    # the rest of the model (attention, routers) did train in the frozen layers
    assert not torch.equal(base.tensor("model.layers.0.self_attn.q_proj.weight"),
                           frozen.tensor("model.layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(base.tensor("model.layers.0.mlp.gate.weight"), frozen.tensor("model.layers.0.mlp.gate.weight"))
    d = m["summary"]["ptb-frozen"]["expert_rel_l2"]
    assert d["identical"] == (L // 2) * base.num_experts and d["min"] == 0.0


@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_variants_differ_from_base_everywhere(small_zoo, family):
    dirs = small_zoo[family]
    base = load_variant(dirs["base"])
    for name, d in dirs.items():
        if name in ("base", "ptb-frozen"):
            continue
        v = load_variant(d)
        for layer in range(len(base.moe_layers)):
            for e in range(base.num_experts):
                assert not torch.equal(base.expert(layer, e)[0], v.expert(layer, e)[0]), (name, layer, e)
        assert _sha(d / "model.safetensors") != _sha(dirs["base"] / "model.safetensors")


def test_fine_tunes_improve_their_own_domain(small_zoo):
    # even the small recipe's few fine-tune steps must move each variant toward its domain
    for family in small_zoo:
        summary = zoo.load_manifest(small_zoo[family]["base"].parent)["summary"]
        for name, row in summary.items():
            if name != "base":
                assert row["ppl"] < row["base_ppl"], (family, name, row)


def test_cached_entry_is_reused_and_cli_prints_summary(small_zoo, capsys):
    cache = small_zoo["mixtral"]["base"].parent.parent
    mtime = (small_zoo["mixtral"]["base"] / "model.safetensors").stat().st_mtime_ns
    assert zoo.build("mixtral-tiny", small=True, cache_dir=cache, progress=False) == small_zoo["mixtral"]
    assert cli_main(["zoo", "build", "--recipe", "all", "--small", "--cache", str(cache), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mixtral-tiny (small)" in out and "switch-tiny (small)" in out and "ptb-frozen" in out
    assert (small_zoo["mixtral"]["base"] / "model.safetensors").stat().st_mtime_ns == mtime


def test_tampered_data_is_refused(tmp_path):
    src = data.data_dir()
    dst = tmp_path / "data"
    dst.mkdir()
    shutil.copy(src / "SHA256SUMS", dst / "SHA256SUMS")
    (dst / "ptb").mkdir()
    text = (src / "ptb" / "validation.txt").read_bytes()
    (dst / "ptb" / "validation.txt").write_bytes(text[:-1] + b"X")
    with pytest.raises(data.DataError, match=r"ptb/validation.txt: sha256 [0-9a-f]+ does not match SHA256SUMS"):
        data.checksums(["ptb/validation.txt"], dst)
    with pytest.raises(data.DataError, match=r"wikitext2/validation.txt: missing data file"):
        data.checksums(["wikitext2/validation.txt"], dst)
    with pytest.raises(data.DataError, match=r"has no SHA256SUMS"):
        data.data_dir(tmp_path)
    with pytest.raises(zoo.ZooError, match="unknown zoo recipe"):
        zoo.recipe_params("llama-tiny")


def test_span_corruption_round_trips():
    tok = ByteTokenizer()
    p = zoo.recipe_params("switch-tiny")
    window = list(range(65, 65 + 26)) * 5
    window = window[: p["input_len"]]
    src, tgt = zoo._span_corrupt(window, p, tok, torch.Generator().manual_seed(0))
    assert src[-1] == tgt[-1] == tok.eos_id
    # putting each hidden span back at its sentinel restores the window exactly
    spans, cur = {}, None
    for i in tgt[:-1]:
        if i >= tok.first_sentinel_id:
            cur = i
            spans[cur] = []
        else:
            spans[cur].append(i)
    restored = [b for i in src[:-1] for b in (spans[i] if i >= tok.first_sentinel_id else [i])]
    assert restored == window
    assert sum(len(s) for s in spans.values()) == round(len(window) * p["noise_density"])


@pytest.mark.slow
def test_rebuild_is_bit_identical(small_zoo, tmp_path):
    again = zoo.build("mixtral-tiny", small=True, cache_dir=tmp_path, progress=False)
    for name, d in small_zoo["mixtral"].items():
        assert _sha(again[name] / "model.safetensors") == _sha(d / "model.safetensors"), name


def test_recipes_are_data_and_the_cache_key_ignores_the_package_version(monkeypatch):
    import multimoe_rt

    assert sorted(zoo.RECIPES) == sorted(p.stem for p in zoo.RECIPE_DIR.glob("*.json"))
    sums = {"wikitext2/validation.txt": "0" * 64}
    key = zoo.recipe_hash("mixtral-tiny", True, sums)
    monkeypatch.setattr(multimoe_rt, "__version__", "99.0")
    assert zoo.recipe_hash("mixtral-tiny", True, sums) == key
    monkeypatch.setattr(zoo, "ZOO_CODE_VERSION", zoo.ZOO_CODE_VERSION + "x")
    assert zoo.recipe_hash("mixtral-tiny", True, sums) != key
    assert zoo.recipe_hash("mixtral-tiny", True, {**sums, "ptb/validation.txt": "1" * 64}) != key
