"""`prunekit export`: a pruned checkpoint for inference engines (GGUF for llama.cpp, Nemotron-NAS for vLLM)."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import MODEL_HELP, emit, progress

# Spelled out so that building the parser needs no torch; a test checks them against `prunekit.export`.
FORMATS = ("gguf", "nemotron-nas")
QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0")


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write a pruned checkpoint for inference engines: GGUF (llama.cpp) or "
                                      "Nemotron-NAS block_configs (vLLM and friends)",
                       description="GGUF: uniform results as their stock llama.cpp architecture, heterogeneous ones "
                                   "(dropped sub-layers, per-layer widths) as `deci`; f32/f16 written directly, "
                                   "quantized types by llama.cpp's own quantizer (make llamacpp). Nemotron-NAS: "
                                   "safetensors plus one block_configs entry per layer.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="gguf: one file for llama.cpp; nemotron-nas: a folder for vLLM's DeciLMForCausalLM")
    p.add_argument("--out", required=True, help="output file (gguf) or directory (nemotron-nas)")
    p.add_argument("--quant", default="f16", choices=QUANTS,
                   help="f32/f16 written directly; q8_0, q4_k_m, ... by llama.cpp's quantizer; nemotron-nas: "
                        "f32, f16 or bf16 (default f16)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from prunekit.export import export_checkpoint

    out = export_checkpoint(args.model, args.out, format=args.format, quant=args.quant, force=args.force,
                            progress=progress(args))
    return emit({"out": str(out), "format": args.format, "quant": args.quant})
