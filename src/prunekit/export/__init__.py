"""Export a prunekit checkpoint for inference engines: GGUF (llama.cpp) and Nemotron-NAS (vLLM's
`DeciLMForCausalLM`).

`export_checkpoint` is the one entry point (the CLI's `prunekit export` calls it).
"""

from __future__ import annotations

from pathlib import Path

from prunekit.export.common import ExportError, ExportSource, LayerShape, load_source
from prunekit.export.gguf import DIRECT_TYPES, QUANT_TYPES, quantizer, write_gguf
from prunekit.export.nemotron_nas import write_nemotron_nas
from prunekit.io.model_card import write_export_card
from prunekit.io.outputs import Target, atomic_dir, atomic_file, input_paths, prepare_output, sibling_scratch

FORMATS = ("gguf", "nemotron-nas")
QUANTS = DIRECT_TYPES + QUANT_TYPES

__all__ = ["FORMATS", "QUANTS", "ExportError", "ExportSource", "LayerShape", "export_checkpoint", "export_source"]


def export_checkpoint(src: str | Path, out: str | Path, *, format: str, quant: str = "f16", force: bool = False,
                      progress: bool = True) -> Path:
    """Export checkpoint `src` (built-in name, directory or hub id) to `out`, all or nothing.

    format "gguf": one file; quant f32/f16 is written directly, q8_0/q4_k_m/... by llama.cpp's own quantizer
    (needs llama-cpp-python: `make llamacpp`). format "nemotron-nas": a directory (safetensors + config +
    tokenizer); `quant` must stay f16 or f32 (the weights' dtype)."""
    _check_options(format, quant)
    # Fail on an existing, unwritable or input-overlapping output before spending time loading the model.
    target = prepare_output(out, force, kind="file" if format == "gguf" else "dir", inputs=input_paths(src))
    if format == "gguf" and quant not in DIRECT_TYPES:
        quantizer()  # the binding is checked before loading, too
    return export_source(load_source(src), target, format=format, quant=quant, force=force, progress=progress)


def export_source(source: ExportSource, out: str | Path | Target, *, format: str, quant: str = "f16",
                  force: bool = False, progress: bool = True) -> Path:
    """`export_checkpoint` for a model already in memory (tests, jobs that just pruned it)."""
    _check_options(format, quant)
    out = prepare_output(out, force, kind="file" if format == "gguf" else "dir")
    if format == "gguf":
        if quant in DIRECT_TYPES:
            with atomic_file(out) as tmp:
                write_gguf(source, tmp, ftype=quant, progress=progress)
            return out.path
        run = quantizer()
        with atomic_file(out) as tmp, sibling_scratch(out.path) as d:
            f16 = d / "model-f16.gguf"
            write_gguf(source, f16, ftype="f16", progress=progress)
            run(f16, tmp, quant)
        return out.path
    with atomic_dir(out) as tmp:
        write_nemotron_nas(source, tmp, dtype=quant)
        if getattr(source.model, "name_or_path", None):  # the checkpoint it came from: what its card describes
            write_export_card(tmp, source.model.name_or_path, format,
                              {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[quant])
    return out.path


def _check_options(format: str, quant: str) -> None:
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "gguf" and quant not in QUANTS:
        raise ExportError(f"unknown GGUF type {quant!r}; choose one of {', '.join(QUANTS)}")
    if format == "nemotron-nas" and quant not in DIRECT_TYPES + ("bf16",):
        raise ExportError(f"nemotron-nas writes unquantized safetensors (f32, f16, bf16); got {quant!r}")
