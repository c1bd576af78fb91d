"""SamplingParams validation and the batched sampler, against straightforward per-sequence float64 references."""

import math
from collections import Counter

import pytest
import torch

from multimoe_rt.errors import RequestError
from multimoe_rt.sampling import (Row, SamplingParams, filtered_probs, make_generator, processed_logits,
                                  sample_batch)

V = 50


def ref_logits(logits, p: SamplingParams, prompt, output, end_ids=()):
    """Penalties and min_tokens, one sequence, float64, token by token."""
    x = logits.double().clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(output).items():
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    if len(output) < p.min_tokens:
        for t in end_ids:
            x[t] = -math.inf
    return x


def ref_probs(x, p: SamplingParams):
    """Temperature, top-k, top-p, min-p over float64 logits: the distribution a sampled row draws from."""
    probs = torch.softmax(x / p.temperature, -1)
    keep = torch.ones(len(x), dtype=torch.bool)
    if p.top_k:
        keep[:] = False
        keep[torch.topk(x, p.top_k).indices] = True
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    order = torch.argsort(probs, descending=True)
    mass = 0.0
    for t in order.tolist():
        if p.top_p < 1 and mass >= p.top_p:
            keep[t] = False
        mass += probs[t].item()
    keep &= probs >= p.min_p * probs.max()
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


def random_case(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, V, generator=g)
    prompts = [torch.randint(0, V, (5,), generator=g).tolist() for _ in range(n)]
    outputs = [torch.randint(0, V, (int(i),), generator=g).tolist() for i in torch.randint(0, 8, (n,), generator=g)]
    return logits, prompts, outputs


PARAMS = [SamplingParams.make(V, temperature=0.7, top_k=5),
          SamplingParams.make(V, temperature=1.3, top_p=0.6),
          SamplingParams.make(V, temperature=1.0, min_p=0.2),
          SamplingParams.make(V, temperature=0.9, top_k=10, top_p=0.8, min_p=0.05),
          SamplingParams.make(V, temperature=1.0, repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.3),
          SamplingParams.make(V, temperature=2.0, repetition_penalty=0.6, frequency_penalty=-0.4, top_k=20)]


def test_penalties_and_min_tokens_match_the_reference():
    logits, prompts, outputs = random_case(0)
    params = PARAMS[4:] + [SamplingParams.make(V, min_tokens=9, presence_penalty=-1.0), SamplingParams.make(V)]
    ends = [(1, 2), (3,), (4, 7), ()]
    rows = [Row(p, prompts[i], outputs[i], None, ends[i]) for i, p in enumerate(params)]
    got = processed_logits(logits[:4], rows)
    for i, p in enumerate(params):
        want = ref_logits(logits[i], p, prompts[i], outputs[i], ends[i])
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), i
        fin = torch.isfinite(want)
        assert torch.allclose(got[i][fin].double(), want[fin], atol=1e-5), i
    assert torch.isinf(got[2, [4, 7]]).all()  # min_tokens not reached yet: its end ids cannot come out
    assert torch.equal(got[3], logits[3])     # defaults leave the logits exactly alone


def test_filtered_distribution_matches_the_reference_per_row_in_one_batch():
    logits, prompts, outputs = random_case(1)
    rows = [Row(p, prompts[i], outputs[i]) for i, p in enumerate(PARAMS)]
    x = processed_logits(logits, rows)
    p, order = filtered_probs(x, rows)
    dist = torch.zeros_like(p).scatter_(1, order, p)
    dist = dist.double() / dist.sum(-1, keepdim=True)
    for i, sp in enumerate(PARAMS):
        want = ref_probs(ref_logits(logits[i], sp, prompts[i], outputs[i]), sp)
        assert torch.equal(dist[i] > 0, want > 0), i   # the same tokens kept
        assert torch.allclose(dist[i], want, atol=1e-6), i


def test_draws_follow_the_reference_distribution():
    logits, prompts, _ = random_case(2, n=1)
    sp = SamplingParams.make(V, temperature=0.8, top_k=8, top_p=0.9, seed=3)
    want = ref_probs(ref_logits(logits[0], sp, [], []), sp)
    g = make_generator(sp, "cpu")
    n = 6000
    counts = Counter(sample_batch(logits, [Row(sp, [], [], g)])[0][0] for _ in range(n))  # a fresh Row per step
    assert set(counts) <= set(torch.nonzero(want).flatten().tolist())
    for t, c in counts.items():  # 5 standard deviations: a seeded run, so this cannot flake
        assert abs(c / n - want[t].item()) < 5 * math.sqrt(want[t].item() / n) + 1e-3, t


def test_greedy_rows_are_argmax_exactly_in_a_mixed_batch_and_tiny_temperatures_are_greedy():
    logits, prompts, outputs = random_case(3)
    greedy = [SamplingParams.make(V), SamplingParams.make(V, temperature=1e-45), SamplingParams.make(V, temperature=9e-6)]
    params = [greedy[0], PARAMS[0], greedy[1], PARAMS[1], greedy[2], PARAMS[3]]
    rows = [Row(p, prompts[i], outputs[i], make_generator(p, "cpu")) for i, p in enumerate(params)]
    tokens, _ = sample_batch(logits, rows)
    for i in (0, 2, 4):
        assert tokens[i] == int(logits[i].argmax())
    assert all(make_generator(p, "cpu") is None for p in greedy)


def test_seeded_tokens_do_not_depend_on_the_batch():
    logits, prompts, outputs = random_case(4)

    def run(indices):
        params = [PARAMS[i].replace(V, seed=100 + i) for i in indices]
        gens = [make_generator(p, "cpu") for p in params]
        return [sample_batch(logits[indices], [Row(p, prompts[i], outputs[i], g)  # five steps, one generator each
                                               for i, p, g in zip(indices, params, gens)])[0] for _ in range(5)]

    together = run(list(range(6)))
    for i in range(6):
        assert [step[i] for step in together] == [step[0] for step in run([i])], i
    assert [s[1] for s in run([3, 1])] == [s[0] for s in run([1])]  # nor on the row's place in it


def test_logprobs_are_the_log_softmax_after_penalties_before_temperature():
    logits, prompts, outputs = random_case(5, n=3)
    params = [SamplingParams.make(V, logprobs=3, repetition_penalty=1.5), SamplingParams.make(V),
              SamplingParams.make(V, temperature=0.5, logprobs=0, seed=1)]
    rows = [Row(p, prompts[i], outputs[i], make_generator(p, "cpu")) for i, p in enumerate(params)]
    tokens, lps = sample_batch(logits, rows)
    assert lps[1] is None
    for i in (0, 2):
        ref = torch.log_softmax(ref_logits(logits[i], params[i], prompts[i], outputs[i]), -1)
        lp, top = lps[i]
        assert lp == pytest.approx(ref[tokens[i]].item(), abs=1e-5)
        want = torch.topk(ref, params[i].logprobs)
        assert [t for t, _ in top] == want.indices.tolist()
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(bogus=1), "bogus"), (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(top_k=1.0), "top_k"),
    (dict(min_p=1.1), "min_p"), (dict(min_p=float("nan")), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(min_tokens=17), "min_tokens"), (dict(min_tokens=-1), "min_tokens"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop="ab"), "stop"), (dict(stop=[[]]), "stop"), (dict(stop=[[V]]), "stop"),
    (dict(stop_token_ids=[V]), "stop_token_ids"), (dict(stop_token_ids=3), "stop_token_ids"),
    (dict(eos_token_id=[1, V]), "eos_token_id"), (dict(eos_token_id=True), "eos_token_id"),
    (dict(ignore_eos=1), "ignore_eos"), (dict(seed=-1), "seed"), (dict(seed=2**63), "seed"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(logprobs=True), "logprobs")])
def test_every_field_is_validated_once_naming_it(kwargs, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams.make(V, **kwargs)


def test_validated_params_are_normalised():
    p = SamplingParams.make(V, stop=[[1, 2]], stop_token_ids=[3], eos_token_id=[4, 5], top_k=-1)
    assert (p.stop, p.stop_token_ids, p.eos_token_id, p.top_k) == (((1, 2),), (3,), (4, 5), 0)
    assert SamplingParams() == SamplingParams.make()
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=float("nan")).validate(V)


# -- through the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from multimoe_rt.engine import Engine
    from tiny_models import save_variants

    dirs = save_variants(tmp_path_factory.mktemp("sampling"), "mixtral", n=2)
    with Engine.from_pretrained(dirs, max_seqs=4, max_len=64) as eng:
        yield eng


def test_engine_takes_params_or_keywords_and_keeps_them_on_the_handle(engine):
    name = engine.names[0]
    base = SamplingParams(max_new_tokens=6, ignore_eos=True)
    h = engine.submit(name, [3, 4, 5], base, temperature=0.8, seed=5, top_k=4)
    assert h.params == SamplingParams.make(max_new_tokens=6, ignore_eos=True, temperature=0.8, seed=5, top_k=4)
    assert h.result(30).tokens == engine.generate(name, [3, 4, 5], params=h.params)
    with pytest.raises(RequestError, match="min_p"):
        engine.submit(name, [1], min_p=2)
    with pytest.raises(RequestError, match="unknown sampling parameter 'topk'"):
        engine.submit(name, [1], topk=2)


def test_engine_stop_token_ids_min_tokens_and_logprobs(engine):
    name = engine.names[1]
    full = engine.generate(name, [3, 4, 5], max_new_tokens=8, ignore_eos=True)
    stopped = engine.submit(name, [3, 4, 5], max_new_tokens=8, ignore_eos=True, stop_token_ids=[full[2]]).result(30)
    assert stopped.tokens == full[:full.index(full[2]) + 1] and stopped.finish_reason == "stop"
    # min_tokens suppresses the stop id; greedy then takes the next best token for those steps
    held = engine.submit(name, [3, 4, 5], max_new_tokens=8, ignore_eos=True, stop_token_ids=[full[0]],
                         min_tokens=3, logprobs=2).result(30)
    assert full[0] not in held.tokens[:3] and len(held.tokens) >= 3
    assert len(held.logprobs) == len(held.tokens)
    for tok, (lp, top) in zip(held.tokens, held.logprobs):
        assert len(top) == 2 and lp <= 0 and all(v <= 0 for _, v in top)
    assert held.logprobs[3:] == [] or held.logprobs[3][1][0][0] == held.tokens[3]  # greedy: the chosen one leads
    assert engine.submit(name, [3, 4, 5], max_new_tokens=2).result(30).logprobs is None


def test_extreme_accepted_values_sample_valid_tokens():
    logits, prompts, outputs = random_case(6, n=5)
    logits[0, 3] = 1e30  # a huge logit, as a broken but finite model gives
    extremes = [SamplingParams.make(V, temperature=1e300, repetition_penalty=1e-300, min_p=1.0, seed=1),
                SamplingParams.make(V, temperature=1e-5, repetition_penalty=1e300, top_p=1e-300, seed=2),
                SamplingParams.make(V, temperature=5e-6, presence_penalty=2, frequency_penalty=-2),
                SamplingParams.make(V, temperature=3.0, top_k=1, min_tokens=16, seed=3),
                SamplingParams.make(V, temperature=0.5, top_k=V + 100, logprobs=20, seed=4)]
    rows = [Row(p, prompts[i], [] if i == 3 else outputs[i] * 20, make_generator(p, "cpu"),
                end_ids=tuple(range(V - 1))) for i, p in enumerate(extremes)]
    tokens, lps = sample_batch(logits, rows)
    assert all(0 <= t < V for t in tokens)
    assert tokens[3] == V - 1  # every other id suppressed by min_tokens
    assert math.isfinite(lps[4][0]) and len(lps[4][1]) == 20
    logits[1, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sample_batch(logits, rows)
