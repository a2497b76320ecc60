"""Export a prunekit checkpoint for inference engines: GGUF (llama.cpp) and Nemotron-NAS (vLLM's
`DeciLMForCausalLM`).

`export_checkpoint` is the one entry point (the CLI's `prunekit export` calls it); `add_export_arguments`
adds its options to an argparse parser, so the CLI wiring is:

    p = sub.add_parser("export"); add_export_arguments(p)
    ... export_checkpoint(a.model, a.out, format=a.format, quant=a.quant, force=a.force)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from prunekit.export.common import ExportError, ExportSource, LayerShape, atomic_dir, atomic_file, load_source
from prunekit.export.gguf import DIRECT_TYPES, LLAMACPP_HINT, QUANT_TYPES

FORMATS = ("gguf", "nemotron-nas")
QUANTS = DIRECT_TYPES + QUANT_TYPES

__all__ = ["FORMATS", "QUANTS", "ExportError", "ExportSource", "LayerShape", "add_export_arguments",
           "export_checkpoint", "export_source"]


def export_checkpoint(src: str | Path, out: str | Path, *, format: str, quant: str = "f16", force: bool = False,
                      progress: bool = True) -> Path:
    """Export checkpoint `src` (built-in name, directory or hub id) to `out`, all or nothing.

    format "gguf": one file; quant f32/f16 is written directly, q8_0/q4_k_m/... by llama.cpp's own quantizer
    (needs llama-cpp-python: `make llamacpp`). format "nemotron-nas": a directory (safetensors + config +
    tokenizer); `quant` must stay f16 or f32 (the weights' dtype)."""
    _check_options(format, quant)
    # Fail on an existing output before spending time loading the model.
    if Path(out).exists() and not force:
        raise ExportError(f"{out} exists; pass --force (force=True) to replace it")
    if format == "gguf" and quant not in DIRECT_TYPES:
        from prunekit.export.gguf import quantizer

        quantizer()  # the binding is checked before loading, too
    return export_source(load_source(src), out, format=format, quant=quant, force=force, progress=progress)


def export_source(source: ExportSource, out: str | Path, *, format: str, quant: str = "f16", force: bool = False,
                  progress: bool = True) -> Path:
    """`export_checkpoint` for a model already in memory (tests, jobs that just pruned it)."""
    _check_options(format, quant)
    out = Path(out)
    if format == "gguf":
        from prunekit.export.gguf import quantizer, write_gguf

        if quant in DIRECT_TYPES:
            with atomic_file(out, force) as tmp:
                write_gguf(source, tmp, ftype=quant, progress=progress)
            return out
        run = quantizer()
        with atomic_file(out, force) as tmp, tempfile.TemporaryDirectory(prefix="prunekit-gguf-", dir=out.parent) as d:
            f16 = Path(d) / "model-f16.gguf"
            write_gguf(source, f16, ftype="f16", progress=progress)
            run(f16, tmp, quant)
        return out
    from prunekit.export.nemotron_nas import write_nemotron_nas

    with atomic_dir(out, force) as tmp:
        write_nemotron_nas(source, tmp, dtype=quant)
    return out


def _check_options(format: str, quant: str) -> None:
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "gguf" and quant not in QUANTS:
        raise ExportError(f"unknown GGUF type {quant!r}; choose one of {', '.join(QUANTS)}")
    if format == "nemotron-nas" and quant not in DIRECT_TYPES + ("bf16",):
        raise ExportError(f"nemotron-nas writes unquantized safetensors (f32, f16, bf16); got {quant!r}")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `prunekit export MODEL --format F --out PATH [--quant Q] [--force]`."""
    parser.add_argument("model", help="built-in name, checkpoint directory or hub id")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="gguf: one file for llama.cpp (uniform results as llama/qwen2/qwen3, heterogeneous "
                             "ones as `deci`); nemotron-nas: safetensors + block_configs for vLLM")
    parser.add_argument("--out", required=True, help="output file (gguf) or directory (nemotron-nas)")
    parser.add_argument("--quant", default="f16", choices=QUANTS + ("bf16",),
                        help=f"f32/f16 written directly; {', '.join(QUANT_TYPES)} by llama.cpp's quantizer "
                             f"({LLAMACPP_HINT}); nemotron-nas: f32, f16 or bf16")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
