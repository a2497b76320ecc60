"""SmolLM3 in llama.cpp's `smollm3` graph: Llama's graph with some layers left without rotary embedding.

References read (written independently): llama.cpp `src/models/smollm3.cpp` (the graph), the SMOLLM3 hparams in
`src/llama-model.cpp`, convert_hf_to_gguf's `SmolLM3Model` (a `LlamaModel`: Q/K rows permuted for llama's
"normal" rope), gguf-py `MODEL_ARCH.SMOLLM3`.
- llama.cpp reads no key for the layers without rope: it fixes `n_no_rope_layer_step = 4`, and layer i skips
  rope iff (i + 1) % 4 == 0. Hugging Face keeps a per-layer list (`no_rope_layers`, 1 = rope), which a block
  drop slices with the layers, so a result is written only while its list still follows llama.cpp's rule;
- the graph applies no per-frequency rope factors (it passes none to rope) and has no sliding window, so a
  config that asks for either is refused; everything else (tensors, keys) is Llama's.
Only uniform results fit: llama.cpp's per-layer `deci` graph ropes every layer.
"""

from __future__ import annotations

from typing import Any

from prunekit.export.common import ExportError, ExportSource, has_biases, refuse_heterogeneous

__all__ = ["LLAMACPP_NO_ROPE_STEP", "smollm3_arch", "llamacpp_rope_layers"]

# llama.cpp's SMOLLM3 hparams set this step; no GGUF key changes it.
LLAMACPP_NO_ROPE_STEP = 4


def llamacpp_rope_layers(n_layer: int) -> list[int]:
    """Which layers llama.cpp's smollm3 graph ropes (1) or not (0), in Hugging Face's `no_rope_layers` form."""
    return [int((i + 1) % LLAMACPP_NO_ROPE_STEP != 0) for i in range(n_layer)]


def _rope_kind(cfg: Any) -> str:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    return str(params.get("rope_type") or "default")


def smollm3_arch(src: ExportSource) -> str:
    """`smollm3`, or one clear error for what llama.cpp's smollm3 graph would compute differently."""
    refuse_heterogeneous(src, "smollm3", "smollm3",
                         "ropes every layer, where SmolLM3 leaves some without")
    cfg = src.config
    have = [int(x) for x in cfg.no_rope_layers]
    want = llamacpp_rope_layers(len(have))
    if have != want:
        raise ExportError(
            f"this smollm3 result's layers without rope ({''.join(map(str, have))}, 1 = rope) no longer follow "
            f"llama.cpp's rule (every {LLAMACPP_NO_ROPE_STEP}th layer: {''.join(map(str, want))}), usually "
            "because a block was dropped; export the uniform model or use the Hugging Face checkpoint")
    problems = []
    # Hugging Face applies the window only when both are set (SmolLM3Attention).
    if getattr(cfg, "use_sliding_window", False) and "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        problems.append("sliding-window layers (the graph has none)")
    if _rope_kind(cfg) == "llama3":
        problems.append("llama3 rope scaling (the graph applies no per-frequency rope factors)")
    if getattr(cfg, "hidden_act", None) != "silu":
        problems.append(f"activation {cfg.hidden_act!r} (the graph uses SiLU)")
    if has_biases(src):
        problems.append("projection biases (not written)")
    if problems:
        raise ExportError("this smollm3 model cannot be written for llama.cpp's smollm3 graph: " + "; ".join(problems))
    return "smollm3"
