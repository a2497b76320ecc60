"""Typed options: one frozen dataclass per command, the single source of its flags, defaults, help text and
validation, and what a recipe stage holds (`prunekit.recipe`).

Why dataclasses and not pydantic or jsonargparse: the options must import without torch (the CLI builds its
parser from them for `--help`), a bad value must be one `OptionError` line naming the flag, and the CLI's flag
names, positional model and `--no-stream`-style switches are a contract that stays exactly as it is. Plain
dataclasses with a little metadata per field give all three with no new dependency; `cli.options` turns the
metadata into argparse arguments, and `from_dict` reads the same fields from a recipe.

A field's metadata (`opt`): `help`; `flag` (default `--` + the name with dashes); `kind`: "value" (default),
"positional", "store_true", "store_false" (the flag turns a default-True field off: `--no-cache` ->
`use_cache`), "optional_bool" (`--x/--no-x`, default None or True) or "choice_flags" (several flags each
storing one value, e.g. `--uniform/--per-layer`); `parse` (how the CLI reads the text), `choices`, `metavar`
and `check` (a function returning an error message, or None, for a value of the right type).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping

from prunekit.errors import OptionError

REQUIRED: Any = "<required>"  # the default of a field the user must give

MODEL_HELP = "built-in name (smollm2-135m, gemma3-270m), local HF checkpoint directory, or hub id"
TEXT_HELP = "built-in corpus (wiki, c4, tiny, code, technical, multilingual), or a local .txt/.jsonl file"


def opt(default: Any = REQUIRED, *, help: str, flag: str | None = None, kind: str = "value",
        parse: Callable[[str], Any] | None = None, choices: tuple[str, ...] | None = None, metavar: str | None = None,
        check: Callable[[Any], str | None] | None = None, flags: Mapping[str, Any] | None = None) -> Any:
    meta = {"help": help, "flag": flag, "kind": kind, "parse": parse, "choices": choices, "metavar": metavar,
            "check": check, "flags": dict(flags or {})}
    return field(default=default, metadata={"opt": meta})


# --- value checks and parsers (torch-free) -------------------------------------------------------------------
def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low:g}"


def fraction(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be at least 0 and below 1"


def present_device(name: str) -> str | None:
    """None for a device this machine has; a missing GPU or a mistyped name raises `DeviceError` with its own
    sentence, so every command refuses it before any model is loaded."""
    from prunekit.jobs.dist import check_device  # torch, only once options are validated

    check_device(name)
    return None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_ints(value: str) -> tuple[int, ...]:
    out = tuple(positive_int(v.strip()) for v in value.split(",") if v.strip())
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {value!r}")
    return out


def parse_keep(text: str) -> float | int:
    """A keep target: a value containing '.' or at most 1 is a ratio (float), otherwise a count (int)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio like 0.75 or a count like 96, got {text!r}") from None
    if "." in text or value <= 1:
        return value
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"a count must be a whole number, got {text!r}")
    return int(value)


def _keep(v: float | int) -> str | None:
    return None if v > 0 and math.isfinite(v) else "must be a ratio above 0 or a count of at least 1"


# --- the options classes ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """Base: validation on construction, JSON/YAML round trip, and the names of the run's inputs."""

    command: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(self, f)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "") -> "Options":
        """Options from a recipe's mapping: unknown keys and missing required ones are one error each."""
        if not isinstance(data, Mapping):
            raise OptionError(f"{where or cls.command} options must be a mapping, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise OptionError(f"{where or cls.command}: unknown option {unknown[0]!r} (known: {', '.join(known)})")
        values = {k: _from_plain(known[k], v) for k, v in data.items()}
        return cls(**values)

    def replace(self, **changes: Any) -> "Options":
        return dataclasses.replace(self, **changes)

    def input_specs(self) -> list[Any]:
        """What the run reads (model, texts, teacher): outputs must not overlap them."""
        return [getattr(self, n, None) for n in ("model", "calib", "text", "teacher", "prompt_text", "task_dir")]


def _flag(f: dataclasses.Field) -> str:
    meta = f.metadata["opt"]
    return meta["flag"] or ("--" + f.name.replace("_", "-"))


def flag_of(cls: type[Options], name: str) -> str:
    return _flag(next(f for f in fields(cls) if f.name == name))


def choices_of(cls: type[Options], name: str) -> tuple[str, ...]:
    return next(f for f in fields(cls) if f.name == name).metadata["opt"]["choices"]


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "tuple[int, ...]": tuple}


def _allowed(f: dataclasses.Field) -> tuple[type, ...]:
    return tuple(_TYPES[t.strip()] for t in str(f.type).split("|"))


def _check_field(obj: Options, f: dataclasses.Field) -> None:
    meta, value, name = f.metadata["opt"], getattr(obj, f.name), _flag(f)
    if value is REQUIRED:
        raise OptionError(f"{type(obj).command}: {name} is required")
    allowed = _allowed(f)
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok and isinstance(value, int) and not isinstance(value, bool) and float in allowed:
        ok = True
    if not ok:
        raise OptionError(f"{name} must be {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
    if value is None:
        return
    if isinstance(value, tuple) and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise OptionError(f"{name} must be positive integers, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise OptionError(f"{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    problem = meta["check"](value) if meta["check"] else None
    if problem:
        raise OptionError(f"{name} {problem}, got {value!r}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _from_plain(f: dataclasses.Field, value: Any) -> Any:
    if isinstance(value, list) and tuple in _allowed(f):
        return tuple(value)
    return value


@dataclass(frozen=True)
class Model(Options):
    model: str = opt(help=MODEL_HELP, kind="positional")
    dtype: str = opt("float32", help="weights dtype for loading and computing (default float32)",
                     choices=("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"))
    device: str = opt("cpu", check=present_device, help="torch device, e.g. cpu or cuda (default cpu)")


CALIB_HELP = (f"calibration text: {TEXT_HELP}; or several, mixed by weight, e.g. c4:2,technical:1 (default c4; "
              "first halves only)")


@dataclass(frozen=True)
class Calibration(Model):
    calib: str = opt("c4", help=CALIB_HELP)
    samples: int = opt(16, parse=positive_int, check=at_least(1), help="number of calibration sequences (default 16)")
    seq_len: int = opt(512, parse=positive_int, check=at_least(1), help="tokens per calibration sequence (default 512)")
    batch_size: int = opt(4, parse=positive_int, check=at_least(1), help="sequences per forward pass (default 4)")


@dataclass(frozen=True)
class Scale(Calibration):
    """Options for models larger than memory (layer streaming) and the score cache."""

    stream: bool | None = opt(None, kind="optional_bool",
                              help="load one decoder layer at a time from the safetensors files (--no-stream: whole "
                                   "model in memory; default: stream only when the model would not fit in free memory)")
    offload_dir: str | None = opt(None, help="directory for the calibration hidden states of a streamed run (default: "
                                             "score and drop keep them in the cache directory so an interrupted run "
                                             "resumes, or in RAM with --no-cache; width keeps them in RAM)")
    use_cache: bool = opt(True, flag="--no-cache", kind="store_false",
                          help="neither read nor write the score cache ($PRUNEKIT_CACHE/scores: similarity sums, and "
                               "width statistics per shot), no resuming")


@dataclass(frozen=True)
class ScoreOptions(Scale):
    command: ClassVar[str] = "score"


@dataclass(frozen=True)
class DropOptions(Scale):
    command: ClassVar[str] = "drop"
    target: str = opt(choices=("attn", "mlp", "block", "joint", "expert"),
                      help="attn: Attention Drop; mlp: MLP Drop (on a Mixture-of-Experts model, the MoE block); "
                           "block: Block Drop; joint: attention and MLP modules ranked together; expert: n experts "
                           "from every MoE layer (Mixture-of-Experts models)")
    n: int = opt(parse=int, check=at_least(1), help="number of modules (layers, for block; experts per MoE layer, "
                                                     "for expert) to drop")
    consecutive: bool = opt(False, kind="store_true",
                            help="Block Drop of the best consecutive run of n blocks (by cos(h_i, h_{i+n}))")
    iterative: bool = opt(False, kind="store_true",
                          help="drop one module at a time and re-score the layers after it (default: one-shot)")
    criterion: str = opt("cosine", choices=("cosine", "loss", "kl"),
                         help="cosine: LLM-Drop, the most redundant modules by cosine similarity (default); loss: "
                              "module by module, the one whose removal raises the calibration loss least, among the "
                              "--prefilter most redundant by cosine (in memory or streamed); kl: the same, by the KL "
                              "divergence from the dense model's next-token distributions")
    prefilter: int = opt(8, parse=positive_int, check=at_least(1),
                         help="--criterion loss/kl: candidates tried per step, the most redundant by cosine (default 8)")
    repair: str = opt("none", choices=("none", "linear"),
                      help="linear: fold a training-free linear map into the projection before each removed span, "
                           "estimated on the calibration text and kept only where it lowers the loss on held-out "
                           "calibration samples (Llama/Mistral/Qwen; in memory or streamed) (default none)")
    expert_score: str = opt("router", choices=("router", "reap"),
                            help="--target expert: router = how often the router picks an expert times its mean "
                                 "weight then; reap = REAP, the mean over its tokens of router weight x the norm of "
                                 "its output (default router)")


@dataclass(frozen=True)
class WidthOptions(Scale):
    command: ClassVar[str] = "width"
    mlp_keep: float | int | None = opt(None, parse=parse_keep, metavar="R|N", check=_keep,
                                       help="MLP intermediate channels to keep per layer: ratio (e.g. 0.75) or count "
                                            "(e.g. 1152); default: MLPs unchanged")
    heads_keep: float | int | None = opt(None, parse=parse_keep, metavar="R|N", check=_keep,
                                         help="attention to keep per layer: with --head-mode kv-groups the number (or "
                                              "ratio) of KV groups, each with all its query heads; with --head-mode "
                                              "query-heads the number (or ratio) of query heads, a multiple of the KV "
                                              "heads (1 is a ratio: keep all; 0.34 keeps 1 of 3 groups); default: "
                                              "attention unchanged")
    mode: str = opt("uniform", kind="choice_flags", choices=("uniform", "per-layer"), help="",
                    flags={"--uniform": ("uniform", "every layer keeps the same width (default)"),
                           "--per-layer": ("per-layer", "rank units globally across layers (scores normalised per "
                                                        "layer) with a per-layer floor; the total kept equals what "
                                                        "--uniform would keep")})
    # shots, multiple_of and the keep ratios: checked by `width.check_width_options` with the model's widths.
    shots: int = opt(8, parse=int,
                     help="reach the target in this many pruning steps (geometric schedule), re-scoring in between "
                          "(default 8)")
    scorer: str = opt("activation", choices=("activation", "weight-activation"),
                      help="importance: activation = L2 norm of the activation (TransAct); weight-activation = |W| * "
                           "||x|| summed over the output projection's columns (Wanda-sp/FLAP) (default activation)")
    head_mode: str = opt("kv-groups", choices=("kv-groups", "query-heads"),
                         help="kv-groups: remove whole KV groups with their query heads; query-heads: remove query "
                              "heads evenly inside every group, keeping all KV heads (default kv-groups)")
    min_layer_keep: float = opt(0.1, parse=float, check=fraction,
                                help="--per-layer floor: every layer keeps at least this fraction of its units, and at "
                                     "least one (default 0.1)")
    multiple_of: int = opt(64, parse=int, metavar="M",
                           help="make every final MLP width a multiple of M: llama.cpp quantizes in blocks of 32 "
                                "(q8_0) or 256 (k-quants) and matrix kernels tile by 64 or more, so other widths run "
                                "slower or quantize worse; per-layer keeps the total within M/2 of the target (default "
                                "64; 1 for exact targets, 256 for k-quant GGUF exports)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mlp_keep is None and self.heads_keep is None:
            raise OptionError("nothing to prune: give --mlp-keep, --heads-keep, or both")


COMPRESS_SAMPLES = 64  # prunekit.compress.DEFAULT_SAMPLES; a test holds them equal (this module has no torch)


@dataclass(frozen=True)
class CompressOptions(Calibration):
    command: ClassVar[str] = "compress"
    samples: int = opt(COMPRESS_SAMPLES, parse=positive_int, check=at_least(1),
                       help=f"number of calibration sequences (default {COMPRESS_SAMPLES})")
    budget: str = opt(metavar="KEY=FRACTION",
                      help="what may remain of the dense model: params=0.8 (80%% of the parameters) or kv=0.5 (half "
                           "the KV-cache bytes per token)")
    rounds: int = opt(2, parse=positive_int, check=at_least(1),
                      help="spend the budget in this many rounds, re-taking the statistics in between (default 2)")
    multiple_of: int = opt(64, parse=positive_int, metavar="M", check=at_least(1),
                           help="MLP widths stay multiples of M, which inference kernels run fast (default 64)")
    criterion: str = opt("loss", choices=("loss", "kl"),
                         help="choose among the candidates by the loss on held-out calibration samples (default), or "
                              "by the KL divergence there from the dense model's next-token distributions")
    repair: str | None = opt(None, choices=("none", "linear"),
                             help="fold a training-free linear map for each removed span of sub-layers of the chosen "
                                  "model into the sub-layer before it, kept only where it lowers the held-out "
                                  "calibration loss (default: linear where the architecture takes it, e.g. not Gemma 3)")
    correct: bool = opt(True, kind="optional_bool",
                        help="refit the chosen model's kept output projections, layer by layer, against the dense "
                             "model's residual stream, kept only where it lowers the held-out calibration loss "
                             "(default; --no-correct skips it: about 4 forward passes of the calibration data)")
    probe_samples: int = opt(0, parse=int, metavar="N", check=at_least(0),
                             help="calibration sequences over which every sub-layer is cut alone and its loss increase "
                                  "measured, for candidates allocated on measured rather than estimated costs; 8 is a "
                                  "good value (default 0: none, they rarely won and cost 25-50%% more time)")
    stream: bool | None = opt(None, kind="optional_bool",
                              help="load one decoder layer at a time from the safetensors files, forward and backward "
                                   "(--no-stream: whole model in memory; default: stream only when it would not fit)")
    offload_dir: str | None = opt(None, help="directory for the input Grams that do not fit in memory and a streamed "
                                             "run's hidden states (default: the system's temporary directory); "
                                             "removed when done")
    use_cache: bool = opt(True, flag="--no-cache", kind="store_false",
                          help="neither read nor write the statistics cache ($PRUNEKIT_CACHE/scores: each statistics "
                               "pass's Grams and Fishers, so a repeated or interrupted run skips the passes done)")


HEAL_TEXT_HELP = ("training text: SOURCE[:WEIGHT],... mixed by weight (e.g. c4:0.7,wiki:0.3; the --samples windows are "
                  "shared by weight), mix for every built-in text weighted by size, and teacher:N for N tokens sampled "
                  "from --teacher; only the first half of each text is used (default mix)")


@dataclass(frozen=True)
class HealOptions(Model):
    command: ClassVar[str] = "heal"
    model: str = opt(help="pruned checkpoint directory (any local HF checkpoint, built-in name or hub id also works)",
                     kind="positional")
    text: str = opt("mix", help=HEAL_TEXT_HELP)
    samples: int | None = opt(None, parse=positive_int, check=at_least(1),
                              help="number of training sequences (default steps x batch size: each read once)")
    seq_len: int = opt(512, parse=positive_int, check=at_least(1), help="tokens per training sequence (default 512)")
    batch_size: int = opt(4, parse=positive_int, check=at_least(1), help="sequences per forward pass (default 4)")
    teacher: str | None = opt(None, help="teacher model (normally the dense model MODEL was pruned from): distil from "
                                         "it; it must have the same tokenizer and vocabulary")
    alpha: float | None = opt(None, parse=float,
                              help="weight of the causal-LM loss mixed with the distillation loss (default 0.5 with "
                                   "--teacher; 0 for pure distillation)")
    temperature: float = opt(1.0, parse=float, help="distillation temperature T; the KL is scaled by T^2 (default 1)")
    teacher_topk: int | None = opt(None, parse=positive_int,
                                   help="use only the teacher's top-K logits per position, renormalised (saves memory)")
    teacher_cache: bool = opt(False, kind="store_true",
                              help="run the teacher alone first and keep its top-K logits on disk (K from "
                                   "--teacher-topk, default 64), so teacher and student never share memory (for "
                                   "teachers that do not fit beside the student)")
    hidden_weight: float = opt(0.0, parse=float,
                               help="also match the residual stream after every layer to the teacher's (relative "
                                    "squared error) with this weight; needs as many layers as the teacher (default 0: "
                                    "logits only)")
    gen_temperature: float = opt(1.0, parse=float,
                                 help="sampling temperature of teacher:N text, 0 for greedy (default 1)")
    prompt_text: str = opt("c4", help="text whose first half gives the 16-token prompts of teacher:N (default c4)")
    use_cache: bool = opt(True, flag="--no-cache", kind="store_false",
                          help="neither read nor write the teacher-text cache")
    lora: int | None = opt(None, parse=int,
                           help="train rank-R LoRA matrices on the attention/MLP projections instead of every "
                                "parameter, merged into the weights before saving")
    steps: int = opt(100, parse=int, help="optimizer steps (default 100)")
    lr: float | None = opt(None, parse=float, help="peak learning rate (default 2e-4)")
    warmup: float = opt(0.1, parse=float, help="fraction of the steps spent warming up (default 0.1)")
    weight_decay: float = opt(0.0, parse=float, help="AdamW weight decay (default 0)")
    seed: int = opt(0, parse=int, help="seed of the batch order (default 0)")
    save_every: int = opt(0, parse=int,
                          help="every N steps, keep resumable training state in OUT.heal-state/; running the same "
                               "command again continues from it (default 0: never)")


@dataclass(frozen=True)
class ExportOptions(Options):
    command: ClassVar[str] = "export"
    model: str = opt(help=MODEL_HELP, kind="positional")
    format: str = opt(choices=("gguf", "nemotron-nas"),
                      help="gguf: one file for llama.cpp; nemotron-nas: a folder for vLLM's DeciLMForCausalLM")
    quant: str = opt("f16", choices=("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0"),
                     help="f32/f16 written directly; q8_0, q4_k_m, ... by llama.cpp's quantizer; nemotron-nas: f32, "
                          "f16 or bf16 (default f16)")

    def input_specs(self) -> list[Any]:
        return [self.model]


@dataclass(frozen=True)
class EvalOptions(Model):
    command: ClassVar[str] = "eval"
    text: str = opt("wiki", help=f"evaluation text: {TEXT_HELP} (default wiki; second half used)")
    windows: int = opt(10, parse=positive_int, check=at_least(1), help="number of windows (default 10)")
    window_len: int = opt(1024, parse=positive_int, check=at_least(1), help="tokens per window (default 1024)")
    batch_size: int = opt(1, parse=positive_int, check=at_least(1), help="windows per forward pass (default 1)")
    tasks: str | None = opt(None, help="comma-separated zero-shot tasks run through lm-eval on the in-memory model "
                                       "(built-in: mmlu; or names of YAMLs in --task-dir)")
    task_dir: str | None = opt(None, help="folder of your own lm-eval task YAMLs (see prunekit.evaluation.zeroshot "
                                          "for local JSONL tasks)")
    limit: int | None = opt(None, parse=positive_int, check=at_least(1),
                            help="at most this many examples per task (quick runs)")
    seed: int = opt(1234, parse=int, help="seed for lm-eval and the benchmark inputs (default 1234)")
    card: bool = opt(False, kind="store_true",
                     help="also write the results into the 'Measured quality' section of the model's card (its "
                          "README.md; the model must be a prunekit checkpoint folder)")

    def task_list(self) -> list[str]:
        return [t.strip() for t in (self.tasks or "").split(",") if t.strip()]


@dataclass(frozen=True)
class BenchOptions(Model):
    command: ClassVar[str] = "bench"
    context: tuple[int, ...] = opt((128, 512, 1024), parse=positive_ints,
                                   help="comma-separated context lengths to measure (default 128,512,1024)")
    new_tokens: int = opt(32, parse=positive_int, check=at_least(1),
                          help="tokens decoded per measurement (default 32)")
    batch: int = opt(1, parse=positive_int, check=at_least(1), help="sequences per batch (default 1)")
    repeats: int = opt(3, parse=positive_int, check=at_least(1),
                       help="timed repeats after one warm-up; median reported (default 3)")


# Commands whose result is a checkpoint folder (a later recipe stage can start from it), and their options.
CHECKPOINT_COMMANDS: dict[str, type[Options]] = {
    "drop": DropOptions, "width": WidthOptions, "compress": CompressOptions, "heal": HealOptions,
}
COMMANDS: dict[str, type[Options]] = {**CHECKPOINT_COMMANDS, "score": ScoreOptions, "export": ExportOptions,
                                      "eval": EvalOptions, "bench": BenchOptions}
