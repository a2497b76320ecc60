"""Export to GGUF (llama.cpp) and Nemotron-NAS (vLLM layout).

Fast tests build tiny models in-process and read the written files back (`gguf.GGUFReader`, safetensors);
tests that run llama.cpp skip with a message when its Python binding is not installed (`make llamacpp`);
tests on the real SmolLM2 and Gemma-3-270m are marked slow.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_config

from prunekit.adapters import get_adapter
from prunekit.errors import PrunekitError
from prunekit.export import ExportError, export_checkpoint, export_source
from prunekit.export.common import ExportSource, LayerShape, layer_shapes
from prunekit.export.engines import have_llama_cpp, have_xllamacpp
from prunekit.export.gguf import bpe_pre_name, permute_qk
from prunekit.export.gguf_gemma3 import swa_period
from prunekit.export.gguf_vocab import spm_scores
from prunekit.plans import DropTarget, LayerWidth, PruningPlan
from prunekit.surgery import apply_plan

needs_xllamacpp = pytest.mark.skipif(not have_xllamacpp(), reason="xllamacpp not installed (make llamacpp)")
needs_llama_cpp = pytest.mark.skipif(not have_llama_cpp(), reason="llama-cpp-python not installed (make llamacpp)")


def bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with merges (llama.cpp refuses a BPE vocabulary without them). Its alphabet is
    only the ASCII characters of the sample text, so every token decodes to whole UTF-8 characters: llama-server
    withholds log-probabilities of tokens that end inside a multi-byte character, which a random model emits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


SPM_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
BYTE_IDS = range(len(SPM_SPECIALS), len(SPM_SPECIALS) + 256)


def spm_tokenizer(vocab_size: int = 320):
    """A Gemma-style tokenizer.json: BPE with byte fallback, spaces as '▁' (no dummy prefix), <0xXX> byte
    tokens, BOS added. Its merges list every split of every token into two tokens, ordered by the merged token,
    which is how transformers writes the merges of a SentencePiece model."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    space = "\u2581"
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", space)
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="never")
    trainer_tok.train_from_iterator([SAMPLE_TEXT], trainer=trainers.BpeTrainer(vocab_size=vocab_size,
                                                                              show_progress=False))
    learned = trainer_tok.get_vocab()
    vocab = {t: i for i, t in enumerate(SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(learned, key=learned.get):
        vocab.setdefault(t, len(vocab))
    merges = [(t[:k], t[k:]) for t in sorted(learned, key=learned.get) for k in range(1, len(t))
              if t[:k] in vocab and t[k:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", space)
    tok.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_gemma_source(plan: PruningPlan | None = None, seed: int = 0, family: str = "gemma3_text") -> ExportSource:
    """Tiny Gemma 3 or 2 (layers sliding, full, sliding, full; window 8) with the Gemma-style tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = spm_tokenizer()
    cfg = tiny_config(family)
    cfg.vocab_size = len(tok)
    cfg.query_pre_attn_scalar = cfg.head_dim  # llama.cpp's gemma3 graph scales by 1/sqrt(head_dim)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        # Byte tokens never win greedy decoding: llama-server withholds a token that ends inside a UTF-8 character.
        model.get_input_embeddings().weight[BYTE_IDS.start:BYTE_IDS.stop] = 0
    adapter = get_adapter(model)
    if plan is not None:
        apply_plan(adapter, plan)
    return ExportSource(model, tok, adapter, layer_shapes(adapter))


def tiny_source(family: str = "llama", plan: PruningPlan | None = None, seed: int = 0) -> ExportSource:
    return source_of(tiny_config(family), plan, seed)


def source_of(cfg, plan: PruningPlan | None = None, seed: int = 0) -> ExportSource:
    """A model of `cfg` with the BPE tokenizer's vocabulary and perturbed weights, `plan` applied."""
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer()
    cfg.vocab_size = len(tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # perturb constant inits (norms, biases) so comparisons cannot pass by accident
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    adapter = get_adapter(model)
    if plan is not None:
        apply_plan(adapter, plan)
    return ExportSource(model, tok, adapter, layer_shapes(adapter))


# Structures every exporter must handle: name -> plan on the tiny 4-layer GQA model (4 heads, 2 KV heads, MLP 128).
PLANS: dict[str, PruningPlan | None] = {
    "dense": None,
    "attn-drop": PruningPlan(dropped=[DropTarget(1, "attn"), DropTarget(2, "attn")]),
    "mlp-drop": PruningPlan(dropped=[DropTarget(0, "mlp"), DropTarget(3, "mlp")]),
    "block-drop": PruningPlan(dropped=[DropTarget(2, "block")]),
    "uniform-width": PruningPlan(widths={i: LayerWidth(heads=[0, 2], kv_heads=[0, 1], channels=list(range(0, 128, 2)))
                                         for i in range(4)}),
    "per-layer-width": PruningPlan(
        dropped=[DropTarget(1, "attn"), DropTarget(2, "mlp")],
        widths={0: LayerWidth(kv_heads=[1], heads=[2, 3], channels=list(range(96))),
                3: LayerWidth(channels=list(range(32, 128)))}),
}


def _read(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def _tensor(t) -> np.ndarray:
    """A GGUF tensor in PyTorch's (out, in) order."""
    return np.asarray(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])


# --- GGUF: metadata and tensors, read back (no binding needed) ----------------------------------------------

def test_gguf_heterogeneous_llama_is_deci_with_per_layer_arrays(tmp_path):
    src = tiny_source("llama", PLANS["per-layer-width"])
    assert src.shapes == [LayerShape(2, 1, 96), LayerShape(0, 0, 128), LayerShape(4, 2, 0), LayerShape(4, 2, 96)]
    out = export_source(src, tmp_path / "m.gguf", format="gguf", quant="f32", progress=False)
    f, t = _read(out)
    assert f["general.architecture"] == "deci"
    assert f["deci.block_count"] == 4
    assert f["deci.attention.head_count"] == [2, 0, 4, 4]
    assert f["deci.attention.head_count_kv"] == [1, 0, 2, 2]
    # Layer 2 keeps attention but no MLP: written as a 32-wide all-zero MLP, because llama.cpp's deci graph
    # would drop the attention output of an n_ff == 0 layer.
    assert f["deci.feed_forward_length"] == [96, 128, 32, 96]
    assert f["deci.attention.key_length"] == f["deci.attention.value_length"] == 16
    assert f["deci.rope.dimension_count"] == 16
    assert not np.any(_tensor(t["blk.2.ffn_down.weight"]))
    # Removed attention: no attention tensors, no attention norm.
    assert not [n for n in t if n.startswith("blk.1.attn")]
    assert _tensor(t["blk.0.attn_q.weight"]).shape == (2 * 16, 64)
    assert _tensor(t["blk.0.attn_k.weight"]).shape == (1 * 16, 64)
    assert _tensor(t["blk.0.ffn_up.weight"]).shape == (96, 64)
    # Q/K rows permuted for llama.cpp's rope; V untouched.
    layer0 = src.adapter.layers()[0]
    q, k, v, _ = src.adapter.attn_projections(layer0)
    np.testing.assert_array_equal(_tensor(t["blk.0.attn_q.weight"]), permute_qk(q.weight, 2).detach().numpy())
    np.testing.assert_array_equal(_tensor(t["blk.0.attn_k.weight"]), permute_qk(k.weight, 1).detach().numpy())
    np.testing.assert_array_equal(_tensor(t["blk.0.attn_v.weight"]), v.weight.detach().numpy())
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_gguf_vocab_and_special_tokens(tmp_path):
    src = tiny_source("llama")
    out = export_source(src, tmp_path / "m.gguf", format="gguf", progress=False)
    f, t = _read(out)
    tok = src.tokenizer
    assert f["general.architecture"] == "llama"
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    vocab = {v: k for k, v in tok.get_vocab().items()}
    assert f["tokenizer.ggml.tokens"] == [vocab[i] for i in range(len(tok))]
    assert f["tokenizer.ggml.token_type"][tok.eos_token_id] == 3  # CONTROL
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert len(f["tokenizer.ggml.merges"]) == len(merges) > 0
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert t["token_embd.weight"].tensor_type.name == "F16"
    assert "output.weight" in t  # the tiny Llama is untied


def test_gguf_uniform_qwen2_keeps_biases_and_no_permutation(tmp_path):
    src = tiny_source("qwen2", PLANS["uniform-width"])
    assert not src.heterogeneous
    out = export_source(src, tmp_path / "q.gguf", format="gguf", quant="f32", progress=False)
    f, t = _read(out)
    assert f["general.architecture"] == "qwen2"
    assert f["qwen2.attention.head_count"] == 2 and f["qwen2.feed_forward_length"] == 64
    q = src.adapter.attn_projections(src.adapter.layers()[0])[0]
    # qwen2 in llama.cpp uses NEOX rope (rotate-half, as Hugging Face): no permutation.
    np.testing.assert_array_equal(_tensor(t["blk.0.attn_q.weight"]), q.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(t["blk.0.attn_q.bias"].data), q.bias.detach().numpy())


def test_gguf_heterogeneous_qwen2_goes_to_deci_with_permuted_biases(tmp_path):
    src = tiny_source("qwen2", PLANS["attn-drop"])
    out = export_source(src, tmp_path / "q.gguf", format="gguf", quant="f32", progress=False)
    f, t = _read(out)
    assert f["general.architecture"] == "deci"
    k = src.adapter.attn_projections(src.adapter.layers()[0])[1]
    np.testing.assert_array_equal(np.asarray(t["blk.0.attn_k.bias"].data), permute_qk(k.bias, 2).detach().numpy())


def test_gguf_errors_are_one_clear_line(tmp_path):
    gemma = tiny_source("gemma3_text", PLANS["attn-drop"])
    with pytest.raises(ExportError, match="heterogeneous Gemma 3.*deci"):
        export_source(gemma, tmp_path / "g.gguf", format="gguf", progress=False)
    assert not list(tmp_path.iterdir())  # nothing half-written
    qwen3 = tiny_source("qwen3", PLANS["mlp-drop"])
    with pytest.raises(ExportError, match="q/k norms"):
        export_source(qwen3, tmp_path / "q3.gguf", format="gguf", progress=False)
    src = tiny_source("llama")
    (tmp_path / "exists.gguf").write_text("x")
    with pytest.raises(PrunekitError, match="exists"):
        export_source(src, tmp_path / "exists.gguf", format="gguf", progress=False)
    with pytest.raises(ExportError, match="unknown export format"):
        export_source(src, tmp_path / "x", format="onnx")
    with pytest.raises(ExportError, match="unknown GGUF type"):
        export_source(src, tmp_path / "x.gguf", format="gguf", quant="q3_xxs")
    with pytest.raises(ExportError, match="pre-tokenizer"):
        bpe_pre_name({"type": "Whitespace"})


# --- GGUF: Gemma 3 (SentencePiece-style vocabulary, 1 + w norms, sliding-window keys) ---------------------------

GEMMA_PLANS: dict[str, PruningPlan | None] = {
    "dense": None,
    "uniform-width": PruningPlan(widths={i: LayerWidth(heads=[0, 2], kv_heads=[0, 1], channels=list(range(0, 128, 2)))
                                         for i in range(4)}),
    # Dropping layer 1 leaves sliding, sliding, full: still one period (3), so the stock graph expresses it.
    "block-drop-periodic": PruningPlan(dropped=[DropTarget(1, "block")]),
}


def test_gguf_gemma3_keys_norms_and_tensors(tmp_path):
    src = tiny_gemma_source()
    out = export_source(src, tmp_path / "g.gguf", format="gguf", quant="f32", progress=False)
    f, t = _read(out)
    assert f["general.architecture"] == "gemma3"
    assert (f["gemma3.block_count"], f["gemma3.attention.head_count"], f["gemma3.attention.head_count_kv"]) == (4, 4, 2)
    assert f["gemma3.attention.key_length"] == f["gemma3.attention.value_length"] == 16
    assert f["gemma3.attention.sliding_window"] == 8
    assert f["gemma3.attention.sliding_window_pattern"] == 2  # sliding, full, sliding, full
    rope = src.config.rope_parameters
    assert f["gemma3.rope.freq_base"] == rope["full_attention"]["rope_theta"]
    assert f["gemma3.rope.freq_base_swa"] == rope["sliding_attention"]["rope_theta"]
    layer = src.adapter.layers()[1]
    # llama.cpp multiplies by the stored norm weight; Hugging Face's Gemma norm by (1 + w).
    for name, module in (("attn_norm", layer.input_layernorm), ("post_attention_norm", layer.post_attention_layernorm),
                         ("ffn_norm", layer.pre_feedforward_layernorm), ("post_ffw_norm", layer.post_feedforward_layernorm),
                         ("attn_q_norm", layer.self_attn.q_norm), ("attn_k_norm", layer.self_attn.k_norm)):
        np.testing.assert_array_equal(_tensor(t[f"blk.1.{name}.weight"]), module.weight.detach().numpy() + 1)
    np.testing.assert_array_equal(_tensor(t["output_norm.weight"]), src.adapter.final_norm().weight.detach().numpy() + 1)
    # NEOX rope in both: Q/K unpermuted; the embedding unscaled (the graph multiplies by sqrt(hidden)).
    np.testing.assert_array_equal(_tensor(t["blk.1.attn_q.weight"]), layer.self_attn.q_proj.weight.detach().numpy())
    np.testing.assert_array_equal(_tensor(t["token_embd.weight"]), src.adapter.embed().weight.detach().numpy())
    assert "output.weight" not in t  # tied


def test_gguf_gemma3_sentencepiece_vocabulary(tmp_path):
    src = tiny_gemma_source()
    out = export_source(src, tmp_path / "g.gguf", format="gguf", quant="f16", progress=False)
    f, _ = _read(out)
    tok = src.tokenizer
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("llama", "default")
    assert f["tokenizer.ggml.tokens"] == [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    types, scores = f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    assert types[:4] == [3, 3, 3, 3]  # CONTROL
    assert {types[i] for i in BYTE_IDS} == {6} and {scores[i] for i in BYTE_IDS} == {0.0}  # BYTE
    assert set(types[BYTE_IDS.stop:]) == {1}  # NORMAL
    assert f["tokenizer.ggml.add_space_prefix"] is False and f["tokenizer.ggml.add_bos_token"] is True
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert "tokenizer.ggml.merges" not in f


def test_spm_scores_follow_the_first_merge():
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    merges = [["a", "b"], ["b", "c"], ["ab", "c"], ["a", "bc"]]
    # Merge results score by their first merge; "abc" (merges 2 and 3) by 2; characters after every merge.
    assert spm_scores(vocab, merges) == {3: 0.0, 4: -1.0, 5: -2.0, 0: -4.0, 1: -5.0, 2: -6.0}
    assert spm_scores(vocab, ["a b", "b c"])[3] == 0.0  # the older "a b" string form


def test_gemma3_sliding_pattern_period():
    S, F = "sliding_attention", "full_attention"
    assert swa_period([S] * 5 + [F] + [S] * 5 + [F]) == 6
    assert swa_period([S, S, F]) == 3 and swa_period([S, S]) == 3  # no full layer: every layer slides
    with pytest.raises(ExportError, match="one period.*SSFSF"):
        swa_period([S, S, F, S, F])


def test_gguf_gemma3_refuses_what_the_graph_computes_differently(tmp_path):
    # Block 0 dropped: full, sliding, full follows no period llama.cpp can express.
    with pytest.raises(ExportError, match="one period.*FSF"):
        export_source(tiny_gemma_source(PruningPlan(dropped=[DropTarget(0, "block")])), tmp_path / "a.gguf",
                      format="gguf", progress=False)
    src = tiny_gemma_source()
    src.config.query_pre_attn_scalar = 256
    src.config.final_logit_softcapping = 30.0
    with pytest.raises(ExportError, match="final_logit_softcapping=30.0.*attention scale 0.0625 .llama.cpp uses 0.25"):
        export_source(src, tmp_path / "b.gguf", format="gguf", progress=False)
    assert not list(tmp_path.iterdir())


def test_engine_costs_count_what_llamacpp_reads_and_computes(tmp_path):
    from prunekit.export.costs import engine_costs

    costs = {}
    for name in ("dense", "per-layer-width"):
        src = tiny_source("llama", PLANS[name])
        out = export_source(src, tmp_path / f"{name}.gguf", format="gguf", quant="f32", progress=False)
        costs[name] = c = engine_costs(out)
        _, t = _read(out)
        layer_matrices = sum(p.numel() for layer in src.adapter.layers() for p in layer.parameters() if p.ndim == 2)
        standins = 3 * 32 * 64 if name == "per-layer-width" else 0  # layer 2's all-zero MLP is read and multiplied
        assert c.matmul_params == layer_matrices + standins
        assert c.output_params == len(src.tokenizer) * 64  # untied: the output matrix, once per token
        # Untied: one embedding row is read per token, not the whole table.
        assert c.decode_weight_bytes == c.tensor_bytes - int(t["token_embd.weight"].n_bytes) + 64 * 4
        kv_heads = [s.n_head_kv for s in src.shapes]
        assert c.kv_bytes_per_position == sum(kv_heads) * (16 + 16) * 2  # f16 K and V
        assert c.attn_head_dims == sum(s.n_head for s in src.shapes) * (16 + 16)
    dense = costs["dense"]
    assert dense.decode_bytes(100) == dense.decode_weight_bytes + 100 * dense.kv_bytes_per_position
    assert dense.prefill_flops(3) == 2 * (3 * dense.matmul_params + 6 * dense.attn_head_dims + dense.output_params)


@pytest.mark.skipif(have_llama_cpp(), reason="checks the message shown when llama-cpp-python is missing")
def test_quantized_gguf_without_binding_names_the_make_target(tmp_path):
    with pytest.raises(ExportError, match="make llamacpp"):
        export_source(tiny_source("llama"), tmp_path / "m.gguf", format="gguf", quant="q8_0", progress=False)
    assert not list(tmp_path.iterdir())


def test_export_arguments_parse():
    from prunekit import export
    from prunekit.cli import build_parser
    from prunekit.cli import export as cli_export

    a = build_parser().parse_args(["export", "m", "--format", "gguf", "--out", "x.gguf", "--quant", "q8_0"])
    assert (a.model, a.format, a.out, a.quant, a.force) == ("m", "gguf", "x.gguf", "q8_0", False)
    # The CLI spells its choices out (no torch at parse time); they must be the library's.
    assert cli_export.FORMATS == export.FORMATS and set(cli_export.QUANTS) == set(export.QUANTS) | {"bf16"}


def test_export_checkpoint_from_saved_directory(tmp_path):
    from prunekit.io.checkpoint import save_checkpoint

    src = tiny_source("llama", PLANS["per-layer-width"])
    ckpt = save_checkpoint(src.model, src.tokenizer, tmp_path / "ckpt")
    out = export_checkpoint(ckpt, tmp_path / "m.gguf", format="gguf", progress=False)
    f, _ = _read(out)
    assert f["deci.attention.head_count"] == [2, 0, 4, 4]


# --- GGUF: llama.cpp runs it and agrees with transformers ---------------------------------------------------

def _hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    ids = list(prompt)
    logps = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)
            logps.append(lp)
            ids.append(int(lp.argmax()))
    return ids[len(prompt):], logps


def past_window_prompt(src) -> list[int]:
    """48 tokens of the sample text: past the tiny models' sliding windows (8), so windows, their layers and
    per-layer rope all count."""
    prompt = src.tokenizer(SAMPLE_TEXT)["input_ids"][:48]
    assert len(prompt) == 48
    return prompt


def _assert_top_logprobs_match(src, gguf, prompt, tol, name):
    """llama.cpp's greedy tokens equal transformers', and its top-5 log-probs are within `tol` at each step."""
    from prunekit.export.engines import xserver

    hf_tokens, hf_logps = _hf_greedy(src.model, prompt, 8)
    with xserver(gguf, n_ctx=256, threads=2) as s:
        c = s.complete(prompt, 8, n_probs=5)
    assert c.tokens == hf_tokens
    for step, (tops, lp) in enumerate(zip(c.top_logprobs, hf_logps)):
        for tid, v in tops.items():
            assert abs(v - float(lp[tid])) < tol, (name, step, tid, v, float(lp[tid]))


@needs_xllamacpp
@pytest.mark.parametrize("name", list(PLANS))
def test_llamacpp_logprobs_match_transformers_tiny(tmp_path, name):
    src = tiny_source("llama", PLANS[name])
    out = export_source(src, tmp_path / "m.gguf", format="gguf", quant="f32", progress=False)
    prompt = src.tokenizer(SAMPLE_TEXT[:80])["input_ids"]
    _assert_top_logprobs_match(src, out, prompt, 2e-3, name)


@needs_xllamacpp
@pytest.mark.parametrize("name", list(GEMMA_PLANS))
def test_llamacpp_gemma3_logprobs_match_transformers_tiny(tmp_path, name):
    """48 prompt tokens: past the sliding window (8), so window, per-layer-type rope bases and pattern all count."""
    src = tiny_gemma_source(GEMMA_PLANS[name])
    out = export_source(src, tmp_path / "g.gguf", format="gguf", quant="f32", progress=False)
    prompt = past_window_prompt(src)
    # 3e-3, not 2e-3: ggml's GELU reads a float16 table.
    _assert_top_logprobs_match(src, out, prompt, 3e-3, name)


@needs_llama_cpp
def test_llamacpp_tokenizes_the_gemma_vocabulary_like_transformers(tmp_path):
    from llama_cpp import Llama

    src = tiny_gemma_source()
    out = export_source(src, tmp_path / "g.gguf", format="gguf", quant="f16", progress=False)
    llm = Llama(model_path=str(out), n_ctx=64, verbose=False, vocab_only=True)
    for text in (SAMPLE_TEXT, "  two  spaces, caf\u00e9 \u2603 and unseen words: zygote quixotic"):
        ids = src.tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
        assert llm.detokenize(ids[1:]).decode() == text


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_gguf_comes_from_llamacpp_quantizer(tmp_path, quant):
    src = tiny_source("llama", PLANS["per-layer-width"])
    out = export_source(src, tmp_path / "m.gguf", format="gguf", quant=quant, progress=False)
    f, t = _read(out)
    assert f["general.architecture"] == "deci"
    assert f["deci.attention.head_count"] == [2, 0, 4, 4]
    types = {x.tensor_type.name for n, x in t.items() if n.endswith("weight") and len(x.shape) == 2}
    assert types - {"F16", "F32"}, types  # matrices were quantized by llama.cpp
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # the f16 intermediate is gone


# --- SmolLM2 (real weights): greedy text and perplexity in llama.cpp vs transformers ------------------------

def _smollm2_variants():
    """name -> plan on SmolLM2-135M (30 layers, 9 heads / 3 KV heads, MLP 1536). Hand-written: the point is
    the structure, not which layers a scorer would choose."""
    return {
        "dense": None,
        "attn-drop": PruningPlan(dropped=[DropTarget(i, "attn") for i in (18, 20, 22, 24, 26)]),
        "mlp-drop": PruningPlan(dropped=[DropTarget(i, "mlp") for i in (19, 21, 23)]),
        "block-drop": PruningPlan(dropped=[DropTarget(i, "block") for i in (24, 25)]),
        "uniform-width": PruningPlan(widths={i: LayerWidth(channels=list(range(1280))) for i in range(30)}),
        "per-layer-width": PruningPlan(
            dropped=[DropTarget(25, "attn"), DropTarget(27, "mlp")],
            widths={**{i: LayerWidth(kv_heads=[0, 2], heads=[0, 1, 2, 6, 7, 8]) for i in (10, 12)},
                    **{i: LayerWidth(channels=list(range(1024))) for i in range(14, 22)}}),
    }


def _real_source(model: str, plan: PruningPlan | None) -> ExportSource:
    """A built-in model with real weights, pruned by `plan` (None: dense), ready to export."""
    from prunekit.export.common import load_source

    src = load_source(model)
    if plan is not None:
        apply_plan(src.adapter, plan)
        src.shapes = layer_shapes(src.adapter)
    return src


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def _check_greedy_text(src: ExportSource, out, name: str) -> None:
    """llama.cpp's greedy continuation of each text prompt equals transformers'. Text in, text out: llama.cpp
    tokenizes the prompt itself (adding BOS) and detokenizes its output, so this also checks the exported
    vocabulary both ways."""
    from prunekit.export.engines import xserver

    with xserver(out, n_ctx=512, threads=2) as s:
        for prompt in PROMPTS:
            hf_tokens, _ = _hf_greedy(src.model, src.tokenizer(prompt)["input_ids"], 16)
            assert s.complete(prompt, 16).text == src.tokenizer.decode(hf_tokens), (name, prompt)


def _check_perplexity_within_1pct(src: ExportSource, out, window_len: int, name: str) -> None:
    """Perplexity on 4 held-out Wikipedia windows (the eval split), llama.cpp's full logits through
    llama-cpp-python against transformers: within 1%."""
    from prunekit.data import eval_windows
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.export.engines import llamacpp_nll

    windows = eval_windows(src.tokenizer, "wiki", 4, window_len)
    hf_ppl = perplexity(src.model, windows, progress=False)["perplexity"]
    cpp_ppl = math.exp(llamacpp_nll(out, windows.tolist(), threads=2))
    print(f"{name}: perplexity transformers {hf_ppl:.4f} llama.cpp f16 {cpp_ppl:.4f}", flush=True)
    assert abs(cpp_ppl / hf_ppl - 1) < 0.01, (name, hf_ppl, cpp_ppl)


@pytest.mark.slow
@pytest.mark.real
@needs_xllamacpp
@pytest.mark.parametrize("name", list(_smollm2_variants()))
def test_smollm2_gguf_greedy_matches_transformers(tmp_path, name):
    src = _real_source("smollm2-135m", _smollm2_variants()[name])
    _check_greedy_text(src, export_source(src, tmp_path / "m.gguf", format="gguf", quant="f16", progress=False),
                       name)


@pytest.mark.slow
@pytest.mark.real
@needs_llama_cpp
@pytest.mark.parametrize("name", list(_smollm2_variants()))
def test_smollm2_gguf_perplexity_within_1pct(tmp_path, name):
    src = _real_source("smollm2-135m", _smollm2_variants()[name])
    out = export_source(src, tmp_path / "m.gguf", format="gguf", quant="f16", progress=False)
    _check_perplexity_within_1pct(src, out, 512, name)


# --- Gemma-3-270m (real weights): the same checks through the gemma3 graph ---------------------------------

GEMMA_REAL_PLANS: dict[str, PruningPlan | None] = {
    "dense": None,
    "uniform-mlp-1536": PruningPlan(widths={i: LayerWidth(channels=list(range(1536))) for i in range(18)}),
}


@pytest.mark.slow
@pytest.mark.real
@needs_xllamacpp
@pytest.mark.parametrize("name", list(GEMMA_REAL_PLANS))
def test_gemma3_gguf_greedy_matches_transformers(tmp_path, name):
    src = _real_source("gemma3-270m", GEMMA_REAL_PLANS[name])
    _check_greedy_text(src, export_source(src, tmp_path / "g.gguf", format="gguf", quant="f16", progress=False),
                       name)


@pytest.mark.slow
@pytest.mark.real
@needs_llama_cpp
@pytest.mark.parametrize("name", list(GEMMA_REAL_PLANS))
def test_gemma3_gguf_perplexity_within_1pct(tmp_path, name):
    """Windows of 1024 tokens: past the 512-token sliding window."""
    src = _real_source("gemma3-270m", GEMMA_REAL_PLANS[name])
    out = export_source(src, tmp_path / "g.gguf", format="gguf", quant="f16", progress=False)
    _check_perplexity_within_1pct(src, out, 1024, f"gemma3 {name}")


@pytest.mark.slow
@pytest.mark.real
@needs_llama_cpp
def test_gemma3_gguf_tokenizes_text_like_transformers(tmp_path):
    """The exported vocabulary, scores from the merges, against transformers on held-out text."""
    from llama_cpp import Llama

    from prunekit.data import read_documents

    src = _real_source("gemma3-270m", None)
    out = export_source(src, tmp_path / "g.gguf", format="gguf", quant="f16", progress=False)
    llm = Llama(model_path=str(out), n_ctx=64, verbose=False, vocab_only=True)
    docs = read_documents("wiki")[-100:]  # from the evaluation half
    assert sum(len(d) for d in docs) > 20000
    for doc in docs:
        assert llm.tokenize(doc.encode(), add_bos=True, special=False) == src.tokenizer(doc)["input_ids"]


# --- Nemotron-NAS: a loader written from the documented keys rebuilds the same model -------------------------

class _RMSNorm(torch.nn.Module):
    def __init__(self, w: torch.Tensor, eps: float):
        super().__init__()
        self.w, self.eps = w, eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


def _rope(x, theta: float):
    """Rotate-half rope (what vLLM's DeciLM uses: neox style) on [heads, T, head_dim]."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def nemotron_nas_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    """A DeciLM forward pass from config.json + safetensors only (keys as vLLM's nemotron_nas.py reads them)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.float() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    hidden, n_head, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    x = w["model.embed_tokens.weight"][ids]
    T = ids.shape[0]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i, block in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        if not block["attention"]["no_op"]:
            n_kv = n_head // block["attention"]["n_heads_in_group"]
            h = _RMSNorm(w[p + "input_layernorm.weight"], eps)(x)

            def proj(name, n):
                y = h @ w[p + f"self_attn.{name}.weight"].T
                if p + f"self_attn.{name}.bias" in w:
                    y = y + w[p + f"self_attn.{name}.bias"]
                return y.view(T, n, hd).transpose(0, 1)

            q, k, v = _rope(proj("q_proj", n_head), theta), _rope(proj("k_proj", n_kv), theta), proj("v_proj", n_kv)
            k, v = k.repeat_interleave(n_head // n_kv, 0), v.repeat_interleave(n_head // n_kv, 0)
            att = torch.softmax(q @ k.transpose(1, 2) / hd**0.5 + mask, -1) @ v
            x = x + att.transpose(0, 1).reshape(T, n_head * hd) @ w[p + "self_attn.o_proj.weight"].T
        if not block["ffn"]["no_op"]:
            ffn = block["ffn"]
            if ffn.get("ffn_mult") is not None:
                from prunekit.export.nemotron_nas import ffn_mult_to_intermediate_size

                assert ffn_mult_to_intermediate_size(ffn["ffn_mult"], hidden) == ffn["intermediate_size"]
            h = _RMSNorm(w[p + "post_attention_layernorm.weight"], eps)(x)
            g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            assert g.shape[-1] == ffn["intermediate_size"]
            x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
    x = _RMSNorm(w["model.norm.weight"], eps)(x)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


# Fixed query heads (2) in every attention layer, KV heads 2 or 1, attention/MLP removed, MLP widths per layer.
NAS_PLAN = PruningPlan(
    dropped=[DropTarget(2, "attn"), DropTarget(1, "mlp")],
    widths={0: LayerWidth(heads=[0, 2], kv_heads=[0, 1]), 1: LayerWidth(heads=[0, 1], kv_heads=[0]),
            3: LayerWidth(heads=[2, 3], kv_heads=[1], channels=list(range(96)))})


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_nemotron_nas_rebuilds_the_same_logits(tmp_path, family):
    src = tiny_source(family, NAS_PLAN)
    out = export_source(src, tmp_path / "nas", format="nemotron-nas", quant="f32", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == [1, 2, None, 2]
    assert [b["attention"]["no_op"] for b in cfg["block_configs"]] == [False, False, True, False]
    assert [b["ffn"].get("intermediate_size") for b in cfg["block_configs"]] == [128, None, 128, 96]
    assert "prunekit" not in cfg
    # The export's own config class gives vLLM-style attribute access to exactly the keys written.
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert loaded.model_type == "nemotron-nas"
    assert [b.attention.no_op for b in loaded.block_configs] == [False, False, True, False]
    assert loaded.block_configs[1].ffn.no_op and not hasattr(loaded.block_configs[3].ffn, "ffn_mult")
    assert loaded.num_attention_heads == 2 and loaded.head_dim == 16
    ids = torch.tensor(src.tokenizer(SAMPLE_TEXT[:120])["input_ids"])
    with torch.no_grad():
        want = src.model(ids[None]).logits[0]
        got = nemotron_nas_logits(out, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").is_file()


def test_nemotron_nas_from_a_saved_heterogeneous_checkpoint_equals_the_in_memory_export(tmp_path):
    """A saved heterogeneous checkpoint has prunekit's own model_type; the exporter reads it through prunekit's
    loader as the stock architecture."""
    from prunekit.io.checkpoint import save_checkpoint

    src = tiny_source("llama", NAS_PLAN)
    ckpt = save_checkpoint(src.model, src.tokenizer, tmp_path / "ckpt")
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "prunekit_llama"
    mem = export_source(src, tmp_path / "mem", format="nemotron-nas", quant="f32", progress=False)
    disk = export_checkpoint(ckpt, tmp_path / "disk", format="nemotron-nas", quant="f32", progress=False)
    cfg = json.loads((disk / "config.json").read_text())
    assert cfg == json.loads((mem / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and "prunekit" not in json.dumps(cfg)
    ids = torch.tensor(src.tokenizer(SAMPLE_TEXT[:120])["input_ids"])
    assert torch.equal(nemotron_nas_logits(disk, ids), nemotron_nas_logits(mem, ids))


def test_nemotron_nas_ffn_mult_round_trip():
    from prunekit.export.nemotron_nas import _exact_ffn_mult, ffn_mult_to_intermediate_size

    for hidden, inter in ((4096, 14336), (8192, 28672), (576, 1536), (576, 1280)):
        mult = _exact_ffn_mult(inter, hidden)
        assert mult is not None and ffn_mult_to_intermediate_size(mult, hidden) == inter
    assert _exact_ffn_mult(96, 64) is None  # not a multiple of 256: only intermediate_size can say it


def test_nemotron_nas_refuses_per_layer_query_heads(tmp_path):
    src = tiny_source("llama", PLANS["per-layer-width"])
    with pytest.raises(ExportError, match="per-layer query heads.*--format gguf"):
        export_source(src, tmp_path / "nas", format="nemotron-nas", progress=False)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match="Llama-style"):
        export_source(tiny_source("gemma3_text"), tmp_path / "nas", format="nemotron-nas", progress=False)
