"""`prunekit export`: a pruned checkpoint for inference engines (GGUF for llama.cpp, Nemotron-NAS for vLLM)."""

from __future__ import annotations

import argparse
from typing import Any

from prunekit.cli.options import add_options, add_output, run_one
from prunekit.options import ExportOptions, choices_of

# A test holds these equal to `prunekit.export`'s (the options import no torch).
FORMATS = choices_of(ExportOptions, "format")
QUANTS = choices_of(ExportOptions, "quant")


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write a pruned checkpoint for inference engines: GGUF (llama.cpp) or "
                                      "Nemotron-NAS block_configs (vLLM and friends)",
                       description="GGUF: uniform results as their stock llama.cpp architecture, heterogeneous ones "
                                   "(dropped sub-layers, per-layer widths) as `deci`; f32/f16 written directly, "
                                   "quantized types by llama.cpp's own quantizer (make llamacpp). Nemotron-NAS: "
                                   "safetensors plus one block_configs entry per layer.")
    add_options(p, ExportOptions)
    add_output(p, help="output file (gguf) or directory (nemotron-nas)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    return run_one(ExportOptions, args, args.out)
