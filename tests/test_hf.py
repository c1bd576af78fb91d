"""Drop-in routes: patch() on a loaded transformers model, and experts_implementation="multimoe"."""

import pytest
import torch

import multimoe_rt
from multimoe_rt import plan as plan_mod
from multimoe_rt.checkpoint import VariantSet
from tiny_models import reference, rel_err, save_variants


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
    with pytest.raises(ValueError, match="no Mixtral or SwitchTransformers MoE blocks"):
        multimoe_rt.patch(torch.nn.Linear(2, 2), slab, table)


def test_multimoe_experts_implementation_matches_eager(tmp_path):
    import transformers

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
