"""The model card's text (pure): plain facts in (`CardFacts`: the plan, the shapes of the base model and of this
one, the recipe), markdown out, and the "Measured quality" section's body for an `eval` or `compare` result.
Imports neither torch nor transformers; `io.model_card` gathers the facts and writes the file."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import yaml

from prunekit.plans import PLAN_FILE, RECIPE_FILE, PruningPlan

CARD_FILE = "README.md"
MEASURED_BEGIN = "<!-- prunekit:measured-quality:begin -->"
MEASURED_END = "<!-- prunekit:measured-quality:end -->"
_NOT_MEASURED = ("Not measured yet. `prunekit eval THIS_FOLDER --card` (perplexity, zero-shot tasks) or "
                 "`prunekit compare BASE THIS_FOLDER --out REPORT --card THIS_FOLDER` (beside the base model) "
                 "fills in this section.")
_HUB = "https://huggingface.co/"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
# Engines that take the Nemotron-NAS export: Llama-style layers only (`prunekit.export.nemotron_nas`).
_NAS_FAMILIES = ("llama", "mistral", "qwen2")


# --- facts ----------------------------------------------------------------------------------------------------
@dataclass
class ModelShape:
    """What a model is made of, read from its config: unique parameters, K and V bytes one token adds to the
    cache (at `dtype`), and per decoder layer the widths it has (`num_attention_heads`, `num_key_value_heads`,
    `intermediate_size`; a removed sub-layer's keys are absent)."""

    parameters: int
    kv_bytes_per_token: int
    dtype: str
    model_type: str
    layers: list[dict[str, int]]


@dataclass
class BaseModel:
    """The model the plan was made from: `name` is what `base_model` says (a hub id, or a local folder's name),
    `spec` how the run named it; `shape` is None where it could not be read (a folder moved since)."""

    name: str | None
    spec: str | None
    license: str | None = None
    shape: ModelShape | None = None


@dataclass
class CardFacts:
    plan: PruningPlan
    base: BaseModel
    model: ModelShape
    sealed: bool  # heterogeneous layers: the config names prunekit's loader (trust_remote_code)
    recipe: str | None = None
    export: str | None = None  # the export format ("nemotron-nas"), None for a prunekit checkpoint
    exported_from: str | None = None
    files: list[str] = field(default_factory=list)


# --- rendering (pure) -------------------------------------------------------------------------------------------
def _n(x: int) -> str:
    return f"{x:,}"


def _change(before: int, after: int) -> str:
    if before == after:
        return "unchanged"
    return f"{100 * (after - before) / before:+.2f}%" if before else ""


def _layer_list(layers: Sequence[int]) -> str:
    return ", ".join(str(i) for i in sorted(layers)) if layers else "none"


def method_tags(plan: PruningPlan) -> list[str]:
    """The card's tags for what was done to the weights, in the order it was done."""
    tags = []
    for prefix, tag in (("llm-drop", "llm-drop"), ("transact", "transact"), ("compress", "compress")):
        if plan.method.startswith(prefix):
            tags.append(tag)
    if plan.repair and any(s.get("applied") for s in plan.repair.get("spans", [])):
        tags.append("linear-repair")
    if plan.recovery:
        tags.append("healed")
    return tags


def _pruned(plan: PruningPlan) -> bool:
    return bool(plan.dropped or plan.widths)


def front_matter(facts: CardFacts) -> dict[str, Any]:
    plan = facts.plan
    data: dict[str, Any] = {}
    if facts.base.name:
        data["base_model"] = facts.base.name
    if facts.export is None:  # an export is served by an engine (vLLM), not loaded by transformers
        data["library_name"] = "transformers"
    data["pipeline_tag"] = "text-generation"
    data["tags"] = ["prunekit", *(["pruned"] if _pruned(plan) else []), *method_tags(plan),
                    *([facts.export] if facts.export else [])]
    if facts.base.license:
        data["license"] = facts.base.license
    return data


def render_card(facts: CardFacts) -> str:
    """The whole card: the front matter, then the sections (a checkpoint's "Measured quality" one still empty)."""
    head = "---\n" + yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True) + "---\n"
    # An export is measured through the checkpoint it came from: `eval --card` updates prunekit checkpoints only.
    measured = "" if facts.export else measured_section(_NOT_MEASURED)
    parts = [_title(facts), _removed(facts), _how(facts), _quality_while_pruning(facts.plan), measured,
             _usage(facts), _files(facts)]
    return head + "\n" + "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


def _base_link(base: BaseModel) -> str:
    if not base.name:
        return "an unnamed model"
    return f"[{base.name}]({_HUB}{base.name})" if HUB_ID.match(base.name) else f"`{base.name}`"


def _title(f: CardFacts) -> str:
    plan, tags = f.plan, method_tags(f.plan)
    done = ", ".join(tags) if tags else "unchanged"
    title = f"# {f.base.name or 'model'}, {'pruned' if _pruned(plan) else 'retrained'} with prunekit ({done})"
    if _pruned(plan):
        what = ("a structurally pruned version of " + _base_link(f.base) + ". Whole parts of the network (layers, "
                "attention heads, MLP channels) were removed: the weights are gone from the files, so the model is "
                "smaller and faster on any runtime; there are no sparsity masks and no quantization.")
    else:
        what = "a retrained copy of " + _base_link(f.base) + "; its structure is the base model's."
    text = f"{title}\n\nThis model is {what}"
    if f.export:
        text += (f"\n\nThis folder is the **{f.export}** export of the prunekit checkpoint "
                 f"`{f.exported_from}`: the same weights, laid out for inference engines.")
    return text


def _removed(f: CardFacts) -> str:
    model, base = f.model, f.base.shape
    lines = ["## What was removed", ""]
    rows = [("parameters", lambda s: s.parameters),
            (f"KV cache bytes per token ({model.dtype})", lambda s: s.kv_bytes_per_token),
            ("decoder layers", lambda s: len(s.layers)),
            ("layers with attention", lambda s: sum("num_attention_heads" in w for w in s.layers)),
            ("layers with an MLP", lambda s: sum("intermediate_size" in w for w in s.layers))]
    if base is not None:
        lines += ["| | base model | this model | change |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {_n(get(base))} | {_n(get(model))} | {_change(get(base), get(model))} |"
                  for name, get in rows]
    else:
        lines += ["| | this model |", "|---|---:|"]
        lines += [f"| {name} | {_n(get(model))} |" for name, get in rows]
        lines += ["", "The base model could not be read when this card was written, so it is not shown beside it."]
    lines += ["", *_drops(f.plan), *_width_table(f)]
    return "\n".join(lines)


def _drops(plan: PruningPlan) -> list[str]:
    attn, mlp = plan.drops_by_module()
    blocks, only_attn, only_mlp = attn & mlp, attn - mlp, mlp - attn
    return ["Layers are numbered as in the base model.", "",
            f"- whole layers removed ({len(blocks)}): {_layer_list(blocks)}",
            f"- attention removed, MLP kept ({len(only_attn)}): {_layer_list(only_attn)}",
            f"- MLP removed, attention kept ({len(only_mlp)}): {_layer_list(only_mlp)}",
            f"- layers narrowed ({len(plan.widths)}): {_layer_list(list(plan.widths))}"]


def _kept_layers(plan: PruningPlan, base_layers: int) -> list[int]:
    attn, mlp = plan.drops_by_module()
    return [i for i in range(base_layers) if i not in attn & mlp]


def _attn_cell(w: dict[str, int] | None) -> str:
    if w is None:
        return "?"
    return f"{w['num_attention_heads']}/{w['num_key_value_heads']}" if "num_attention_heads" in w else "removed"


def _mlp_cell(w: dict[str, int] | None) -> str:
    if w is None:
        return "?"
    return str(w["intermediate_size"]) if "intermediate_size" in w else "removed"


def _width_table(f: CardFacts) -> list[str]:
    """One row per base layer that changed: its attention heads (query/KV) and MLP channels before and after."""
    plan, base = f.plan, f.base.shape
    attn, mlp = plan.drops_by_module()
    n_base = len(base.layers) if base is not None else len(f.model.layers) + len(attn & mlp)
    after: dict[int, dict[str, int]] = dict(zip(_kept_layers(plan, n_base), f.model.layers))
    changed = sorted(set(plan.widths) | attn | mlp)
    if not changed:
        return []
    lines = ["", "### Per-layer widths", "",
             "Attention as query heads/KV heads, MLP as intermediate channels; only the layers that changed.", "",
             "| layer | attention before | attention after | MLP before | MLP after |", "|---:|---:|---:|---:|---:|"]
    for i in changed:
        b = base.layers[i] if base is not None else None
        a = after.get(i, {})
        lines.append(f"| {i} | {_attn_cell(b)} | {_attn_cell(a)} | {_mlp_cell(b)} | {_mlp_cell(a)} |")
    return lines


_METHODS = {
    "llm-drop": ("**LLM-Drop** (He et al., 2024, *What Matters in Transformers? Not All Attention Is Needed*): each "
                 "{target_name} was scored by {score}, and the {n} most redundant were removed."),
    "transact": ("**TransAct-style width pruning**: attention (whole KV groups or query heads) and MLP "
                 "intermediate channels were ranked by the norm of their activations on the calibration text and "
                 "the weakest removed in {shots} shots, re-scored in between; the hidden size is unchanged."),
    "compress": ("**prunekit compress**: depth (whole attention and MLP sub-layers) and width (KV groups, MLP "
                 "channels) were searched together for the budget `{budget}`. Every candidate was scored by its "
                 "loss on held-out calibration tokens; the kept projections were refitted by least squares to "
                 "reproduce the base model's outputs, and the best candidate at the budget (`{chosen}`) was kept. "
                 "`pareto.json` and `pareto.png` beside the weights list every candidate tried."),
}
# Options that are bookkeeping of the run (timings, internal counts), not choices a reader needs.
_QUIET_OPTIONS = {"seconds", "parameters_before", "parameters_after", "forward_passes", "grams_on_disk",
                  "fit_tokens", "check_tokens", "removal_target", "batch_size"}


_TARGETS = {"attn": "attention sub-layer", "mlp": "MLP sub-layer", "block": "whole layer (attention and MLP)"}
_DROP_SCORES = {
    "cosine": "the cosine similarity of its input and output hidden states on the calibration text (a sub-layer "
              "that barely changes its input adds little)",
    "loss": "the calibration loss of the model without it",
    "kl": "the KL divergence of the model without it from the base model's next-token predictions",
}


def _method_text(plan: PruningPlan) -> str:
    opts = plan.options
    words = {"target_name": _TARGETS.get(opts.get("target"), "sub-layer"),
             "score": _DROP_SCORES.get(opts.get("criterion", "cosine"), "its calibration criterion")}
    for prefix, text in _METHODS.items():
        if plan.method.startswith(prefix):
            return text.format_map(_Blank({**opts, **words}))
    return "No parts were removed." if plan.method == "none" else f"Method `{plan.method}`."


class _Blank(dict):
    """format_map values: a missing option reads as '?' rather than failing the save."""

    def __missing__(self, key: str) -> str:
        return "?"


def _how(f: CardFacts) -> str:
    plan = f.plan
    lines = ["## How it was made", "", _method_text(plan)]
    opts = {k: v for k, v in plan.options.items() if k not in _QUIET_OPTIONS and isinstance(v, (str, int, float))}
    if opts:
        lines += ["", "| option | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in opts.items()]]
    lines += _calibration(plan.calibration)
    lines += _correction(plan) + _repair(plan) + _healing(plan)
    edits = plan.weight_edits()
    if edits:
        lines += ["", f"The weights also carry {', '.join(edits)}, which `prunekit_plan.json` (the structure) cannot "
                      "rebuild from the base model; the recipe below can."]
    if f.recipe and f.export:
        lines += ["", f"The recipe of the checkpoint it was exported from (`{f.exported_from}/{RECIPE_FILE}`), then "
                      f"`prunekit export {f.exported_from} --format {f.export} --out FOLDER`:", "",
                  "```yaml", f.recipe.strip("\n"), "```"]
    elif f.recipe:
        lines += ["", f"The recipe that made it (saved beside the weights as `{RECIPE_FILE}`); "
                      f"`prunekit run {RECIPE_FILE} --out OTHER_FOLDER` makes this model again:", "",
                  "```yaml", f.recipe.strip("\n"), "```"]
    else:
        lines += ["", "No recipe was saved (it was made through prunekit's Python API); `prunekit_plan.json` records "
                      "the structure, the options and the calibration data's hash."]
    return "\n".join(lines)


def _calibration(calib: dict[str, Any]) -> list[str]:
    if not calib:
        return []
    return ["", f"Calibration text: `{calib.get('source', '?')}`, {calib.get('samples', '?')} sequences of "
                f"{calib.get('seq_len', '?')} tokens ({_n(calib['tokens']) if 'tokens' in calib else '?'} tokens); "
                f"sha256 of the token ids: `{calib.get('sha256', '?')}`."]


def _correction(plan: PruningPlan) -> list[str]:
    corr = plan.options.get("correction")
    if not isinstance(corr, dict) or not corr.get("applied"):
        return []
    what = "KL from the base model" if plan.options.get("criterion") == "kl" else "loss"
    return ["", "**Error correction**: the kept projections were refitted once more to the base model's outputs, "
                f"from the inputs the pruned model itself computes; it lowered the held-out calibration {what} from "
                f"{corr['check_value_uncorrected']:.4f} to {corr['check_value']:.4f}."]


def _repair(plan: PruningPlan) -> list[str]:
    rep = plan.repair or {}
    spans = rep.get("spans") or []
    if not spans:
        return []
    kept = sum(bool(s.get("applied")) for s in spans)
    return ["", f"**Linear repair**: for each of the {len(spans)} removed spans a linear map was fitted to stand in "
                f"for what was removed and folded into the weights before it; {kept} of {len(spans)} lowered the "
                "held-out calibration loss and were kept."]


def _healing(plan: PruningPlan) -> list[str]:
    lines = []
    for rec in plan.recovery:
        teacher = f", distilled from `{rec['teacher']}`" if rec.get("teacher") else ""
        data = rec.get("data") or {}
        lines += ["", f"**Healing**: {rec.get('method', '?')}{teacher}; {rec.get('steps', '?')} steps at learning "
                      f"rate {rec.get('lr', '?')}, {_n(rec['tokens_seen']) if 'tokens_seen' in rec else '?'} tokens "
                      f"of `{data.get('source', '?')}` (sha256 `{data.get('sha256', '?')}`)."]
    return lines


def _ppl(loss: float) -> str:
    return f"{math.exp(loss):.2f}" if loss < 700 else "inf"


def _quality_while_pruning(plan: PruningPlan) -> str:
    """What the run itself measured: compress's held-out loss of the base and the chosen model, linear repair's
    loss before and after, healing's training loss."""
    rows: list[tuple[str, float]] = []
    by_name = {r.get("name"): r for r in plan.history if isinstance(r, dict) and "check_loss" in r}
    chosen = by_name.get(plan.options.get("chosen"))
    if "dense" in by_name and chosen is not None:
        rows += [("base model", by_name["dense"]["check_loss"]),
                 (f"chosen: {plan.options['chosen']}", chosen["check_loss"])]
    rep = plan.repair or {}
    if rep.get("spans") and "check_loss" in rep:
        if not rows and "check_loss_unrepaired" in rep:
            rows.append(("without linear repair", rep["check_loss_unrepaired"]))
        kept = sum(bool(s.get("applied")) for s in rep["spans"])
        rows.append((f"saved (linear repair: {kept} of {len(rep['spans'])} maps kept)", rep["check_loss"]))
    lines: list[str] = []
    if rows:
        tokens = plan.options.get("check_tokens")
        where = f"{_n(tokens)} held-out calibration tokens" if tokens else "held-out calibration text"
        lines += [f"Loss on {where} (not used to fit):", "", "| model | loss | perplexity |", "|---|---:|---:|",
                  *[f"| {name} | {loss:.4f} | {_ppl(loss)} |" for name, loss in rows]]
    for rec in plan.recovery:
        if "loss_first" in rec and "loss_last_10pct_mean" in rec:
            lines += ["", f"Healing training loss: {rec['loss_first']:.4f} at the first step, "
                          f"{rec['loss_last_10pct_mean']:.4f} over the last tenth of the steps."]
    if not lines:
        return ""
    return "\n".join(["## Quality measured while pruning", "", *(lines[1:] if lines[0] == "" else lines)])


def measured_section(body: str) -> str:
    """The "Measured quality" section with its markers: what `update_measured_quality` replaces."""
    return f"{MEASURED_BEGIN}\n## Measured quality\n\n{body.strip()}\n{MEASURED_END}"


def _usage(f: CardFacts) -> str:
    if f.export == "nemotron-nas":
        return _usage_nemotron(f)
    lines = ["## How to use", ""]
    if f.sealed:
        lines += ["Its layers differ in shape (sub-layers removed or narrowed per layer), which the stock transformers "
                  "config cannot describe, so the config names its own model type and the folder carries "
                  "`modeling_prunekit.py` (it imports only torch and transformers, builds the stock architecture and "
                  "removes or narrows the listed parts). Load it with remote code:", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'path = "path/to/this/folder"  # or its hub id once uploaded',
                  "tokenizer = AutoTokenizer.from_pretrained(path)",
                  "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)", "```", "",
                  "or without remote code, through prunekit: `model, tokenizer = prunekit.load_model(path)`."]
    else:
        lines += ["Every layer has the same shape, so the config is a stock one and plain transformers loads it:", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'path = "path/to/this/folder"  # or its hub id once uploaded',
                  "tokenizer = AutoTokenizer.from_pretrained(path)",
                  "model = AutoModelForCausalLM.from_pretrained(path)", "```"]
    lines += ["", "### llama.cpp", "",
              "Export it to one GGUF file (f16 and f32 are written directly; quantized types such as q4_k_m use "
              "llama.cpp's own quantizer, `make llamacpp`):", "",
              "```bash", "prunekit export path/to/this/folder --format gguf --quant q4_k_m --out model-q4_k_m.gguf",
              'llama-cli -m model-q4_k_m.gguf -p "Once upon a time"', "```"]
    if f.sealed:
        lines += ["", "Layers of different shapes are written as llama.cpp's `deci` architecture, which stock "
                      "llama.cpp runs."]
    if f.model.model_type in _NAS_FAMILIES:
        lines += ["", "For vLLM: `prunekit export path/to/this/folder --format nemotron-nas --out FOLDER` writes "
                      "NVIDIA's Nemotron-NAS layout (`DeciLMForCausalLM`), which vLLM serves natively."]
    return "\n".join(lines)


def _usage_nemotron(f: CardFacts) -> str:
    return "\n".join([
        "## How to use", "",
        "vLLM serves this layout natively (`DeciLMForCausalLM`: one `block_configs` entry per layer says which "
        "sub-layers exist and how wide they are). The config class ships in `configuration_decilm.py`, so allow "
        "remote code:", "",
        "```bash", "vllm serve path/to/this/folder --trust-remote-code", "```", "",
        f"For transformers or llama.cpp, use the prunekit checkpoint it was exported from (`{f.exported_from}`): "
        "`prunekit export THAT_FOLDER --format gguf --out model.gguf` writes a file llama.cpp runs."])


_FILE_NOTES = {
    PLAN_FILE: "what was removed (layer indices of the base model), the options, the scores and the calibration hash",
    RECIPE_FILE: "the recipe that makes this model again (`prunekit run`)",
    "modeling_prunekit.py": "the loader for layers of different shapes (`trust_remote_code=True`)",
    "configuration_decilm.py": "the Nemotron-NAS config class (`trust_remote_code`)",
}


def _files(f: CardFacts) -> str:
    notes = [f"- `{name}`: {_FILE_NOTES[name]}" for name in f.files if name in _FILE_NOTES]
    if not notes:
        return ""
    return "\n".join(["## Files", "", "Besides the weights, config and tokenizer:", "", *notes, "",
                      f"Made with prunekit {f.plan.version}."])


def eval_quality(result: dict[str, Any], *, dtype: str) -> str:
    """The section body for one `prunekit eval` result (`jobs.evaluate.eval_job`)."""
    lines = [f"Measured by `prunekit eval` on `{result['text']}` (held-out half), {result['windows']} windows of "
             f"{result['window_len']} tokens ({_n(result['tokens'])} predicted tokens), in {dtype}:", "",
             "| perplexity | mean NLL | parameters | KV cache bytes per token |", "|---:|---:|---:|---:|",
             f"| {result['perplexity']:.4f} | {result['nll']:.6f} | {_n(result['params'])} | "
             f"{_n(result['kv_bytes_per_token'])} |"]
    return "\n".join(lines + _task_table(result.get("zeroshot")))


def _task_table(zeroshot: dict[str, Any] | None, base: dict[str, Any] | None = None) -> list[str]:
    if not zeroshot:
        return []
    head = "| task | base accuracy | accuracy | examples |" if base else "| task | accuracy | examples |"
    lines = ["", "Zero-shot tasks (lm-eval, in memory):", "", head, "|---|---:|---:|---:|" if base else "|---|---:|---:|"]
    for name, t in zeroshot["tasks"].items():
        acc = f"{t['acc']:.4f} ± {t['acc_stderr']:.4f}"
        if base:
            b = base["tasks"].get(name)
            lines.append(f"| {name} | {'?' if b is None else format(b['acc'], '.4f')} | {acc} | {t['n']} |")
        else:
            lines.append(f"| {name} | {acc} | {t['n']} |")
    return lines


def compare_quality(report: dict[str, Any], index: int) -> str:
    """The section body for `prunekit compare`'s report: the base model (row 0) beside row `index`."""
    base, row, opts = report["rows"][0], report["rows"][index], report["options"]
    lines = [f"Measured by `prunekit compare` beside the base model `{base['model']}`, in one run with the same data: "
             f"perplexity on `{opts['text']}` (held-out half), {opts['windows']} windows of {opts['window_len']} "
             f"tokens (sha256 of the tokens `{report['eval_tokens_sha256']}`), in {opts['dtype']}:", "",
             "| | base model | this model | ratio |", "|---|---:|---:|---:|",
             f"| perplexity | {base['perplexity']:.4f} | {row['perplexity']:.4f} | "
             f"{row['perplexity'] / base['perplexity']:.3f}x |",
             f"| parameters | {_n(base['params'])} | {_n(row['params'])} | {row['params'] / base['params']:.3f}x |",
             f"| KV cache bytes per token | {_n(base['kv_bytes_per_token'])} | {_n(row['kv_bytes_per_token'])} | "
             f"{row['kv_bytes_per_token'] / base['kv_bytes_per_token']:.3f}x |"]
    if "bench" in row and "bench" in base:
        for rb, rr in zip(base["bench"]["runs"], row["bench"]["runs"]):
            lines.append(f"| decode tokens/s at {rr['context']} tokens of context | {rb['decode_tok_s']:.1f} | "
                         f"{rr['decode_tok_s']:.1f} | {rr['decode_tok_s'] / rb['decode_tok_s']:.2f}x |")
    lines += _task_table(row.get("zeroshot"), base.get("zeroshot"))
    return "\n".join(lines)
