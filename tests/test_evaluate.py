"""Perplexity window accounting and values, seq2seq loss, ROUGE-1, and exact reading of shared/data.

Tolerances: perplexity values go through float32 log-softmax, so comparisons with float64 hand values use
rel err <= 1e-5 (fp32).
"""
import math

import pytest
import torch

from multimoe_rt.lab import data
from multimoe_rt.lab.evaluate import (DATASETS, evaluate_perplexity, hf_logits_fn, perplexity, rouge1,
                                  rouge_tokens, seq2seq_loss, window_plan)

FP32 = 1e-5


def close(a, b, tol=FP32):
    return abs(a - b) <= tol * abs(b)


def constant_logits(logp_row):
    """A unigram model: the same next-token distribution at every position."""
    row = torch.as_tensor(logp_row, dtype=torch.float32)

    def fn(ids):
        return row.expand(ids.shape[0], ids.shape[1], row.numel()).clone()

    return fn


def bigram_logits(table):
    """Next-token log-probs depend only on the current token: table[cur] -> row over the vocab."""
    t = torch.as_tensor(table, dtype=torch.float32)

    def fn(ids):
        return t[ids]

    return fn


# ---------------------------------------------------------------- windows


def test_window_plan_nonoverlapping_matches_upstream():
    # 10 tokens, W=4: windows [0:4], [4:8]; tokens 8, 9 left over (upstream drops partial windows)
    assert window_plan(10, 4) == [(0, 1), (4, 1)]
    assert window_plan(10, 4, max_windows=1) == [(0, 1)]
    with pytest.raises(ValueError, match="fewer than one window"):
        window_plan(3, 4)
    with pytest.raises(ValueError, match="stride"):
        window_plan(10, 4, stride=5)


def test_window_plan_sliding_scores_each_token_once():
    n, w, s = 23, 8, 3
    plan = window_plan(n, w, s)
    assert [p[0] for p in plan] == [0, 3, 6, 9, 12, 15]
    targets = [st + o for st, first in plan for o in range(first, w)]
    # every position from 1 to the end of the last window, once each
    assert targets == list(range(1, plan[-1][0] + w))


def test_uniform_logits_give_vocab_size():
    V = 272
    ids = torch.randint(0, V, (1000,), generator=torch.Generator().manual_seed(0))
    out = perplexity(constant_logits(torch.zeros(V)), ids, window=64, batch_size=4)
    assert close(out["ppl"], V)
    assert out["windows"] == 1000 // 64 and out["tokens_scored"] == (1000 // 64) * 63
    out = perplexity(constant_logits(torch.zeros(V)), ids, window=64, stride=16, max_windows=5)
    assert out["windows"] == 5 and out["tokens_scored"] == 63 + 4 * 16
    assert close(out["ppl"], V)


def test_unigram_hand_value():
    # p = [1/2, 1/4, 1/4]; tokens [0,1,0 | 2,0,0], W=3, stride 3: targets 1,0 and 0,0
    # NLL = log4 + log2 + log2 + log2 = 5 log 2 over 4 tokens -> ppl = 2 ** (5/4)
    lp = [math.log(0.5), math.log(0.25), math.log(0.25)]
    out = perplexity(constant_logits(lp), [0, 1, 0, 2, 0, 0], window=3)
    assert out["tokens_scored"] == 4 and out["windows"] == 2
    assert close(out["nll"], 5 * math.log(2) / 4)
    assert close(out["ppl"], 2 ** 1.25)


def test_sliding_window_equals_full_sequence_for_bigram():
    # a bigram model sees only the previous token, so a sliding-window pass must equal the plain
    # sum over every position 1..end exactly once (double-scored or skipped positions would show)
    V = 7
    g = torch.Generator().manual_seed(3)
    table = torch.log_softmax(torch.randn(V, V, generator=g, dtype=torch.float64), -1)
    ids = torch.randint(0, V, (50,), generator=g)
    w, s = 10, 4
    plan = window_plan(50, w, s)
    end = plan[-1][0] + w
    ref = -sum(table[ids[i - 1], ids[i]].item() for i in range(1, end)) / (end - 1)
    for bs in (1, 3, 100):
        out = perplexity(bigram_logits(table), ids, window=w, stride=s, batch_size=bs)
        assert out["tokens_scored"] == end - 1
        assert close(out["nll"], ref)


def test_nonoverlapping_skips_first_token_of_each_window():
    V = 5
    g = torch.Generator().manual_seed(4)
    table = torch.log_softmax(torch.randn(V, V, generator=g, dtype=torch.float64), -1)
    ids = torch.randint(0, V, (12,), generator=g)
    out = perplexity(bigram_logits(table), ids, window=4)
    pos = [1, 2, 3, 5, 6, 7, 9, 10, 11]   # positions 4 and 8 start a window: no context, not scored
    ref = -sum(table[ids[i - 1], ids[i]].item() for i in pos) / len(pos)
    assert out["tokens_scored"] == 9 and close(out["nll"], ref)


def test_bad_logits_shape_and_ids_raise():
    with pytest.raises(ValueError, match="expected \\[B, W, vocab\\]"):
        perplexity(lambda ids: torch.zeros(ids.shape[0], 5), [0, 1, 2, 3], window=4)
    with pytest.raises(ValueError, match="token id 9 >= logits vocab size 5"):
        perplexity(constant_logits(torch.zeros(5)), [0, 1, 9, 3], window=4)


def test_hf_model_agrees_with_its_own_loss():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                        num_experts_per_tok=2)
    m = MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 40, (1, 24))
    out = perplexity(hf_logits_fn(m), ids[0], window=24)
    with torch.no_grad():
        hf = m(input_ids=ids, labels=ids).loss.item()   # mean over the 23 shifted predictions
    assert out["tokens_scored"] == 23 and close(out["nll"], hf)


# ---------------------------------------------------------------- seq2seq / ROUGE


def test_seq2seq_loss_shift_and_value():
    seen = []
    V = 6

    def model_fn(enc, dec):
        seen.append((enc.tolist(), dec.tolist()))
        # log p(target) = log(1/2) for token 3, rest uniform over the other 5
        row = torch.full((V,), math.log(0.1))
        row[3] = math.log(0.5)
        return row.expand(1, dec.shape[1], V)

    out = seq2seq_loss(model_fn, [([1, 2], [3, 4]), ([5], [3])], decoder_start_id=0)
    assert seen == [([[1, 2]], [[0, 3]]), ([[5]], [[0]])]
    # targets 3, 4, 3: -(log .5 + log .1 + log .5) / 3
    ref = -(2 * math.log(0.5) + math.log(0.1)) / 3
    assert out["tokens_scored"] == 3 and out["pairs"] == 2 and close(out["nll"], ref)
    assert close(out["ppl"], math.exp(ref))
    with pytest.raises(ValueError, match="empty"):
        seq2seq_loss(model_fn, [([1], [])], decoder_start_id=0)


def test_rouge1_hand_examples():
    pred = "the cat sat on the mat".split()
    ref = "the cat is on the mat".split()
    # clipped overlap: the x2, cat, on, mat = 5 of 6 each way -> P = R = F = 5/6
    assert close(rouge1(pred, ref), 5 / 6)
    # overlap clipped to the reference count: min(3, 1) = 1 -> P = 1/3, R = 1/2, F = 2/5
    assert close(rouge1(["a", "a", "a"], ["a", "b"]), 0.4)
    assert rouge1([], ["a"]) == 0.0 and rouge1(["a"], []) == 0.0 and rouge1(["x"], ["y"]) == 0.0
    assert rouge1([1, 2, 3], [3, 2, 1]) == 1.0   # works on token ids; order does not matter
    assert rouge_tokens("The Cat's 2 hats!") == ["the", "cat", "s", "2", "hats"]


# ---------------------------------------------------------------- data


def test_wikitext_rows_round_trip_synthetic():
    rows = ["", " = Title = \n", "", " text one \n", " text two \n", "", ""]
    text = "\n".join(rows)
    assert data.wikitext_rows(text) == rows


def test_real_splits_read_exactly():
    text = data.read_split("wikitext2", "test")
    rows = data.wikitext_rows(text)
    assert len(rows) == 4358 and sum(r == "" for r in rows) == 1467
    assert "\n".join(rows) == text
    assert data.eval_text("wikitext2") == "\n\n".join(rows)
    ptb = data.split_rows("ptb", data.read_split("ptb", "test"))
    assert len(ptb) == 3761 and all(r for r in ptb)
    assert data.eval_text("shakespeare") == data.read_split("shakespeare", "test")
    assert set(DATASETS) == {"wikitext2", "ptb", "shakespeare", "pycode"}
    with pytest.raises(data.DataError, match="no split 'train'"):
        data.read_split("ptb", "train")


def test_verify_checksums_real_and_corrupted(tmp_path):
    checked = data.verify_checksums()
    assert "wikitext2/test.txt" in checked and len(checked) == 9
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  ./a.txt\n")
    with pytest.raises(data.DataError, match="a.txt: sha256"):
        data.verify_checksums(tmp_path)


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTIMOE_DATA", str(tmp_path))
    with pytest.raises(data.DataError, match="MULTIMOE_DATA"):
        data.data_dir()
    (tmp_path / "SHA256SUMS").write_text("")
    assert data.data_dir() == tmp_path.resolve()


def test_evaluate_perplexity_on_ptb_uniform():
    out = evaluate_perplexity(constant_logits(torch.zeros(272)), "ptb", window=512, max_windows=2)
    assert out["windows"] == 2 and out["tokens_scored"] == 2 * 511 and close(out["ppl"], 272)
