"""The model card: the `README.md` every checkpoint prunekit writes, in the Hugging Face convention (YAML front
matter that the hub and tools read, then prose and tables a person reads without prunekit's docs).

Two halves. `render_card` (in `io.card_text`) is pure: plain facts in (`CardFacts`: the plan, the shapes of the base model and of
this one, the recipe), markdown out; it imports neither torch nor transformers. `write_model_card` gathers those
facts when a checkpoint is saved (`io.checkpoint.write_companions`, inside the temporary folder, so the card is
published with the weights or not at all): every number is the plan's, or is read from a config through a
meta-device skeleton (parameters with `count_parameters`, KV bytes with `kv_bytes_per_token`), never re-derived
by hand.

The "Measured quality" section sits between two markers; `prunekit eval --card` and `prunekit compare --card`
replace what is between them (`update_measured_quality`) and keep the rest of the card as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from prunekit.errors import CheckpointError
from prunekit.io.card_text import (  # noqa: F401  (the card API in one place)
    CARD_FILE,
    HUB_ID,
    MEASURED_BEGIN,
    MEASURED_END,
    BaseModel,
    CardFacts,
    ModelShape,
    compare_quality,
    eval_quality,
    measured_section,
    render_card,
)
from prunekit.plans import PLAN_FILE, RECIPE_FILE, PruningPlan


# --- the base model's identity (name, license) ---------------------------------------------------------------------
def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card (empty when it has none or it does not parse)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _card_of(folder: Path) -> dict[str, Any]:
    try:
        return read_front_matter((folder / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}


def _config_of(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _license(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def base_identity(spec: str, folder: Path | None) -> tuple[str, str | None]:
    """(what `base_model` says, the license) of the base model `spec`, resolved to the local `folder` when there is
    one: a built-in's hub id and license; a hub id as it is, its license from its cached card; a local folder's
    `_name_or_path` when that is a hub id, else the folder's name, its license from its own card or config."""
    from prunekit.io.assets import BUILTIN_MODELS

    if spec in BUILTIN_MODELS and not Path(spec).exists():
        b = BUILTIN_MODELS[spec]
        return b.hub_id or spec, b.license
    if folder is None:
        return spec, _license(read_front_matter(_cached_hub_card(spec)).get("license"))
    cfg = _config_of(folder)
    named = cfg.get("_name_or_path")
    name = named if isinstance(named, str) and HUB_ID.match(named) and not Path(named).exists() else folder.name
    return name, _license(_card_of(folder).get("license")) or _license(cfg.get("license"))


def _cached_hub_card(repo: str) -> str:
    """A hub repo's README.md from the local Hugging Face cache ("" when it is not there: nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo, CARD_FILE)
        return Path(path).read_text(encoding="utf-8") if isinstance(path, str) else ""
    except (ValueError, OSError, UnicodeDecodeError):
        return ""


def _local_folder(spec: str) -> Path | None:
    """The local checkpoint folder of a model spec: a directory, a built-in's converted copy, or a hub id's cached
    snapshot; None when there is none here."""
    from prunekit.io.assets import BUILTIN_MODELS
    from prunekit.io.paths import cache_dir

    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if spec in BUILTIN_MODELS:
        converted = cache_dir() / "models" / spec
        return converted if (converted / "config.json").is_file() else None
    if HUB_ID.match(spec):
        try:
            from huggingface_hub import try_to_load_from_cache

            cfg = try_to_load_from_cache(spec, "config.json")
        except ValueError:
            return None
        return Path(cfg).parent if isinstance(cfg, str) else None
    return None


# --- gathering the facts (reads configs; imports torch lazily) -------------------------------------------------------
def model_shape(folder: Path, dtype: str | None = None) -> ModelShape:
    """The shape of the checkpoint in `folder`, from its config alone (a meta-device skeleton; no weights read).
    `dtype`: what the KV bytes are counted in (default the checkpoint's own)."""
    from prunekit.adapters import get_adapter
    from prunekit.evaluation.perplexity import kv_bytes_per_token
    from prunekit.io.skeleton import build_skeleton
    from prunekit.surgery import count_parameters

    dtype = dtype or _checkpoint_dtype(folder)
    adapter = get_adapter(build_skeleton(folder, dtype))
    return ModelShape(parameters=count_parameters(adapter.model), kv_bytes_per_token=kv_bytes_per_token(adapter),
                      dtype=dtype, model_type=str(adapter.model.config.model_type),
                      layers=[adapter.layer_widths(layer) for layer in adapter.layers()])


def _checkpoint_dtype(folder: Path) -> str:
    name = _config_of(folder).get("dtype") or _config_of(folder).get("torch_dtype")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def base_model(plan: PruningPlan, source: str | Path | None, dtype: str, layers: int) -> BaseModel:
    """The base model of `plan`: the model its `model.source` names, else the folder the pruned model was loaded
    from (`source`). Its shape is read where it is still here and has the layers the plan implies (`layers`); a
    base that moved or changed is named but not measured."""
    spec = plan.model.get("source") or (str(source) if source is not None else None)
    if not spec:
        return BaseModel(None, None)
    folder = _local_folder(str(spec))
    if not plan.model.get("source") and folder is not None and (folder / PLAN_FILE).is_file():
        # Loaded from a pruned checkpoint whose plan does not name its base (a plan of an older prunekit, healed
        # now): that checkpoint is not the base; its own card may name it.
        return BaseModel(_card_of(folder).get("base_model") or folder.name, None)
    name, license = base_identity(str(spec), folder)
    shape = None
    if folder is not None:
        try:
            shape = model_shape(folder, dtype)
        except Exception:  # a base that can no longer be read: the card says so instead of failing the save
            shape = None
    if shape is not None and len(shape.layers) != layers:
        shape = None
    return BaseModel(name, str(spec), license, shape)


def checkpoint_facts(folder: Path, plan: PruningPlan, source: str | Path | None = None,
                     dtype: str | None = None) -> CardFacts:
    """The facts of the checkpoint being written in `folder` (its config, plan and recipe already there); KV bytes
    in `dtype` (default the checkpoint's)."""
    from prunekit.io import config_edit

    model = model_shape(folder, dtype)
    attn, mlp = plan.drops_by_module()
    base = base_model(plan, source, model.dtype, len(model.layers) + len(attn & mlp))
    recipe = folder / RECIPE_FILE
    return CardFacts(plan=plan, base=base, model=model, sealed=config_edit.is_sealed(_config_of(folder)),
                     recipe=recipe.read_text(encoding="utf-8") if recipe.is_file() else None,
                     files=sorted(p.name for p in folder.iterdir()))


def write_model_card(folder: Path, plan: PruningPlan, source: str | Path | None = None) -> Path | None:
    """Write `folder/README.md` for the checkpoint being saved there (see the module docstring). None for an
    architecture prunekit has no adapter for (healing takes any causal LM): its shapes cannot be read."""
    from prunekit.errors import UnsupportedArchitectureError

    try:
        facts = checkpoint_facts(folder, plan, source)
    except UnsupportedArchitectureError:
        return None
    path = folder / CARD_FILE
    path.write_text(render_card(facts), encoding="utf-8")
    return path


def write_export_card(folder: Path, exported_from: str | Path, export: str, dtype: str | None = None) -> Path:
    """Write the card of an export folder (`export`: its format; `dtype`: its weights'): the facts of the prunekit
    checkpoint it was exported from, with how to serve this layout."""
    from prunekit.io.skeleton import resolve_model_path
    from prunekit.plans import checkpoint_plan

    src = Path(resolve_model_path(exported_from))
    plan = checkpoint_plan(src) or PruningPlan()
    facts = checkpoint_facts(src, plan, src, dtype)
    facts.export, facts.exported_from, facts.sealed = export, str(exported_from), False
    facts.files = sorted(p.name for p in folder.iterdir())
    path = folder / CARD_FILE
    path.write_text(render_card(facts), encoding="utf-8")
    return path


# --- the measured-quality section --------------------------------------------------------------------------------
def check_card_folder(folder: str | Path) -> Path:
    """The folder whose card `eval --card` / `compare --card` updates: one `CheckpointError` unless it is a
    prunekit checkpoint (a local folder with `prunekit_plan.json`), checked before any measuring."""
    from prunekit.io.skeleton import resolve_model_path
    from prunekit.plans import checkpoint_plan

    path = Path(resolve_model_path(folder))
    if not path.is_dir() or not (path / PLAN_FILE).is_file():
        raise CheckpointError(f"--card needs a prunekit checkpoint folder (with {PLAN_FILE}); {folder} is not one")
    checkpoint_plan(path)  # a damaged plan is one error now, not after the measuring
    return path


def replace_measured(card: str, body: str) -> str:
    """`card` with its "Measured quality" section replaced by one holding `body` (appended when it has none)."""
    section = measured_section(body)
    start, end = card.find(MEASURED_BEGIN), card.find(MEASURED_END)
    if start >= 0 and end > start:
        return card[:start] + section + card[end + len(MEASURED_END):]
    return card.rstrip("\n") + "\n\n" + section + "\n"


def update_measured_quality(folder: str | Path, body: str) -> Path:
    """Put `body` into the "Measured quality" section of the card in `folder` (a prunekit checkpoint), all or
    nothing; the rest of the card is kept. A checkpoint without a card gets one first."""
    from prunekit.io.outputs import owned_file

    path = check_card_folder(folder)
    card_path = path / CARD_FILE
    if card_path.is_file():
        card = card_path.read_text(encoding="utf-8")
    else:
        card = render_card(checkpoint_facts(path, PruningPlan.load(path / PLAN_FILE)))
    with owned_file(card_path) as tmp:
        tmp.write_text(replace_measured(card, body), encoding="utf-8")
    return card_path

