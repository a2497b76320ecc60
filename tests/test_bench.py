"""prunekit.evaluation.bench: measured KV bytes equal the analytic formula; result structure; decode bookkeeping.

No assertion here depends on wall-clock time.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from prunekit.evaluation.bench import analytic_kv_bytes, benchmark, format_table, measured_kv_bytes

RUN_KEYS = {
    "context",
    "prefill_tok_s",
    "decode_tok_s",
    "kv_bytes",
    "kv_storage_bytes",
    "peak_rss_bytes",
    "prefill_s",
    "decode_s",
    "prefill_s_all",
    "decode_s_all",
    "decode_steps",
    "seq_len_after_decode",
}


TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "vocab_size": 256,
    "max_position_embeddings": 512,
}


def llama_config(**overrides) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**TINY, **overrides})


def gemma3_config() -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        vocab_size=256,
        max_position_embeddings=512,
    )


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config()).eval()


@pytest.fixture(scope="module")
def gemma3():
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(gemma3_config()).eval()


def test_dense_kv_bytes_match_analytic(llama):
    res = benchmark(llama, contexts=(16, 40), new_tokens=3, batch=2, repeats=1, warmup=0, progress=False)
    assert [r["context"] for r in res["runs"]] == [16, 40]
    for run in res["runs"]:
        expected = analytic_kv_bytes(llama.config, run["context"], 2, 4)
        assert run["kv_bytes"] == expected
        assert run["kv_storage_bytes"] == expected  # full-attention layers hold no hidden extra storage
    # By hand: 2 (K,V) * batch 2 * 16 tokens * 4 layers * 2 kv heads * head_dim 16 * 4 bytes
    assert res["runs"][0]["kv_bytes"] == 2 * 2 * 16 * 4 * 2 * 16 * 4


def test_bf16_kv_bytes_match_analytic():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval().to(torch.bfloat16)
    res = benchmark(model, contexts=(24,), new_tokens=2, repeats=1, warmup=0, progress=False)
    assert res["dtype"] == "bfloat16"
    assert res["runs"][0]["kv_bytes"] == analytic_kv_bytes(model.config, 24, 1, 2)


def test_sliding_window_kv_bytes_match_analytic(gemma3):
    config = gemma3.config
    contexts = (5, 7, 8, 20)  # below, at window - 1, at and well above the sliding window of 8
    res = benchmark(gemma3, contexts=contexts, new_tokens=3, batch=2, repeats=1, warmup=0, progress=False)
    for run in res["runs"]:
        assert run["kv_bytes"] == analytic_kv_bytes(config, run["context"], 2, 4)
    # At context 20 the two sliding layers keep window - 1 = 7 positions, the two full layers 20.
    per_position = 2 * 2 * 1 * 16 * 4  # (K,V) * batch * kv heads * head_dim * fp32
    run20 = res["runs"][-1]
    assert run20["kv_bytes"] == per_position * (7 + 20 + 7 + 20)
    assert run20["kv_bytes"] < per_position * 4 * 20  # the window really saves memory...
    # ...but right after prefill the sliding layers' 7-position tensors are views of the 20-position buffer.
    assert run20["kv_storage_bytes"] == per_position * 4 * 20


def _family_config(name: str):
    if name == "mistral_window":  # sliding window without layer_types: every layer slides
        return transformers.MistralConfig(**TINY, sliding_window=8)
    if name == "qwen2_window":  # sliding window on the layers from max_window_layers on
        return transformers.Qwen2Config(
            **TINY, use_sliding_window=True, sliding_window=8, max_window_layers=2
        )
    if name == "qwen3_head_dim":  # explicit head_dim != hidden_size // heads
        return transformers.Qwen3Config(**TINY, head_dim=24)
    raise ValueError(name)


@pytest.mark.parametrize("name", ["mistral_window", "qwen2_window", "qwen3_head_dim"])
def test_other_families_kv_bytes_match_analytic(name):
    config = _family_config(name)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    res = benchmark(model, contexts=(20,), new_tokens=1, repeats=1, warmup=0, progress=False)
    assert res["runs"][0]["kv_bytes"] == analytic_kv_bytes(config, 20, 1, 4)


def test_analytic_attn_layers_and_heterogeneous_config():
    config = llama_config()
    full = analytic_kv_bytes(config, 100, 1, 2)
    assert full == 2 * 100 * 4 * 2 * 16 * 2
    assert analytic_kv_bytes(config, 100, 1, 2, attn_layers=[0, 2]) == full // 2
    assert analytic_kv_bytes(config, 100, 1, 2, attn_layers=[]) == 0
    # Width-pruned attention: per-layer key/value head counts.
    hetero = llama_config(per_layer_config={1: {"num_key_value_heads": 1}, 3: {"num_key_value_heads": 4}})
    assert analytic_kv_bytes(hetero, 10, 3, 2) == 2 * 3 * 10 * (2 + 1 + 2 + 4) * 16 * 2
    # Gemma3 window layers
    g = gemma3_config()
    assert analytic_kv_bytes(g, 4, 1, 4) == 2 * 4 * 4 * 16 * 4
    assert analytic_kv_bytes(g, 100, 1, 4, attn_layers=[0]) == 2 * 7 * 16 * 4


def test_result_structure_and_decode_steps(llama):
    res = benchmark(llama, contexts=(12, 20), new_tokens=4, repeats=2, warmup=1, seed=3, progress=False)
    json.dumps(res)
    assert {"params", "disk_bytes", "device", "dtype", "runs"} <= set(res)
    assert res["params"] == sum(p.numel() for p in llama.parameters())
    assert res["disk_bytes"] is None
    assert res["device"] == "cpu" and res["dtype"] == "float32"
    for run in res["runs"]:
        assert RUN_KEYS <= set(run)
        assert "peak_gpu_bytes" not in run  # CPU run
        assert run["decode_steps"] == 4
        assert run["seq_len_after_decode"] == run["context"] + 4
        assert len(run["prefill_s_all"]) == 2 and len(run["decode_s_all"]) == 2
        assert run["prefill_tok_s"] > 0 and run["decode_tok_s"] > 0
        assert run["peak_rss_bytes"] > 0
    table = format_table(res)
    assert "prefill tok/s" in table and "decode tok/s" in table
    assert len(table.splitlines()) == 3 + len(res["runs"])


def test_no_decode_and_measured_helper(llama):
    res = benchmark(llama, contexts=(8,), new_tokens=0, repeats=1, warmup=0, progress=False)
    run = res["runs"][0]
    assert run["decode_steps"] == 0 and run["decode_tok_s"] is None
    assert run["seq_len_after_decode"] == 8
    assert "-" in format_table(res).splitlines()[-1]
    empty = transformers.DynamicCache(config=llama.config)
    assert measured_kv_bytes(empty) == (0, 0)  # uninitialised layers hold no tensors


def test_invalid_arguments(llama):
    with pytest.raises(ValueError):
        benchmark(llama, contexts=(0,), progress=False)
    with pytest.raises(ValueError):
        benchmark(llama, contexts=(8,), repeats=0, progress=False)


def test_peak_rss_of_a_block_sees_memory_that_was_freed_before_it_ended():
    import time

    from prunekit.evaluation.bench import PeakRSS

    with PeakRSS() as mem:
        start = mem.peak
        x = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
        time.sleep(0.3)  # several samples while it is alive
        del x
    assert mem.peak - start > 200 * 2**20
