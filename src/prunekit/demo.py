"""`prunekit demo` / `make demo`: the main job on a real model, end to end.

Scores the built-in SmolLM2-135M on calibration text, drops 4 and 8 attention layers (LLM-Drop), adds a
TransAct width-pruned model at about the same removed-parameter count, saves each as a checkpoint, and
evaluates all of them beside the dense model on held-out text.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from prunekit.adapters import get_adapter
from prunekit.data import calibration_data, eval_windows
from prunekit.drop import check_n, plan_from_scores, score_model
from prunekit.errors import OptionError
from prunekit.evaluation.perplexity import model_summary, perplexity
from prunekit.evaluation.report import human_bytes, markdown_table, similarity_heatmap
from prunekit.io.assets import BUILTIN_MODELS
from prunekit.io.checkpoint import load_model, resolve_model_path, save_checkpoint
from prunekit.io.files import weight_bytes
from prunekit.io.outputs import atomic_dir, input_paths, prepare_output
from prunekit.surgery import apply_plan, count_parameters
from prunekit.width import width_prune

log = logging.getLogger(__name__)

COLUMNS = [("name", "model"), ("params_fmt", "params"), ("removed_fmt", "removed"), ("disk_fmt", "file size"),
           ("kv_fmt", "KV bytes/token"), ("attention_layers", "attn layers"), ("ppl_fmt", "perplexity"),
           ("dppl_fmt", "Δ ppl")]


def _row(name: str, adapter: Any, ppl: dict[str, Any], disk: int, dense_params: int,
         dense_ppl: float | None) -> dict[str, Any]:
    s = model_summary(adapter)
    removed = dense_params - s["params"]
    return {
        "name": name, **s, "disk_bytes": disk, "perplexity": ppl["perplexity"], "removed_params": removed,
        "params_fmt": f"{s['params'] / 1e6:.2f}M", "removed_fmt": f"{100 * removed / dense_params:.1f}%",
        "disk_fmt": human_bytes(disk), "kv_fmt": f"{s['kv_bytes_per_token']:,}",
        "ppl_fmt": f"{ppl['perplexity']:.2f}",
        "dppl_fmt": "-" if dense_ppl is None else f"{ppl['perplexity'] - dense_ppl:+.2f}",
    }


def _say(text: str = "") -> None:
    print(text, file=sys.stderr)  # progress for people; stdout is the CLI's one JSON object


def parse_drops(drops: str) -> list[int]:
    """`4,8` -> [4, 8]; one clear error for anything else."""
    try:
        counts = [int(x) for x in drops.split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"--drops must be comma-separated numbers of layers, got {drops!r}") from None
    if any(n < 1 for n in counts):
        raise OptionError(f"--drops must be at least 1 each, got {drops!r}")
    return counts


def run_demo(*, model: str = "smollm2-135m", out_dir: Path = Path("runs/demo"), calib: str = "c4",
             text: str = "wiki", samples: int = 16, seq_len: int = 512, windows: int = 10, window_len: int = 1024,
             drops: str = "4,8", with_width: bool = True, force: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Score, drop, narrow, evaluate, and write every checkpoint and the report to `out_dir`, all or nothing
    (an existing `out_dir` is replaced only with `force`)."""
    drop_counts = parse_drops(drops)
    dest = prepare_output(out_dir, force, inputs=input_paths(model, calib, text))
    dense, tok = load_model(model)
    adapter = get_adapter(dense)
    for n in drop_counts:  # before the scoring pass, not after it
        check_n("attn", n, adapter.num_layers, adapter.num_layers)
    with atomic_dir(dest) as tmp:
        return _run(model, dense, tok, adapter, tmp, Path(out_dir), calib=calib, text=text, samples=samples,
                    seq_len=seq_len, windows=windows, window_len=window_len, drop_counts=drop_counts,
                    with_width=with_width, progress=progress)


def _run(model: str, dense: Any, tok: Any, adapter: Any, out_dir: Path, final_dir: Path, *, calib: str,
         text: str, samples: int, seq_len: int, windows: int, window_len: int, drop_counts: list[int],
         with_width: bool, progress: bool) -> dict[str, Any]:
    t0 = time.time()
    cal = calibration_data(tok, calib, samples, seq_len)
    eval_ids = eval_windows(tok, text, windows, window_len)
    _say(f"[demo] {model}: {adapter.num_layers} layers, {count_parameters(dense):,} params; calibration "
         f"{samples}x{seq_len} tokens of {calib}; evaluation {windows}x{window_len} tokens of {text}")

    scores = score_model(dense, adapter, cal, progress=progress)
    (out_dir / "scores.json").write_text(json.dumps(scores.to_json(), indent=2))
    dense_params = count_parameters(dense)
    dense_ppl = perplexity(dense, eval_ids, progress=progress)
    src_dir = Path(resolve_model_path(model))
    rows = [_row("dense", adapter, dense_ppl, weight_bytes(src_dir), dense_params, None)]
    _say(f"[demo] dense perplexity {dense_ppl['perplexity']:.3f}")

    heat_marks: list[tuple[int, str]] = []
    for n in drop_counts:
        pruned = copy.deepcopy(dense)
        ad = get_adapter(pruned)
        plan = plan_from_scores(scores, ad, cal, target="attn", n=n, source=model)
        apply_plan(ad, plan)
        ckpt = save_checkpoint(pruned, tok, out_dir / f"attn-drop-{n}", plan)
        ppl = perplexity(pruned, eval_ids, progress=progress)
        rows.append(_row(f"attn drop {n}", ad, ppl, weight_bytes(ckpt), dense_params, dense_ppl["perplexity"]))
        rows[-1]["dropped_layers"] = [d.layer for d in plan.dropped]
        heat_marks = [(d.layer, d.module) for d in plan.dropped]
        _say(f"[demo] attention drop {n} (layers {rows[-1]['dropped_layers']}): perplexity {ppl['perplexity']:.3f}")
        del pruned

    if with_width and drop_counts:
        rows.append(_width_row(dense, tok, cal, eval_ids, rows, dense_params, dense_ppl["perplexity"], out_dir,
                               progress))

    table = markdown_table(rows, COLUMNS)
    heatmap = similarity_heatmap(scores, out_dir / "similarity.png", dropped=heat_marks,
                                 title=f"{model}: LLM-Drop similarity per layer (x = dropped at n={drop_counts[-1] if drop_counts else 0})")
    report = [
        f"# prunekit demo: {model}",
        "",
        f"Calibration: {samples} x {seq_len} tokens of `{calib}` (first half of the text; sha256 "
        f"`{cal.sha256[:16]}…`). Evaluation: perplexity over {windows} non-overlapping windows of {window_len} "
        f"tokens of `{text}` (second half of the text, never seen in calibration).",
        "",
        table,
        "",
        "KV bytes/token counts K and V over the layers that keep attention, at the model's dtype (fp32). "
        "File size is the safetensors weights of each saved checkpoint.",
    ]
    if model in BUILTIN_MODELS:
        report.append("The built-in models are 4-bit GGUF releases dequantized to fp32: numbers are for those "
                      "weights, slightly noisier than the original bf16 models.")
    report += ["", f"![similarity per layer]({heatmap.name})", "", f"Total time: {time.time() - t0:.0f} s."]
    (out_dir / "report.md").write_text("\n".join(report) + "\n")
    result = {"model": model, "calibration": cal.describe(), "eval": {"text": text, "windows": windows,
              "window_len": window_len}, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    _say()
    _say(table)
    _say(f"\n[demo] report: {final_dir / 'report.md'}  heatmap: {final_dir / heatmap.name}")
    return result


def _width_row(dense: Any, tok: Any, cal: Any, eval_ids: Any, rows: list[dict[str, Any]], dense_params: int,
               dense_ppl: float, out_dir: Path, progress: bool) -> dict[str, Any]:
    """TransAct at about the removed-parameter count of the largest attention drop (MLP channels only)."""
    target_removed = max(r["removed_params"] for r in rows)
    pruned = copy.deepcopy(dense)
    ad = get_adapter(pruned)
    gate, up, _ = ad.mlp_projections(ad.layers()[0])
    width, hidden = up.out_features, up.in_features  # read now: pruning narrows these modules in place
    per_channel = (3 if gate is not None else 2) * hidden * ad.num_layers
    keep = width - round(target_removed / per_channel)
    # width_prune narrows the model in place (it must, to re-score between shots) and returns the plan.
    # multiple_of=1: the row matches the attention drop's parameter count exactly, not a kernel-friendly width.
    plan = width_prune(pruned, ad, cal, mlp_keep=keep, heads_keep=None, mode="uniform", shots=4, multiple_of=1,
                       progress=progress)
    ckpt = save_checkpoint(pruned, tok, out_dir / f"transact-mlp{keep}", plan)
    ppl = perplexity(pruned, eval_ids, progress=progress)
    row = _row(f"TransAct MLP {keep}/{width} (4 shots)", ad, ppl, weight_bytes(ckpt), dense_params, dense_ppl)
    _say(f"[demo] TransAct MLP width {keep}: perplexity {ppl['perplexity']:.3f}")
    return row
