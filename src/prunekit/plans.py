"""Pruning plans: plain data with a JSON round-trip.

A plan says *what* goes (layer indices refer to the ORIGINAL model), never how; `prunekit.surgery` applies
it, and the algorithms (`prunekit.drop`, `prunekit.width`) choose it.
Every saved checkpoint carries its plan (`prunekit_plan.json`) with the scores, options and the hash of the
calibration tokens that produced it. A plan read back is checked field by field (`PruningPlan.from_json`), and
against the model it meets (`check_layers`, `checkpoint_plan`), so a damaged or hand-edited one is one `PlanError`.
A plan holds the structure only: what else the saved weights carry (refits, repair maps, healing) is named by
`weight_edits`, and the recipe saved beside it (`prunekit_recipe.yaml`) rebuilds the whole model.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from prunekit import __version__
from prunekit.errors import PlanError

Module = Literal["attn", "mlp", "block"]
PLAN_FILE = "prunekit_plan.json"
# The recipe saved beside the plan (`prunekit.jobs.recipe`), read back by the model card.
RECIPE_FILE = "prunekit_recipe.yaml"
PLAN_FORMAT = 1
MODULES: tuple[str, ...] = ("attn", "mlp", "block")
WIDTH_FIELDS: tuple[str, ...] = ("heads", "kv_heads", "channels", "experts", "shared_channels", "expert_channels")


@dataclass(frozen=True, order=True)
class DropTarget:
    layer: int
    module: Module

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "module": self.module}


@dataclass
class LayerWidth:
    """Kept indices (into the ORIGINAL layer) of one layer's query heads, KV heads and MLP channels.
    None means "unchanged". In a Mixture-of-Experts layer `channels` are the intermediate channels every
    expert keeps (the same ones), `expert_channels` instead one list per expert of the original layer (each
    its own channels; all of one length, since the fused expert tensors need one width), `experts` the kept
    experts (router rows with them) and `shared_channels` the shared expert's channels (Qwen2-MoE)."""

    heads: list[int] | None = None
    kv_heads: list[int] | None = None
    channels: list[int] | None = None
    experts: list[int] | None = None
    shared_channels: list[int] | None = None
    expert_channels: list[list[int]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class PruningPlan:
    dropped: list[DropTarget] = field(default_factory=list)
    widths: dict[int, LayerWidth] = field(default_factory=dict)
    method: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    # Recovery fine-tuning runs applied after the pruning (`prunekit.recovery`), oldest first.
    recovery: list[dict[str, Any]] = field(default_factory=list)
    # Training-free linear repair after dropping (`prunekit.repair`): the maps' fit and whether each was kept.
    repair: dict[str, Any] | None = None
    version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "prunekit_version": self.version,
            "method": self.method,
            "options": self.options,
            "model": self.model,
            "calibration": self.calibration,
            "dropped": [d.to_json() for d in sorted(self.dropped)],
            "widths": {str(k): v.to_json() for k, v in sorted(self.widths.items())},
            "history": self.history,
            "scores": self.scores,
            # Only when there is one, so plans of un-healed models read exactly as before.
            **({"recovery": self.recovery} if self.recovery else {}),
            **({"repair": self.repair} if self.repair else {}),
            # What the saved weights hold beyond this structure (see `weight_edits`); absent when nothing.
            **({"weight_edits": self.weight_edits()} if self.weight_edits() else {}),
        }

    def weight_edits(self) -> list[str]:
        """What the model saved with this plan holds beyond its structure, which the plan alone cannot rebuild:
        compress's least-squares refit of the kept projections (and its error correction), kept linear-repair
        maps, healing. Empty: the plan applied to a fresh copy of the base model gives the saved model."""
        edits = []
        if self.method == "compress":
            edits.append("compress's refitted projections")
        if self.repair and any(s.get("applied") for s in self.repair.get("spans", [])):
            edits.append("linear repair")
        if self.recovery:
            edits.append("healing")
        return edits

    @classmethod
    def from_json(cls, data: Any) -> "PruningPlan":
        """The plan in `data` (a parsed `prunekit_plan.json`), every field checked: anything else raises one
        `PlanError` naming the field and its bad value. Absent optional fields take their defaults."""
        d = _object(data, "the plan")
        _check_format(d)
        return cls(
            dropped=parse_drops(d.get("dropped", [])),
            widths=parse_widths(d.get("widths", {})),
            method=_string(d.get("method", "none"), "method"),
            options=dict(_object(d.get("options", {}), "options")),
            scores=parse_scores(d.get("scores")),
            history=_records(d.get("history", []), "history"),
            calibration=dict(_object(d.get("calibration", {}), "calibration")),
            model=dict(_object(d.get("model", {}), "model")),
            recovery=_records(d.get("recovery", []), "recovery"),
            repair=None if d.get("repair") is None else dict(_object(d["repair"], "repair")),
            version=_string(d.get("prunekit_version", __version__), "prunekit_version"),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
            raise PlanError(f"cannot read plan {path}: {e}") from e
        try:
            return cls.from_json(data)
        except PlanError as e:
            raise PlanError(f"invalid plan {path}: {e}") from e

    def drops_by_module(self) -> tuple[set[int], set[int]]:
        """(layers without attention, layers without MLP) after expanding blocks."""
        attn = {d.layer for d in self.dropped if d.module in ("attn", "block")}
        mlp = {d.layer for d in self.dropped if d.module in ("mlp", "block")}
        return attn, mlp


def normalize_drops(drops: Sequence[DropTarget]) -> list[DropTarget]:
    """Canonical form: a layer that loses both attention and MLP loses its block."""
    attn = {d.layer for d in drops if d.module in ("attn", "block")}
    mlp = {d.layer for d in drops if d.module in ("mlp", "block")}
    out = [DropTarget(i, "block") for i in sorted(attn & mlp)]
    out += [DropTarget(i, "attn") for i in sorted(attn - mlp)]
    out += [DropTarget(i, "mlp") for i in sorted(mlp - attn)]
    return sorted(out)


# --- validation of plans read back from JSON -------------------------------------------------------------------
# Small pure checks, each naming the field it looked at, so that a hand-edited or damaged plan fails on load with
# one sentence instead of a traceback, or worse, a negative index that Python would count from the end.

# A layer index in a widths key; at most 18 digits so that int() never meets Python's digit limit.
_LAYER_KEY = re.compile(r"0|[1-9][0-9]{0,17}")


def _show(value: Any) -> str:
    """A bad value as the JSON spells it, cut short (a plan may hold megabytes of scores)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(name: str, value: Any, wanted: str) -> PlanError:
    return PlanError(f"{name} is {_show(value)}, but must be {wanted}")


def _is_int(value: Any) -> bool:
    # JSON true/false arrive as bool, which Python counts as int.
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(name, value, "a JSON object")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(name, value, "a JSON list")
    return value


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _bad(name, value, "a string")
    return value


def _index(value: Any, name: str) -> int:
    if not _is_int(value) or value < 0:
        raise _bad(name, value, "a non-negative integer")
    return int(value)


def _number(value: Any, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(name, value, "a number")
    return float(value)


def _field(data: dict[str, Any], key: str, name: str) -> Any:
    if key not in data:
        raise PlanError(f"{name}.{key} is missing")
    return data[key]


def _only_keys(data: dict[str, Any], allowed: Sequence[str], name: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise PlanError(f"{name} has the unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")


def _records(value: Any, name: str) -> list[dict[str, Any]]:
    """A list of JSON objects (history steps, recovery runs), copied."""
    return [dict(_object(r, f"{name}[{i}]")) for i, r in enumerate(_list(value, name))]


def _check_format(data: dict[str, Any]) -> None:
    fmt = data.get("format")
    if not _is_int(fmt) or fmt != PLAN_FORMAT:
        shown = "missing" if "format" not in data else _show(fmt)
        raise PlanError(f"format is {shown}, but this prunekit reads plan format {PLAN_FORMAT}")


def parse_drop(value: Any, name: str) -> DropTarget:
    """One `dropped` entry: {"layer": non-negative int, "module": attn | mlp | block}."""
    d = _object(value, name)
    _only_keys(d, ("layer", "module"), name)
    layer = _index(_field(d, "layer", name), f"{name}.layer")
    module = _field(d, "module", name)
    if not isinstance(module, str) or module not in MODULES:
        raise _bad(f"{name}.module", module, f"one of {', '.join(MODULES)}")
    return DropTarget(layer, module)  # type: ignore[arg-type]


def parse_drops(value: Any, name: str = "dropped") -> list[DropTarget]:
    return [parse_drop(v, f"{name}[{i}]") for i, v in enumerate(_list(value, name))]


def parse_kept(value: Any, name: str) -> list[int] | None:
    """Kept indices of one width field: null (unchanged), or distinct non-negative ints in any order (surgery
    sorts them); never empty, since a sub-layer that keeps nothing is a drop."""
    if value is None:
        return None
    items = _list(value, name)
    if not items:
        raise _bad(name, value, "null or a non-empty list (a sub-layer that keeps nothing is dropped instead)")
    kept = [_index(v, f"{name}[{i}]") for i, v in enumerate(items)]
    if len(set(kept)) != len(kept):
        twice = next(k for i, k in enumerate(kept) if k in kept[:i])
        raise PlanError(f"{name} lists index {twice} twice")
    return kept


def parse_expert_channels(value: Any, name: str) -> list[list[int]] | None:
    """null, or one non-empty list of kept channels per expert, all of the same length."""
    if value is None:
        return None
    lists = [parse_kept(v, f"{name}[{e}]") for e, v in enumerate(_list(value, name))]
    if not lists or any(k is None for k in lists):
        raise _bad(name, value, "null or a list of kept-channel lists, one per expert")
    if len({len(k) for k in lists}) != 1:  # type: ignore[arg-type]
        raise PlanError(f"{name} keeps different numbers of channels in different experts (the fused expert "
                        "tensors need one width)")
    return lists  # type: ignore[return-value]


def parse_layer_width(value: Any, name: str) -> LayerWidth:
    w = _object(value, name)
    _only_keys(w, WIDTH_FIELDS, name)
    out = LayerWidth(**{k: parse_kept(w[k], f"{name}.{k}") for k in WIDTH_FIELDS if k in w and k != "expert_channels"})
    out.expert_channels = parse_expert_channels(w.get("expert_channels"), f"{name}.expert_channels")
    if out.channels is not None and out.expert_channels is not None:
        raise PlanError(f"{name} has both channels and expert_channels; give one")
    return out


def parse_widths(value: Any, name: str = "widths") -> dict[int, LayerWidth]:
    """{"<layer>": LayerWidth}: keys are layer indices written in decimal, as `to_json` writes them."""
    out: dict[int, LayerWidth] = {}
    for key, w in _object(value, name).items():
        if not isinstance(key, str) or not _LAYER_KEY.fullmatch(key):
            raise _bad(f"a key of {name}", key, "a layer index in decimal digits")
        out[int(key)] = parse_layer_width(w, f"{name}.{key}")
    return out


def similarity_fields(data: Any, name: str = "scores") -> dict[str, Any]:
    """The checked fields of LLM-Drop similarity scores as `SimilarityScores.to_json` writes them: block, attn
    and mlp lists in layer order, tokens, pairwise (or None) and calibration. `SimilarityScores.from_json` builds
    on this; plans check their scores with it without importing torch."""
    d = _object(data, name)
    rows = _list(_field(d, "layers", name), f"{name}.layers")
    if not rows:
        raise _bad(f"{name}.layers", rows, "a non-empty list")
    by_index: dict[int, list[float]] = {}
    for k, row in enumerate(rows):
        where = f"{name}.layers[{k}]"
        r = _object(row, where)
        i = _index(_field(r, "index", where), f"{where}.index")
        if i >= len(rows) or i in by_index:
            raise _bad(f"{where}.index", i, f"a layer index below {len(rows)} that no other entry has")
        by_index[i] = [_number(_field(r, m, where), f"{where}.{m}") for m in ("block", "attn", "mlp")]
    ordered = [by_index[i] for i in range(len(rows))]
    return {
        "block": [v[0] for v in ordered],
        "attn": [v[1] for v in ordered],
        "mlp": [v[2] for v in ordered],
        "tokens": _index(_field(d, "tokens", name), f"{name}.tokens"),
        "pairwise": _pairwise(d.get("pairwise"), len(rows) + 1, f"{name}.pairwise"),
        "calibration": dict(_object(d.get("calibration", {}), f"{name}.calibration")),
    }


def _pairwise(value: Any, size: int, name: str) -> list[list[float]] | None:
    """None, or a size x size matrix of numbers (the inputs of every layer plus the last layer's output)."""
    if value is None:
        return None
    rows = _list(value, name)
    if len(rows) != size:
        raise PlanError(f"{name} has {len(rows)} rows, but must have {size} (one more than the layers)")
    out = []
    for i, row in enumerate(rows):
        if len(_list(row, f"{name}[{i}]")) != size:
            raise PlanError(f"{name}[{i}] has {len(row)} numbers, but must have {size}")
        out.append([_number(v, f"{name}[{i}][{j}]") for j, v in enumerate(row)])
    return out


def parse_scores(value: Any, name: str = "scores") -> dict[str, Any] | None:
    """None or an object. LLM-Drop's similarity scores (the ones with `layers`, which `compare` plots) are
    checked in full; other methods keep their own importances there (TransAct's `scorer` and `first_shot`)."""
    if value is None:
        return None
    data = _object(value, name)
    if "layers" in data:
        similarity_fields(data, name)
    return data


# --- a plan against the model it meets ---------------------------------------------------------------------------

def check_layers(plan: PruningPlan, num_layers: int, model: str = "the model") -> None:
    """`PlanError` unless every layer the plan drops or narrows exists in `model`, a model of `num_layers` layers
    (the plan's indices are those of the model it was made from)."""
    named = [(f"drops the {d.module} of layer", d.layer) for d in plan.dropped]
    named += [("narrows layer", i) for i in plan.widths]
    for what, i in named:
        if not 0 <= i < num_layers:
            raise PlanError(f"the plan {what} {i}, but {model} has {num_layers} layers (0..{num_layers - 1})")


def _config_layers(folder: Path) -> int | None:
    """The decoder layer count in a checkpoint's config.json (a multimodal one's text_config), or None where it
    cannot be read: checking the checkpoint itself is `io.checkpoint`'s job, not the plan's."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(cfg, dict):
        return None
    n = cfg.get("num_hidden_layers")
    text = cfg.get("text_config")
    if not _is_int(n) and isinstance(text, dict):
        n = text.get("num_hidden_layers")
    return int(n) if _is_int(n) and n >= 0 else None


def checkpoint_plan(folder: str | Path) -> PruningPlan | None:
    """The plan a checkpoint directory carries (None without one), checked on load and against the checkpoint:
    the model it was made from had the checkpoint's layers plus those the plan removed whole, and every layer
    the plan names must be one of those. Reads two small JSON files and no weights, so callers can check the
    plans of every model before loading any."""
    folder = Path(folder)
    file = folder / PLAN_FILE
    if not file.is_file():
        return None
    plan = PruningPlan.load(file)
    layers = _config_layers(folder)
    if layers is not None:
        attn, mlp = plan.drops_by_module()
        removed = len(attn & mlp)
        try:
            check_layers(plan, layers + removed, f"the model it was made from ({layers} layers in {folder.name}, "
                                                 f"plus {removed} the plan removed)")
        except PlanError as e:
            raise PlanError(f"invalid plan {file}: {e}") from e
    return plan


def check_kept(name: str, layer: int, idx: Sequence[int], size: int) -> list[int]:
    """Kept indices of one kind of unit in one layer, sorted, or one `PlanError`: none kept, one listed twice,
    or one outside 0..size-1 (`name` is the units' plural, e.g. "KV heads")."""
    out = sorted(int(i) for i in idx)
    if not out:
        raise PlanError(f"layer {layer}: the plan keeps no {name} (at least one must remain)")
    if len(set(out)) != len(out):
        raise PlanError(f"layer {layer}: the plan lists a kept {name.removesuffix('s')} twice")
    if out[0] < 0 or out[-1] >= size:
        raise PlanError(f"layer {layer}: kept {name} must lie in 0..{size - 1} (got {out[0]}..{out[-1]})")
    return out
