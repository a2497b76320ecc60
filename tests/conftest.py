"""Shared fixtures: tiny randomly initialised models built in-process (fast, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True, scope="session")
def _scores_apart(tmp_path_factory):
    """The statistics the tests cache go to a folder of this session, not the user's cache (every tiny model
    is new, so its entries would only pile up there); the converted built-in models and prepared data are
    shared from the user's cache through links, so they are not made again."""
    user = Path(os.environ.get("PRUNEKIT_CACHE") or os.path.join("~", ".cache", "prunekit")).expanduser()
    session = tmp_path_factory.mktemp("prunekit-cache")
    user.mkdir(parents=True, exist_ok=True)
    for name in ("models", "gguf", "datasets", "tasks", "wheels"):
        (user / name).mkdir(exist_ok=True)
        (session / name).symlink_to(user / name)
    old = os.environ.get("PRUNEKIT_CACHE")
    os.environ["PRUNEKIT_CACHE"] = str(session)
    yield
    if old is None:
        os.environ.pop("PRUNEKIT_CACHE", None)
    else:
        os.environ["PRUNEKIT_CACHE"] = old

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=4, vocab_size=256, max_position_embeddings=512)


def tiny_config(model_type: str):
    """A tiny GQA config of one family (hidden 64, 4 heads, 2 KV heads, 4 layers, vocab 256)."""
    import transformers as t

    if model_type == "llama":
        return t.LlamaConfig(**TINY)
    if model_type == "mistral":
        return t.MistralConfig(**TINY, sliding_window=None)
    if model_type == "qwen2":
        return t.Qwen2Config(**TINY)
    if model_type == "qwen3":
        return t.Qwen3Config(**TINY, head_dim=16)
    if model_type == "gemma3_text":
        return t.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
    if model_type == "gemma2":
        return t.Gemma2Config(**TINY, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    if model_type == "olmo2":
        return t.Olmo2Config(**TINY)
    if model_type == "granite":
        # Multipliers away from 1, so that a step which forgot one of them cannot pass.
        return t.GraniteConfig(**TINY, embedding_multiplier=2.0, residual_multiplier=0.7,
                               attention_multiplier=0.2, logits_scaling=0.25,
                               eos_token_id=None)  # its default (2) comes up in greedy generation by chance
    if model_type == "smollm3":
        # Layer 1 has no rotary embedding: dropping a layer must keep the pattern with the layers that stay.
        return t.SmolLM3Config(**TINY, no_rope_layers=[1, 0, 1, 1], pad_token_id=0)
    if model_type == "phi3":
        return t.Phi3Config(**TINY, pad_token_id=0)
    if model_type in MOE_FAMILIES:
        return tiny_moe_config(model_type)
    raise ValueError(model_type)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "olmo2", "granite", "smollm3", "phi3"]
# Mixture-of-Experts families: 4 experts of width 128 (the dense families' intermediate size), top-2; Qwen2-MoE
# adds a shared expert of width 96, gpt-oss sliding-window layers (window 8). Renormalised top-k where the
# family lets it be chosen, so that removing an expert no token picks is exact.
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]


def tiny_moe_config(model_type: str, **overrides):
    import transformers as t

    moe = dict(num_experts_per_tok=2, **TINY, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    qwen = dict(moe, moe_intermediate_size=128, norm_topk_prob=True, num_experts=4)
    if model_type == "mixtral":
        cfg = t.MixtralConfig(**moe, num_local_experts=4, sliding_window=None)
    elif model_type == "qwen2_moe":
        cfg = t.Qwen2MoeConfig(**qwen, shared_expert_intermediate_size=96)
    elif model_type == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**qwen, head_dim=16)
    elif model_type == "olmoe":
        cfg = t.OlmoeConfig(**moe, num_experts=4, norm_topk_prob=True)
    elif model_type == "gpt_oss":
        cfg = t.GptOssConfig(**moe, num_local_experts=4, head_dim=16, sliding_window=8,
                             layer_types=["sliding_attention", "full_attention"] * 2,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    else:
        raise ValueError(model_type)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(model_type: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    # Random init leaves some weights (norms, biases) at constants; perturb them so that tests which
    # compare outputs cannot pass by accident.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a little text (offline, milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes parts of a network that matter least. "
    "A layer whose output is nearly its input adds little; attention layers deep in the stack are often such. "
) * 4


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A saved tiny Llama with a tokenizer, and a text file long enough for calibration and evaluation."""
    from prunekit.io.checkpoint import save_checkpoint

    model = tiny_model("llama")
    path = save_checkpoint(model, tiny_tokenizer(), tmp_path / "tiny-llama")
    text = tmp_path / "text.txt"
    words = SAMPLE_TEXT.split()
    rng = torch.Generator().manual_seed(0)
    # Shuffled words in paragraphs: plenty of tokens, deterministic.
    paras = [" ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=rng).tolist())
             for _ in range(80)]
    text.write_text("\n\n".join(paras))
    return path, text


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Send prunekit's caches (scores, prepared task data) to a temporary folder for this test."""
    cache = tmp_path / "prunekit-cache"
    monkeypatch.setenv("PRUNEKIT_CACHE", str(cache))
    return cache


def random_calib(n: int = 6, t: int = 24, seed: int = 1, pad_last: int = 0):
    """Deterministic random calibration batches; `pad_last` masks the last tokens of the last sample."""
    from prunekit.data import CalibrationData, token_hash

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, t), generator=g)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return CalibrationData(ids, mask, "random", token_hash(ids))


@torch.no_grad()
def whole_model_loss(model, calib, batch_size: int = 4) -> float:
    """Mean next-token NLL of `model` over `calib` by ordinary forward passes of the whole model: the oracle
    for losses the layer runner computes."""
    from prunekit.losses import token_nll

    total, count = 0.0, 0
    for ids, mask in calib.batches(batch_size):
        nll, n = token_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
        total, count = total + float(nll), count + n
    return total / count


def gguf_ready_checkpoint(folder):
    """A saved tiny Llama whose vocabulary is exactly its tokenizer's, as GGUF export requires."""
    from transformers import AutoModelForCausalLM

    from prunekit.io.checkpoint import save_checkpoint

    tok = tiny_tokenizer()
    cfg = tiny_config("llama")
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    return save_checkpoint(AutoModelForCausalLM.from_config(cfg).eval(), tok, folder)
