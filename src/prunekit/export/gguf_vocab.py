"""The tokenizer part of a GGUF file, written from a Hugging Face fast tokenizer (tokenizer.json).

Two llama.cpp tokenizer models cover the supported families:
- `gpt2`: byte-level BPE (Llama 3, SmolLM2, Qwen): tokens, types, merges and the pre-tokenizer's name
  (what convert_hf_to_gguf's `get_vocab_base` + `gguf.SpecialVocab` write);
- `llama`: SentencePiece-style BPE with byte fallback (Gemma, Llama 2, Mistral v0.1): tokens with `▁` for
  spaces, `<0xXX>` byte tokens, and a *score* per token. llama.cpp's SPM tokenizer merges the adjacent pair
  whose concatenation is the highest-scoring vocabulary token, where Hugging Face's BPE applies the
  lowest-ranked merge; writing score = -(rank of the first merge that produces the token) makes both pick the
  same pair whenever the merges list every split of a token into two vocabulary tokens, as the merges
  transformers derives from a SentencePiece model do. (gguf-py's `LlamaHfVocab` writes -1000 for every
  score, which would leave llama.cpp's merge order to chance.)
"""

from __future__ import annotations

import json
import re
from typing import Any

import gguf

from prunekit.export.common import ExportError
from prunekit.io.outputs import scratch_dir

__all__ = ["bpe_pre_name", "spm_scores", "write_vocab"]

# llama.cpp names of byte-level BPE pre-tokenizers (llama-vocab.cpp `tokenizer.ggml.pre`), recognised from the
# structure of tokenizer.json's `pre_tokenizer` rather than by hashing sample text as convert_hf_to_gguf does.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"  # SentencePiece's visible space


def bpe_pre_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer`, or one clear error."""
    def is_bytelevel(p: dict[str, Any], regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex

    p = pre_tokenizer or {}
    if is_bytelevel(p, True):
        return "gpt-2"
    if p.get("type") == "Sequence":
        parts = p.get("pretokenizers") or []
        if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") \
                and is_bytelevel(parts[1], True):
            return "smollm"
        if len(parts) == 2 and parts[0].get("type") == "Split" and is_bytelevel(parts[1], False):
            pattern = (parts[0].get("pattern") or {}).get("Regex")
            if pattern == _QWEN2_SPLIT:
                return "qwen2"
            if pattern == _LLAMA3_SPLIT:
                return "llama-bpe"
    raise ExportError(f"the tokenizer's pre-tokenizer {json.dumps(p)[:120]} has no llama.cpp equivalent prunekit "
                      "knows (gpt-2, smollm, qwen2, llama-bpe)")


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizer.json) tokenizer in the checkpoint")
    return json.loads(backend.to_str())


def _kind(tj: dict[str, Any]) -> str:
    """"gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback), or one clear error."""
    model, decoder = tj.get("model") or {}, tj.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "gpt2"
    decoders = [decoder] + list(decoder.get("decoders") or [])
    if model.get("type") == "BPE" and model.get("byte_fallback") and any(d.get("type") == "ByteFallback"
                                                                           for d in decoders):
        return "llama"
    raise ExportError("GGUF export supports byte-level BPE (GPT-2 style) and SentencePiece-style BPE with byte "
                      f"fallback tokenizers; this one is {model.get('type')!r} with decoder {decoder.get('type')!r}")


def _steps(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer as a flat list of steps."""
    if not node:
        return []
    inner = node.get("normalizers") or node.get("pretokenizers")
    return [s for part in inner for s in _steps(part)] if inner is not None else [node]


def _add_space_prefix(tj: dict[str, Any]) -> bool:
    """Whether the tokenizer puts `▁` before the text (SentencePiece's dummy prefix): a Prepend normalizer or a
    Metaspace pre-tokenizer that prepends. Gemma's does not; Llama 2's does."""
    if any(s.get("type") == "Prepend" and s.get("prepend") == _SPACE for s in _steps(tj.get("normalizer"))):
        return True
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
               for s in _steps(tj.get("pre_tokenizer")))


def _check_spm_spaces(tj: dict[str, Any]) -> None:
    """llama.cpp's SPM tokenizer turns every space into `▁` before merging; the HF tokenizer must do the same."""
    steps = _steps(tj.get("normalizer")) + _steps(tj.get("pre_tokenizer"))
    replaces = any(s.get("type") == "Replace" and (s.get("pattern") or {}).get("String") == " "
                   and s.get("content") == _SPACE for s in steps)
    if not (replaces or any(s.get("type") == "Metaspace" for s in steps)):
        raise ExportError("a byte-fallback BPE tokenizer goes to llama.cpp's SentencePiece tokenizer only when it "
                          "writes spaces as '\u2581' (a Replace normalizer or a Metaspace pre-tokenizer); this one "
                          "does not")


def spm_scores(vocab: dict[str, int], merges: list[Any]) -> dict[int, float]:
    """Score per normal token id: -(rank of the first merge producing it); tokens no merge produces (single
    characters) come after all merges, in id order (only merge results are ever looked up by score)."""
    first: dict[str, int] = {}
    for rank, m in enumerate(merges):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        first.setdefault(a + b, rank)
    scores = {vocab[t]: -float(r) for t, r in first.items() if t in vocab}
    rest = sorted(i for i in vocab.values() if i not in scores)
    scores.update({i: -float(len(merges) + k) for k, i in enumerate(rest)})
    return scores


def _token_table(tokenizer: Any, vocab_size: int, kind: str, tj: dict[str, Any]) -> tuple[list[str], list[int],
                                                                                           list[float]]:
    """(tokens, types, scores) for ids 0..vocab_size-1 (scores only matter to the SPM model)."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = dict(tokenizer.added_tokens_decoder)
    if max(reverse) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(reverse)} but the model's vocabulary is {vocab_size}")
    model = tj["model"]
    scores = spm_scores(model["vocab"], model.get("merges") or []) if kind == "llama" else {}
    tokens: list[str] = []
    types: list[int] = []
    out_scores: list[float] = []
    for i in range(vocab_size):
        score = scores.get(i, 0.0)
        if i not in reverse:  # the embedding is larger than the tokenizer: padding rows, as convert_hf_to_gguf
            tok, typ, score = f"[PAD{i}]", gguf.TokenType.UNUSED, -1000.0
        elif i in added:
            tok = added[i].content
            typ = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            score = -1000.0
        elif kind == "llama" and _BYTE_TOKEN.fullmatch(reverse[i]):
            tok, typ, score = reverse[i], gguf.TokenType.BYTE, 0.0
        else:
            tok, typ = reverse[i], gguf.TokenType.NORMAL
        tokens.append(tok)
        types.append(typ)
        out_scores.append(score)
    return tokens, types, out_scores


def write_vocab(w: Any, tokenizer: Any, vocab_size: int) -> str:
    """Tokenizer model, tokens, types (+ scores or merges), special tokens, BOS/EOS behaviour and chat template.
    Returns the llama.cpp tokenizer model written ("gpt2" or "llama")."""
    tj = _tokenizer_json(tokenizer)
    kind = _kind(tj)
    if kind == "llama":
        _check_spm_spaces(tj)
    pre = bpe_pre_name(tj.get("pre_tokenizer")) if kind == "gpt2" else "default"
    tokens, types, scores = _token_table(tokenizer, vocab_size, kind, tj)
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "llama":
        w.add_token_scores(scores)
        w.add_add_space_prefix(_add_space_prefix(tj))

    with scratch_dir("tok") as tmp:
        # SpecialVocab reads merges, special ids and the chat template from tokenizer files on disk; writing them
        # fresh works the same for a local directory, a built-in name or a hub id.
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=kind == "gpt2", n_vocab=vocab_size)
        special.add_special_token.clear()  # set below from the tokenizer's behaviour, not its config flags
        special.add_to_gguf(w, quiet=True)
    # Whether the tokenizer adds BOS/EOS, observed rather than read from config flags (which transformers 5
    # often omits; llama.cpp's default for BPE vocabularies would then add a BOS the HF tokenizer never adds).
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    w.add_add_bos_token(bool(ids) and bos is not None and ids[0] == bos)
    w.add_add_eos_token(bool(ids) and eos is not None and ids[-1] == eos and len(ids) > 1)
    return kind
