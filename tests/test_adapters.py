"""Contract test: every row of the architecture table (`prunekit.adapters.ADAPTERS`) must pass it, so a new
row is tested by adding it (and a tiny config below; a row without one fails here)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, random_calib, tiny_config, tiny_tokenizer

from prunekit.adapters import ADAPTERS, get_adapter
from prunekit.engine import LayerRunner, Observer, ResidentLayers
from prunekit.io.checkpoint import load_model, save_checkpoint
from prunekit.plans import DropTarget, LayerWidth, PruningPlan
from prunekit.surgery import apply_plan


def _gemma3_multimodal():
    import transformers as t

    text = tiny_config("gemma3_text")
    vision = t.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    return t.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)


CONFIGS = {
    "llama": lambda: tiny_config("llama"),
    "mistral": lambda: tiny_config("mistral"),
    "qwen2": lambda: tiny_config("qwen2"),
    "qwen3": lambda: tiny_config("qwen3"),
    "gemma3_text": lambda: tiny_config("gemma3_text"),
    "gemma3": _gemma3_multimodal,
    **{f: (lambda f=f: tiny_config(f)) for f in ("gemma2", "olmo2", "granite", "smollm3", "phi3")},
    "mixtral": lambda: tiny_config("mixtral"),
    "qwen2_moe": lambda: tiny_config("qwen2_moe"),
    "qwen3_moe": lambda: tiny_config("qwen3_moe"),
    "olmoe": lambda: tiny_config("olmoe"),
    "gpt_oss": lambda: tiny_config("gpt_oss"),
}


# A Mixture-of-Experts layer's widths, by its family's config fields: expert count, expert width, top-k (and
# the shared expert's width), in place of the dense MLP's intermediate size.
MOE_WIDTHS = {
    "mixtral": {"num_local_experts": 4, "intermediate_size": 128, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 128, "num_experts_per_tok": 2,
                  "shared_expert_intermediate_size": 96},
    "qwen3_moe": {"num_local_experts": 4, "moe_intermediate_size": 128, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 4, "intermediate_size": 128, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "intermediate_size": 128, "num_experts_per_tok": 2},
}


def build(model_type: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    assert model_type in CONFIGS, f"add a tiny config for the new adapter row {model_type!r} to this test"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[model_type]())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


ROWS = sorted(ADAPTERS)


@pytest.mark.parametrize("model_type", ROWS)
def test_adapter_answers_every_shape_question(model_type):
    model = build(model_type)
    ad = get_adapter(model)
    assert model.config.model_type == model_type
    assert ad.num_layers == TINY["num_hidden_layers"] and ad.hidden_size == TINY["hidden_size"]
    assert ad.head_dim == getattr(ad.config, "head_dim", None) or TINY["hidden_size"] // TINY["num_attention_heads"]
    params = dict(model.named_parameters())
    for i, layer in enumerate(ad.layers()):
        assert ad.has_attention(layer) and ad.has_mlp(layer)
        assert ad.attention_shape(layer) == (TINY["num_attention_heads"], TINY["num_key_value_heads"])
        assert ad.mlp_width(layer) == TINY["intermediate_size"]
        assert ad.layer_widths(layer) == {"num_attention_heads": 4, "num_key_value_heads": 2,
                                          **MOE_WIDTHS.get(model_type, {"intermediate_size": 128})}
        # Module paths: the layer's tensor names are where the adapter says (streaming reads them by name).
        for part in ("attn",) if model_type in MOE_WIDTHS else ("attn", "mlp"):  # experts: fused tensors
            for name, module in zip(ad.projection_names(part), ad.projections(layer, part)):
                assert params[f"{ad.layer_prefix(i)}{name}.weight"] is module.weight
    assert params[f"{ad.spec.embed}.weight"] is ad.embed().weight
    assert all(any(n.startswith(prefix) for n in model.state_dict()) or not list(m.state_dict())
               for prefix, m in ad.aux_modules())
    layer = ad.layers()[1]
    ad.remove_attention(layer, 1)
    ad.remove_mlp(layer)
    assert not ad.has_attention(layer) and not ad.has_mlp(layer) and ad.layer_widths(layer) == {}


class _Outputs(Observer):
    def __init__(self):
        self.out: dict[tuple[int, int], torch.Tensor] = {}

    def observe(self, i, b, h_in, h_mid, h_out, mask):
        self.out[(i, b)] = h_out.clone()


@pytest.mark.parametrize("model_type", ROWS)
def test_runner_reproduces_the_models_own_hidden_states(model_type):
    """The runner calls each layer as the model does (masks, rotary embeddings, sliding windows)."""
    model = build(model_type)
    data = random_calib(n=4, t=12, seed=2)
    obs = _Outputs()
    LayerRunner(ResidentLayers(model), data, batch_size=2, progress=False).run([obs])
    n = get_adapter(model).num_layers
    for b, (ids, mask) in enumerate(data.batches(2)):
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for i in range(n - 1):  # the last entry of `hidden_states` is after the final norm
            assert torch.equal(obs.out[(i, b)], hidden[i + 1]), (i, b)


@pytest.mark.parametrize("model_type", ROWS)
def test_identity_and_mixed_plans_round_trip(model_type, tmp_path):
    model = build(model_type)
    ad = get_adapter(model)
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).logits
    apply_plan(ad, PruningPlan(method="identity"))
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    # OLMoE's q/k norms span every head and gpt-oss has per-head sinks: they refuse narrowing heads
    # (`ArchSpec.moe.fixed_heads`).
    heads = {} if model_type in ("olmoe", "gpt_oss") else {"heads": [2, 3], "kv_heads": [1]}
    plan = PruningPlan(dropped=[DropTarget(1, "attn"), DropTarget(2, "mlp")], method="test",
                       widths={0: LayerWidth(**heads, channels=list(range(0, 128, 2)))})
    apply_plan(ad, plan)
    apply_plan(ad, plan)  # a plan already applied to this model is not applied twice
    with torch.no_grad():
        pruned = model(x).logits
    path = save_checkpoint(model, tiny_tokenizer(), tmp_path / "pruned", plan)
    reloaded, _ = load_model(path, tokenizer=False)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, pruned)
