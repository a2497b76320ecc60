"""GGUF export of gpt-oss through llama.cpp's `gpt-oss` graph: the keys and tensors read back (experts
de-interleaved, biases, sinks), the refusals (one line, no file), and llama.cpp's greedy tokens and top-5
log-probs against transformers on the tiny model (sliding window 8, a 48-token prompt) for the dense,
expert-drop, expert-slim, both-at-once, block-drop and YaRN results (where xllamacpp is installed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import _assert_top_logprobs_match, _read, _tensor, needs_xllamacpp, past_window_prompt
from test_moe_export import PLANS, moe_source

from prunekit.errors import ExportError
from prunekit.export import export_source
from prunekit.plans import DropTarget, LayerWidth, PruningPlan

# Dropping the last two blocks keeps the sliding/full alternation llama.cpp's graph assumes.
GPT_OSS_PLANS = {**PLANS, "block-drop": PruningPlan(dropped=[DropTarget(2, "block"), DropTarget(3, "block")])}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 64, "truncate": True}


def _export(src, path):
    return export_source(src, path, format="gguf", quant="f32", progress=False)


def _np(t):
    return t.detach().numpy()


@pytest.mark.parametrize("name", list(GPT_OSS_PLANS))
def test_gguf_gpt_oss_holds_its_experts_biases_and_sinks(name, tmp_path):
    src = moe_source("gpt_oss", GPT_OSS_PLANS[name])
    fields, tensors = _read(_export(src, tmp_path / "g.gguf"))
    ad, cfg = src.adapter, src.config
    layer = ad.layers()[-1]
    i = len(ad.layers()) - 1
    experts, width = ad.num_experts(layer), ad.expert_width(layer)
    assert fields["general.architecture"] == "gpt-oss"
    assert fields["gpt-oss.block_count"] == (2 if name == "block-drop" else 4)
    assert fields["gpt-oss.expert_count"] == experts and fields["gpt-oss.expert_used_count"] == ad.top_k(layer)
    assert fields["gpt-oss.expert_feed_forward_length"] == width
    assert fields["gpt-oss.attention.sliding_window"] == 8
    assert fields["gpt-oss.attention.head_count"] == 4 and fields["gpt-oss.attention.head_count_kv"] == 2
    assert fields["gpt-oss.attention.key_length"] == 16 and fields["gpt-oss.rope.dimension_count"] == 16
    assert fields["gpt-oss.rope.freq_base"] == 10000.0 and "gpt-oss.rope.scaling.type" not in fields

    def got(key, suffix="weight"):
        return _tensor(tensors[f"blk.{i}.{key}.{suffix}"])

    gate_up, down = (_np(t) for t in ad.expert_tensors(layer))  # [E, H, 2I], [E, I, H]
    gate_up_b, down_b = (_np(t) for t in ad.expert_biases(layer))
    assert got("ffn_gate_exps").shape == (experts, width, cfg.hidden_size)
    for e in range(experts):
        for c in (0, width - 1):  # channel c of expert e: gate column 2c, up column 2c + 1
            np.testing.assert_array_equal(got("ffn_gate_exps")[e, c], gate_up[e, :, 2 * c])
            np.testing.assert_array_equal(got("ffn_up_exps")[e, c], gate_up[e, :, 2 * c + 1])
            np.testing.assert_array_equal(got("ffn_down_exps")[e, :, c], down[e, c])
            assert got("ffn_gate_exps", "bias")[e, c] == gate_up_b[e, 2 * c]
            assert got("ffn_up_exps", "bias")[e, c] == gate_up_b[e, 2 * c + 1]
    np.testing.assert_array_equal(got("ffn_down_exps", "bias"), down_b)
    router = ad.router(layer)
    np.testing.assert_array_equal(got("ffn_gate_inp"), _np(router.weight))
    np.testing.assert_array_equal(got("ffn_gate_inp", "bias"), _np(router.bias))
    np.testing.assert_array_equal(got("attn_sinks"), _np(ad.attention_sinks(layer)))
    q, k, v, o = ad.attn_projections(layer)
    for key, lin in (("attn_q", q), ("attn_k", k), ("attn_v", v), ("attn_output", o)):
        np.testing.assert_array_equal(got(key), _np(lin.weight))  # NEOX rope: rows as they are
        np.testing.assert_array_equal(got(key, "bias"), _np(lin.bias))
    np.testing.assert_array_equal(got("post_attention_norm"), _np(getattr(layer, ad.spec.mlp_norms[0]).weight))


def test_gguf_gpt_oss_writes_yarn_zero_attention_biases_and_a_tied_output(tmp_path):
    src = moe_source("gpt_oss", rope_parameters=YARN, attention_bias=False, tie_word_embeddings=True)
    assert src.tied and src.adapter.attn_projections(src.adapter.layers()[0])[0].bias is None
    fields, tensors = _read(_export(src, tmp_path / "g.gguf"))
    assert fields["gpt-oss.rope.scaling.type"] == "yarn"
    assert fields["gpt-oss.rope.scaling.factor"] == 4.0
    assert fields["gpt-oss.rope.scaling.original_context_length"] == 64
    assert fields["gpt-oss.rope.scaling.yarn_beta_fast"] == 32.0 and fields["gpt-oss.rope.scaling.yarn_beta_slow"] == 1.0
    # the graph requires q/k/v/o biases and `output`: zeros and the embedding, which change nothing
    for key, n in (("attn_q", 64), ("attn_k", 32), ("attn_v", 32), ("attn_output", 64)):
        np.testing.assert_array_equal(_tensor(tensors[f"blk.0.{key}.bias"]), np.zeros(n, np.float32))
    np.testing.assert_array_equal(_tensor(tensors["output.weight"]), _tensor(tensors["token_embd.weight"]))


def test_gguf_gpt_oss_writes_yarn_without_truncation_where_rounding_changes_nothing(tmp_path, caplog):
    """The correction range is clamped to [0, head_dim - 1] before llama.cpp's rounding could matter."""
    src = moe_source("gpt_oss", rope_parameters={**YARN, "truncate": False, "beta_slow": 1e-7})
    fields, _ = _read(_export(src, tmp_path / "g.gguf"))
    assert fields["gpt-oss.rope.scaling.type"] == "yarn"
    assert "rounds" not in caplog.text


def test_gguf_gpt_oss_writes_yarn_without_truncation_as_llamacpp_runs_it_and_says_so(tmp_path, caplog):
    """The released checkpoints' `truncate: false`: written as the converter writes it, with one warning."""
    src = moe_source("gpt_oss", rope_parameters={**YARN, "truncate": False})
    fields, _ = _read(_export(src, tmp_path / "g.gguf"))
    assert fields["gpt-oss.rope.scaling.type"] == "yarn" and fields["gpt-oss.rope.scaling.factor"] == 4.0
    warned = [r.getMessage() for r in caplog.records if "rounds" in r.getMessage()]
    assert len(warned) == 1 and "0.000..2.016 to 0..3" in warned[0], caplog.text


@pytest.mark.parametrize("plan,overrides,message", [
    (PruningPlan(widths={0: LayerWidth(experts=[0, 1, 2])}), {}, "whose layers differ"),
    (PruningPlan(dropped=[DropTarget(1, "mlp")]), {}, "needs both in every layer"),
    (PruningPlan(dropped=[DropTarget(1, "block")]), {}, r"no longer alternate .*\(SSF\)"),
    (None, {"layer_types": ["full_attention", "sliding_attention"] * 2}, r"no longer alternate .*\(FSFS\)"),
    (None, {"swiglu_limit": 10.0}, "SwiGLU alpha 1.702 / limit 10"),
    (None, {"sliding_window": None}, "no sliding window"),
    (None, {"rope_parameters": {**YARN, "attention_factor": 1.0}}, "it sets attention_factor"),
    (None, {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}, "'linear'"),
])
def test_gguf_gpt_oss_refuses_what_the_graph_does_not_compute(plan, overrides, message, tmp_path):
    src = moe_source("gpt_oss", plan, **overrides)
    with pytest.raises(ExportError, match=message) as e:
        _export(src, tmp_path / "g.gguf")
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())


@needs_xllamacpp
@pytest.mark.parametrize("name", [*GPT_OSS_PLANS, "yarn"])
def test_llamacpp_gpt_oss_logprobs_match_transformers_tiny(tmp_path, name):
    """48 prompt tokens: past the sliding window (8), so the window, its layers and the sinks all count."""
    src = moe_source("gpt_oss", rope_parameters=YARN) if name == "yarn" else moe_source("gpt_oss", GPT_OSS_PLANS[name])
    out = _export(src, tmp_path / "g.gguf")
    prompt = past_window_prompt(src)
    _assert_top_logprobs_match(src, out, prompt, 2e-3, name)


@needs_xllamacpp
def test_llamacpp_runs_untruncated_yarn_as_transformers_with_the_range_rounded(tmp_path):
    """What the warning says, exactly: the GGUF of a `truncate: false` model gives, in llama.cpp, the
    log-probs of the same weights in transformers with `truncate: true` (the correction range rounded)."""
    src = moe_source("gpt_oss", rope_parameters={**YARN, "truncate": False})
    rounded = moe_source("gpt_oss", rope_parameters=YARN)
    for (name, a), b in zip(src.model.state_dict().items(), rounded.model.state_dict().values()):
        assert torch.equal(a, b), name
    out = _export(src, tmp_path / "g.gguf")
    prompt = past_window_prompt(src)
    _assert_top_logprobs_match(rounded, out, prompt, 2e-3, "truncate: false")
