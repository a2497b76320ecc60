"""GGUF export of the families added for issue #40: Granite through llama.cpp's `granite` graph (its four
multipliers as keys, Q/K permuted for llama's rope), everything else refused in one clear line. The
llama.cpp comparison runs only where xllamacpp is installed (as the llama and Gemma 3 checks)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_TEXT
from test_export import PLANS, _assert_top_logprobs_match, _read, _tensor, needs_xllamacpp, tiny_source

from prunekit.export import ExportError, export_source
from prunekit.export.gguf import permute_qk


def test_gguf_uniform_granite_writes_its_multipliers_and_permutes_qk(tmp_path):
    src = tiny_source("granite", PLANS["uniform-width"])
    assert not src.heterogeneous
    out = export_source(src, tmp_path / "g.gguf", format="gguf", quant="f32", progress=False)
    f, t = _read(out)
    cfg = src.model.config
    assert f["general.architecture"] == "granite"
    assert f["granite.attention.head_count"] == 2 and f["granite.feed_forward_length"] == 64
    assert f["granite.attention.key_length"] == 16
    for key, value in (("granite.attention.scale", cfg.attention_multiplier),
                       ("granite.embedding_scale", cfg.embedding_multiplier),
                       ("granite.residual_scale", cfg.residual_multiplier),
                       ("granite.logit_scale", cfg.logits_scaling)):
        assert f[key] == pytest.approx(value) and value != 1.0
    q, k, _, _ = src.adapter.attn_projections(src.adapter.layers()[0])
    np.testing.assert_array_equal(_tensor(t["blk.0.attn_q.weight"]), permute_qk(q.weight, 2).detach().numpy())
    np.testing.assert_array_equal(_tensor(t["blk.0.attn_k.weight"]), permute_qk(k.weight, 2).detach().numpy())


@pytest.mark.parametrize("family,plan,message", [
    ("granite", "attn-drop", "heterogeneous granite.*multipliers"),
])
def test_gguf_refuses_what_it_does_not_write(tmp_path, family, plan, message):
    src = tiny_source(family, PLANS[plan] if plan else None)
    with pytest.raises(ExportError, match=message) as e:
        export_source(src, tmp_path / "m.gguf", format="gguf", progress=False)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


@needs_xllamacpp
@pytest.mark.parametrize("name", ["dense", "uniform-width", "block-drop"])
def test_llamacpp_granite_logprobs_match_transformers_tiny(tmp_path, name):
    src = tiny_source("granite", PLANS[name])
    out = export_source(src, tmp_path / "g.gguf", format="gguf", quant="f32", progress=False)
    prompt = src.tokenizer(SAMPLE_TEXT[:80])["input_ids"]
    # 3e-3 as for Gemma 3: with the multipliers away from 1 the f32 kernels' rounding reaches 2.04e-3 at one
    # token of the block-drop model; a graph that missed a multiplier is off by far more than that.
    _assert_top_logprobs_match(src, out, prompt, 3e-3, name)
