"""Drop-in routes: patch() on a loaded transformers model, experts_implementation="multimoe", and the
MultiVariantModel, each against transformers' eager experts: per activation, in fp32/bf16/fp16, for logits,
greedy tokens with left padding, gradients, training and gradient checkpointing (tolerances below)."""

import contextlib

import pytest
import torch
import transformers

import multimoe_rt
from multimoe_rt import plan as plan_mod
from multimoe_rt.checkpoint import CheckpointError, VariantSet
from multimoe_rt.experts import SlabExperts
from multimoe_rt.model import MultiVariantModel
from multimoe_rt.torch_moe import UnsupportedActivationError
from tiny_models import MIXTRAL, SWITCH, reference, rel_err, save_variants


@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_patched_model_equals_unpatched_at_sharing_zero(tmp_path, family):
    dirs = save_variants(tmp_path, family, n=2)
    vs = VariantSet.from_dirs(dirs)
    slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0), vs)
    ids, dec = torch.randint(2, 64, (2, 9)), torch.randint(2, 64, (2, 4))
    for v, d in enumerate(dirs):
        plain, patched = reference(family, d), reference(family, d)
        multimoe_rt.patch(patched, slab, table, variant=v)
        assert not any("experts" in n for n, _ in patched.named_parameters())  # weights freed
        kw = dict(input_ids=ids, decoder_input_ids=dec) if family == "switch" else dict(input_ids=ids)
        with torch.no_grad():
            assert rel_err(patched(**kw).logits, plain(**kw).logits) <= 1e-5
        g1 = patched.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        g2 = plain.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert g1.tolist() == g2.tolist()


def test_patch_rejects_a_table_of_another_model(tmp_path):
    dirs = save_variants(tmp_path, "mixtral", n=1)
    vs = VariantSet.from_dirs(dirs)
    slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0), vs)
    switch = reference("switch", save_variants(tmp_path, "switch", n=1)[0])
    with pytest.raises(ValueError, match="MoE layers"):
        multimoe_rt.patch(switch, slab, type(table)(1, 5, 4))
    with pytest.raises(ValueError, match="no MoE blocks of a supported family"):
        multimoe_rt.patch(torch.nn.Linear(2, 2), slab, table)


def test_multimoe_experts_implementation_matches_eager(tmp_path):
    assert multimoe_rt.register_experts_implementation()
    d = save_variants(tmp_path, "mixtral", n=1)[0]
    ours = transformers.MixtralForCausalLM.from_pretrained(d, experts_implementation="multimoe").eval()
    eager = transformers.MixtralForCausalLM.from_pretrained(d, experts_implementation="eager").eval()
    ids = torch.randint(2, 64, (3, 11))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, eager(ids).logits) <= 1e-5


def test_register_is_explicit_and_idempotent():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from multimoe_rt.integrations import hf

    assert hf.register() and hf.register()  # a second call is a no-op
    assert "multimoe" in ALL_EXPERTS_FUNCTIONS


# ---- issue 18: every drop-in route equals transformers' eager experts, per activation, dtype, and in training ----
MIXTRAL_ACTS = ["silu", "gelu", "gelu_pytorch_tanh", "relu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUTES = ["multimoe", "patch", "model"]
# Relative error ||ours - ref|| / ||ref||. fp32: against eager fp32 (same routing by construction).
# bf16/fp16: against the float64 eager model on the same (rounded) weights, with the routers' top-k choices
# replayed from the eager 16-bit run (a near-tie that rounding elsewhere flips is not an experts error).
LOGIT_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
INIT_STD = 0.2  # large enough that GELU vs SiLU and the activations' curvature matter (logits ~ +-5)


def save_mixtral(tmp_path, act, n=2, std=INIT_STD, **extra):
    """Base and n-1 perturbed variants of a tiny random Mixtral using ``act``."""
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL, hidden_act=act, initializer_range=std,
                                                                       **extra))
    dirs = []
    for i in range(n):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.3 * p.std() * torch.randn_like(p))
        dirs.append(tmp_path / f"{act}-v{i}")
        model.save_pretrained(dirs[-1])
    return dirs


class Routing:
    """Records the Mixtral routers' top-k choices of one run and replays them in another run of another model
    (same calls in the same order); the replayed routing weights come from the replaying model's own logits."""

    def __init__(self):
        self.calls, self.i, self.mode = [], 0, "record"

    def _hook(self, module, args, out):
        logits, weights, idx = out
        if self.mode == "record":
            self.calls.append(idx.detach().clone())
            return None
        forced = self.calls[self.i]
        self.i += 1
        top = torch.softmax(logits.float(), dim=-1).gather(-1, forced)
        return logits, top / top.sum(-1, keepdim=True), forced

    @contextlib.contextmanager
    def on(self, model, mode):
        self.mode, self.i = mode, 0
        hs = [m.register_forward_hook(self._hook) for m in model.modules() if type(m).__name__ == "MixtralTopKRouter"]
        try:
            yield
        finally:
            for h in hs:
                h.remove()


def eager_models(d, dtype):
    """(eager model in dtype, eager float64 model on the same dtype-rounded weights)."""
    load = lambda: transformers.MixtralForCausalLM.from_pretrained(d, experts_implementation="eager",  # noqa: E731
                                                                   dtype=dtype).eval()
    return load(), load().double()


def route_model(route, dirs, dtype, variant=1):
    """The transformers model of ``route`` for variant ``variant`` (its experts run our op)."""
    if route == "multimoe":
        assert multimoe_rt.register_experts_implementation()
        return transformers.MixtralForCausalLM.from_pretrained(dirs[variant], experts_implementation="multimoe",
                                                               dtype=dtype).eval()
    if route == "patch":
        vs = VariantSet.from_dirs(dirs)
        slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0), vs, dtype=dtype)
        model = transformers.MixtralForCausalLM.from_pretrained(dirs[variant], dtype=dtype).eval()
        multimoe_rt.patch(model, slab, table, variant=variant)
        return model
    mv = MultiVariantModel.from_pretrained(dirs, dtype=dtype)  # sharing 0: every variant keeps its experts
    mv.use(variant)
    mv.model.multi_variant = mv  # the model outlives this function: keep its store with it
    return mv.model


def left_padded(g):
    ids = torch.randint(2, 64, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def check_experts_run_our_op(model, route, act):
    experts = [m for m in model.modules() if type(m).__name__ in ("MixtralExperts", "SlabExperts")]
    assert experts
    want = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}[act]
    for m in experts:
        if route == "multimoe":
            assert m.config._experts_implementation == "multimoe"
        else:
            assert isinstance(m, SlabExperts) and m.activation == want


def greedy(model, ids, mask, n=6, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None, **kw)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", MIXTRAL_ACTS)
@pytest.mark.parametrize("route", ROUTES)
def test_route_matches_eager_logits_and_greedy_tokens(tmp_path, route, act, dtype):
    dirs = save_mixtral(tmp_path, act)
    eager, truth = eager_models(dirs[1], dtype)
    ours = route_model(route, dirs, dtype)
    check_experts_run_our_op(ours, route, act)
    ids, mask = left_padded(torch.Generator().manual_seed(len(act)))
    with torch.no_grad():
        if dtype == torch.float32:
            err = rel_err(ours(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits)
        else:
            routing = Routing()
            with routing.on(eager, "record"):
                eager(ids, attention_mask=mask)
            with routing.on(ours, "replay"):
                got = ours(ids, attention_mask=mask).logits
            with routing.on(truth, "replay"):
                want = truth(ids, attention_mask=mask).logits
            err = rel_err(got, want)
    assert err <= LOGIT_TOL[dtype], f"logits rel err {err:.2e}"

    # greedy decoding with left padding and a KV cache
    routing = Routing()
    with routing.on(eager, "record"):
        ref = greedy(eager, ids, mask, output_logits=True, return_dict_in_generate=True)
    with routing.on(ours, "record" if dtype == torch.float32 else "replay"):
        got = greedy(ours, ids, mask)
    if dtype == torch.float32:
        assert got.tolist() == ref.sequences.tolist()
        return
    # 16-bit: tokens equal, or they part where eager's own top two logits are within rounding of each other
    new_ref, new_got = ref.sequences[:, ids.shape[1]:], got[:, ids.shape[1]:]
    for row in range(ids.shape[0]):
        differ = (new_ref[row] != new_got[row]).nonzero()
        if len(differ):
            step = int(differ[0])
            logits = ref.logits[step][row].double()
            margin = float(logits[new_ref[row, step]] - logits[new_got[row, step]])
            assert margin <= 2e-2 * float(logits.abs().max()), f"row {row} step {step}: margin {margin:.3g}"


def train_loss(model, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def grads(model, loss):
    loss.backward()
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", MIXTRAL_ACTS)
@pytest.mark.parametrize("route", ROUTES)
def test_route_matches_eager_gradients(tmp_path, route, act, dtype):
    """Training mode: gradients of every parameter the route keeps (multimoe: experts too; patch and the
    multi-variant model: the non-expert weights, the slab being a buffer) against eager's."""
    dirs = save_mixtral(tmp_path, act)
    eager, truth = eager_models(dirs[1], dtype)
    ours = route_model(route, dirs, dtype)
    for m in (eager, truth, ours):
        m.train()
    ids, mask = left_padded(torch.Generator().manual_seed(7 + len(act)))
    routing = Routing()
    with routing.on(eager, "record"):
        eager_grads = grads(eager, train_loss(eager, ids, mask))
    mode = "record" if dtype == torch.float32 else "replay"
    with routing.on(ours, mode):
        got = grads(ours, train_loss(ours, ids, mask))
    if dtype == torch.float32:
        want = eager_grads
    else:
        with routing.on(truth, "replay"):
            want = grads(truth, train_loss(truth, ids, mask))
    expected = set(want) if route == "multimoe" else {n for n in want if ".experts." not in n}
    assert set(got) == expected
    flat = lambda g: torch.cat([g[n].reshape(-1) for n in sorted(expected)])  # noqa: E731
    err, eager_err = rel_err(flat(got), flat(want)), rel_err(flat(eager_grads), flat(want))
    # 16-bit: the whole model's backward rounds (eager's own error reaches 6.5e-2 in bf16 with relu), so ours must
    # be within the dtype's tolerance or no worse than 1.25x eager's own error against float64
    tol = GRAD_TOL[dtype] if dtype == torch.float32 else max(GRAD_TOL[dtype], 1.25 * eager_err)
    assert err <= tol, f"gradient rel err {err:.2e} (eager's own {eager_err:.2e})"
    if dtype == torch.float32:
        for n in expected:  # and no parameter is off on its own
            assert rel_err(got[n], want[n]) <= 1e-4, n


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_twenty_training_steps_follow_eager(tmp_path, act):
    dirs = save_mixtral(tmp_path, act, n=1)
    curves = {}
    for impl in ("eager", "multimoe"):
        assert multimoe_rt.register_experts_implementation()
        model = transformers.MixtralForCausalLM.from_pretrained(dirs[0], experts_implementation=impl).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(5)
        batches = [left_padded(g) for _ in range(4)]  # cycled, so the loss has something to learn
        curves[impl] = []
        for step in range(20):
            ids, mask = batches[step % 4]
            loss = train_loss(model, ids, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curves[impl].append(loss.item())
    print(f"\n{act} loss, eager:    " + " ".join(f"{v:.5f}" for v in curves["eager"]))
    print(f"{act} loss, multimoe: " + " ".join(f"{v:.5f}" for v in curves["multimoe"]))
    assert curves["eager"][-1] < curves["eager"][0] - 0.5  # it trains
    for a, b in zip(curves["multimoe"], curves["eager"]):
        assert abs(a - b) <= 1e-4 * abs(b)


@pytest.mark.filterwarnings("ignore:`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated:FutureWarning")
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(tmp_path, reentrant):
    d = save_mixtral(tmp_path, "gelu", n=1)[0]
    assert multimoe_rt.register_experts_implementation()
    ids, mask = left_padded(torch.Generator().manual_seed(3))
    eager = transformers.MixtralForCausalLM.from_pretrained(d, experts_implementation="eager").train()
    want = grads(eager, train_loss(eager, ids, mask))
    ours = transformers.MixtralForCausalLM.from_pretrained(d, experts_implementation="multimoe").train()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert ours.is_gradient_checkpointing
    got = grads(ours, train_loss(ours, ids, mask))
    assert set(got) == set(want)
    for n in want:
        assert rel_err(got[n], want[n]) <= 1e-5, n


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("route", ["patch", "model"])
def test_switch_routes_follow_dense_act_fn(tmp_path, route, act):
    torch.manual_seed(0)
    cfg = transformers.SwitchTransformersConfig(**SWITCH, dense_act_fn=act, initializer_factor=3.0)
    base = transformers.SwitchTransformersForConditionalGeneration(cfg)
    dirs = []
    for i in range(2):
        if i:
            with torch.no_grad():
                for p in base.parameters():
                    p.add_(0.3 * p.std() * torch.randn_like(p))
        dirs.append(tmp_path / f"switch-{act}-v{i}")
        base.save_pretrained(dirs[-1])
    eager = reference("switch", dirs[1])
    ids, dec = torch.randint(2, 64, (2, 9)), torch.randint(2, 64, (2, 4))
    vs = VariantSet.from_dirs(dirs)
    assert vs.activation == act
    if route == "patch":
        slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0), vs)
        ours = reference("switch", dirs[1])
        multimoe_rt.patch(ours, slab, table, variant=1)
        with torch.no_grad():
            got = ours(input_ids=ids, decoder_input_ids=dec).logits
    else:
        got = MultiVariantModel.from_pretrained(vs).forward(1, ids, decoder_input_ids=dec)
    with torch.no_grad():
        want = eager(input_ids=ids, decoder_input_ids=dec).logits
    assert rel_err(got, want) <= 1e-5


def test_unsupported_activation_raises_naming_it(tmp_path):
    d = save_mixtral(tmp_path, "quick_gelu", n=1)[0]
    assert multimoe_rt.register_experts_implementation()
    ours = transformers.MixtralForCausalLM.from_pretrained(d, experts_implementation="multimoe")
    with pytest.raises(UnsupportedActivationError, match="QuickGELU"):
        ours(torch.randint(2, 64, (1, 5)))
    # patch() leaves the model untouched when it cannot serve an activation
    good = save_mixtral(tmp_path / "good", "silu", n=1)
    vs = VariantSet.from_dirs(good)
    slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0), vs)
    model = transformers.MixtralForCausalLM.from_pretrained(d)
    with pytest.raises(UnsupportedActivationError, match="QuickGELU"):
        multimoe_rt.patch(model, slab, table)
    assert not any(isinstance(m, SlabExperts) for m in model.modules())
    # the loader names the config key and the value
    with pytest.raises(CheckpointError, match=r"hidden_act 'quick_gelu'.*not supported"):
        VariantSet.from_dirs([d])
    # variants that disagree on the activation cannot share a slab
    other = save_mixtral(tmp_path / "other", "gelu", n=1)
    with pytest.raises(CheckpointError, match="activation"):
        VariantSet.from_dirs([good[0], other[0]])


def test_ungated_experts_implementation_uses_up_proj_and_act_fn():
    """transformers' ungated experts (NemotronH: up_proj / down_proj, act_fn(up)) through the multimoe entry."""
    from multimoe_rt.integrations.hf import multimoe_experts_forward

    nemotron = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    torch.manual_seed(0)
    for act, ok in (("relu", True), ("gelu", True), ("relu2", False)):
        cfg = transformers.NemotronHConfig(hidden_size=24, moe_intermediate_size=20, n_routed_experts=5,
                                           mlp_hidden_act=act)
        experts = nemotron.NemotronHExperts(cfg)
        with torch.no_grad():
            for p in experts.parameters():
                p.normal_(0, 0.3)
        h = torch.randn(7, 24)
        idx = torch.stack([torch.randperm(5)[:2] for _ in range(7)])
        w = torch.rand(7, 2)
        if not ok:
            with pytest.raises(UnsupportedActivationError, match="ReLUSquared"):
                multimoe_experts_forward(experts, h, idx, w)
            continue
        eager = type(experts).forward.__wrapped__(experts, h, idx, w)
        assert rel_err(multimoe_experts_forward(experts, h, idx, w), eager) <= 1e-5


def test_compiled_training_step_traces_the_model_with_fullgraph(tmp_path):
    """torch.compile of a training step (AOTAutograd: forward and backward graphs, fullgraph) through the op."""
    d = save_mixtral(tmp_path, "gelu", n=1)[0]
    assert multimoe_rt.register_experts_implementation()
    ours = transformers.MixtralForCausalLM.from_pretrained(d, experts_implementation="multimoe").train()
    eager = transformers.MixtralForCausalLM.from_pretrained(d, experts_implementation="eager").train()
    ids, mask = left_padded(torch.Generator().manual_seed(4))
    loss = torch.compile(train_loss, backend="aot_eager", fullgraph=True)(ours, ids, mask)
    got = grads(ours, loss)
    want_loss = train_loss(eager, ids, mask)
    want = grads(eager, want_loss)
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    assert set(got) == set(want)
    for n in want:
        assert rel_err(got[n], want[n]) <= 1e-5, n
