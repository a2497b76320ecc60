"""The model card every checkpoint carries (`prunekit.io.model_card`): front matter that parses, numbers that
equal the plan's and the saved model's, the "Measured quality" section that `eval --card` and `compare --card`
replace (and nothing else), and a card that is published with the weights or not at all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prunekit.cli import main
from prunekit.io.model_card import (
    CARD_FILE,
    MEASURED_BEGIN,
    MEASURED_END,
    base_identity,
    read_front_matter,
    replace_measured,
)
from prunekit.plans import PLAN_FILE, RECIPE_FILE, PruningPlan

pytestmark = pytest.mark.usefixtures("isolated_cache")


def run(*argv) -> int:
    return main(["-q", *map(str, argv)])


def calib(text: Path) -> list:
    return ["--calib", text, "--samples", 4, "--seq-len", 24, "--batch-size", 2]


# --- reading a card back -------------------------------------------------------------------------------------------
def card_of(folder: Path) -> tuple[dict, str]:
    """(front matter, the rest) of a card; the front matter must parse with yaml.safe_load."""
    text = (folder / CARD_FILE).read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def row(body: str, label: str) -> list[str]:
    """The cells after the first one of the table row whose first cell is `label`."""
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in the card")


def number(cell: str) -> int:
    return int(cell.replace(",", ""))


def listed(body: str, prefix: str) -> list[int]:
    """The layers of a "- <prefix> (n): 0, 3" line."""
    line = next(line for line in body.splitlines() if line.startswith(f"- {prefix} ("))
    count, layers = line[len(prefix) + 4:].split("): ")
    out = [] if layers == "none" else [int(x) for x in layers.split(", ")]
    assert int(count) == len(out)
    return out


def shape(folder: Path) -> dict:
    """Parameters and KV bytes per token of the saved model, measured on the loaded model."""
    from prunekit.adapters import get_adapter
    from prunekit.evaluation.perplexity import model_summary
    from prunekit.io.checkpoint import load_model

    model, _ = load_model(folder, tokenizer=False)
    return model_summary(get_adapter(model))


def measured(card: str) -> str:
    return card[card.index(MEASURED_BEGIN):card.index(MEASURED_END) + len(MEASURED_END)]


def outside_measured(card: str) -> str:
    return card.replace(measured(card), "")


def check_front_matter(front: dict, base: str, tags: set[str]) -> None:
    assert front["base_model"] == base
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert tags <= set(front["tags"]) and {"prunekit", "pruned"} <= set(front["tags"])


def check_sizes(body: str, base: Path, out: Path) -> tuple[int, int]:
    """The parameter and KV rows equal the base model's and the saved model's; returns (before, after)."""
    before, after = shape(base), shape(out)
    params, kv = row(body, "parameters"), row(body, "KV cache bytes per token (float32)")
    assert [number(params[0]), number(params[1])] == [before["params"], after["params"]]
    assert [number(kv[0]), number(kv[1])] == [before["kv_bytes_per_token"], after["kv_bytes_per_token"]]
    return before["params"], after["params"]


def check_drops(body: str, plan: PruningPlan) -> None:
    attn, mlp = plan.drops_by_module()
    assert listed(body, "whole layers removed") == sorted(attn & mlp)
    assert listed(body, "attention removed, MLP kept") == sorted(attn - mlp)
    assert listed(body, "MLP removed, attention kept") == sorted(mlp - attn)
    assert listed(body, "layers narrowed") == sorted(plan.widths)


# --- every checkpoint command writes a card ------------------------------------------------------------------------
def test_drop_card_has_the_front_matter_the_plan_and_the_license(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    (ck / CARD_FILE).write_text("---\nlicense: apache-2.0\n---\n# the base model\n")
    out = tmp_path / "dropped"
    assert run("drop", ck, "--target", "attn", "--n", 2, *calib(text), "--out", out) == 0
    front, body = card_of(out)
    check_front_matter(front, ck.name, {"llm-drop"})
    assert front["license"] == "apache-2.0"
    plan = PruningPlan.load(out / PLAN_FILE)
    check_sizes(body, ck, out)
    check_drops(body, plan)
    for d in plan.dropped:
        assert row(body, str(d.layer))[:2] == ["4/2", "removed"]
    assert plan.calibration["sha256"] in body
    assert (out / RECIPE_FILE).read_text().strip() in body  # the recipe, verbatim
    assert "trust_remote_code=True" in body  # attention gone from some layers: a sealed config
    assert "--format gguf" in body and MEASURED_BEGIN in body


def test_width_card_widths_and_parameters_equal_the_plans(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    out = tmp_path / "narrow"
    assert run("width", ck, "--mlp-keep", 0.5, "--heads-keep", 0.5, "--per-layer", "--multiple-of", 16, "--shots", 2,
               *calib(text), "--out", out) == 0
    front, body = card_of(out)
    check_front_matter(front, ck.name, {"transact"})
    plan = PruningPlan.load(out / PLAN_FILE)
    assert plan.model["source"] == str(ck)  # the base, named in the plan as drop and compress name it
    assert check_sizes(body, ck, out) == (plan.options["parameters_before"], plan.options["parameters_after"])
    check_drops(body, plan)
    for i, w in plan.widths.items():
        cells = row(body, str(i))
        heads = f"{len(w.heads)}/{len(w.kv_heads)}" if w.heads else cells[0]
        channels = str(len(w.channels)) if w.channels else cells[2]
        assert [cells[1], cells[3]] == [heads, channels]
    sealed = bool(json.loads((out / "config.json").read_text()).get("prunekit"))
    assert ("trust_remote_code=True" in body) == sealed


def test_compress_card_numbers_equal_the_plans(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    out = tmp_path / "small"
    assert run("compress", ck, "--budget", "params=0.85", "--rounds", 2, "--multiple-of", 16, "--calib", text,
               "--samples", 8, "--seq-len", 24, "--out", out) == 0
    front, body = card_of(out)
    check_front_matter(front, ck.name, {"compress"})
    plan = PruningPlan.load(out / PLAN_FILE)
    before, after = check_sizes(body, ck, out)
    rows = {r["name"]: r for r in plan.history}
    chosen = rows[plan.options["chosen"]]
    assert (before - after) / before == chosen["removed_params"]
    assert row(body, "parameters")[2] == f"{-100 * chosen['removed_params']:+.2f}%"
    check_drops(body, plan)
    assert row(body, "base model")[0] == f"{rows['dense']['check_loss']:.4f}"
    assert row(body, f"chosen: {plan.options['chosen']}")[0] == f"{chosen['check_loss']:.4f}"
    assert ("linear-repair" in front["tags"]) == any(s["applied"] for s in plan.repair["spans"])
    assert (out / "pareto.json").is_file()


def test_heal_card_keeps_the_base_and_says_healed(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    dropped, healed = tmp_path / "dropped", tmp_path / "healed"
    assert run("drop", ck, "--target", "attn", "--n", 1, *calib(text), "--out", dropped) == 0
    assert run("heal", dropped, "--text", text, "--samples", 2, "--seq-len", 24, "--batch-size", 2, "--steps", 1,
               "--out", healed) == 0
    front, body = card_of(healed)
    check_front_matter(front, ck.name, {"llm-drop", "healed"})
    check_sizes(body, ck, healed)
    rec = PruningPlan.load(healed / PLAN_FILE).recovery[0]
    assert f"{rec['loss_first']:.4f} at the first step" in body


def test_nemotron_export_carries_a_card(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    dropped, nas = tmp_path / "dropped", tmp_path / "nas"
    assert run("drop", ck, "--target", "attn", "--n", 1, *calib(text), "--out", dropped) == 0
    assert run("export", dropped, "--format", "nemotron-nas", "--quant", "f32", "--out", nas) == 0
    front, body = card_of(nas)
    assert front["base_model"] == ck.name and {"llm-drop", "nemotron-nas"} <= set(front["tags"])
    check_sizes(body, ck, dropped)
    assert "--trust-remote-code" in body and MEASURED_BEGIN not in body


def test_a_plain_save_without_a_plan_has_no_card(tiny_checkpoint):
    ck, _ = tiny_checkpoint
    assert not (ck / CARD_FILE).exists()


# --- eval --card and compare --card --------------------------------------------------------------------------------
def test_eval_card_replaces_only_its_section_and_is_idempotent(tiny_checkpoint, tmp_path, capsys):
    ck, text = tiny_checkpoint
    out = tmp_path / "dropped"
    assert run("drop", ck, "--target", "attn", "--n", 1, *calib(text), "--out", out) == 0
    first = (out / CARD_FILE).read_text()
    evaluate = ["eval", out, "--text", text, "--windows", 2, "--window-len", 32, "--card"]
    assert run(*evaluate, "--json", tmp_path / "e.json") == 0
    result = json.loads((tmp_path / "e.json").read_text())
    card = (out / CARD_FILE).read_text()
    assert outside_measured(card) == outside_measured(first) and measured(card) != measured(first)
    cells = row(measured(card), f"{result['perplexity']:.4f}")
    assert [number(cells[1]), number(cells[2])] == [result["params"], result["kv_bytes_per_token"]]
    assert run(*evaluate) == 0  # --card alone is enough
    assert (out / CARD_FILE).read_text() == card
    assert card.count(MEASURED_BEGIN) == 1 and read_front_matter(card) == card_of(out)[0]
    capsys.readouterr()
    assert run("eval", ck, "--text", text, "--windows", 2, "--window-len", 32, "--card") == 2
    assert "prunekit checkpoint" in capsys.readouterr().err and not (ck / CARD_FILE).exists()
    assert run("eval", out, "--text", text) == 2  # neither --json nor --card


def test_compare_card_puts_the_pruned_model_beside_the_base(tiny_checkpoint, tmp_path, capsys):
    ck, text = tiny_checkpoint
    out = tmp_path / "dropped"
    assert run("drop", ck, "--target", "attn", "--n", 1, *calib(text), "--out", out) == 0
    first = (out / CARD_FILE).read_text()
    compare = ["compare", ck, out, "--text", text, "--windows", 2, "--window-len", 32, "--calib", text,
               "--no-bench", "--card", out]
    assert run(*compare, "--out", tmp_path / "r1") == 0
    report = json.loads((tmp_path / "r1" / "report.json").read_text())
    card = (out / CARD_FILE).read_text()
    assert outside_measured(card) == outside_measured(first)
    base, pruned = report["rows"]
    assert row(measured(card), "perplexity")[:2] == [f"{base['perplexity']:.4f}", f"{pruned['perplexity']:.4f}"]
    assert [number(c) for c in row(measured(card), "parameters")[:2]] == [base["params"], pruned["params"]]
    assert run(*compare, "--out", tmp_path / "r2") == 0
    assert (out / CARD_FILE).read_text() == card
    capsys.readouterr()
    assert run("compare", ck, out, "--text", text, "--no-bench", "--card", ck, "--out", tmp_path / "r3") == 2
    assert "prunekit checkpoint" in capsys.readouterr().err and not (tmp_path / "r3").exists()


def test_replacing_the_section_keeps_the_rest_and_adds_it_where_missing():
    card = f"---\nbase_model: x\n---\n\n# x\n\n{MEASURED_BEGIN}\nold\n{MEASURED_END}\n\n## After\n"
    new = replace_measured(card, "new numbers")
    assert new.startswith("---\nbase_model: x\n---\n\n# x\n\n") and new.endswith("\n\n## After\n")
    assert "new numbers" in new and "old" not in new and replace_measured(new, "new numbers") == new
    edited = replace_measured("# a card someone wrote\n", "numbers")
    assert edited.startswith("# a card someone wrote\n\n" + MEASURED_BEGIN) and edited.count(MEASURED_END) == 1


def test_a_built_in_base_is_named_by_its_hub_id_and_license():
    assert base_identity("smollm2-135m", None) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")


def test_the_renderer_imports_no_torch():
    code = "import sys, prunekit.io.model_card; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": "src"}).returncode == 0


# --- all or nothing ------------------------------------------------------------------------------------------------
def test_a_killed_save_leaves_no_card(tiny_checkpoint, tmp_path):
    """The card is written inside the temporary folder (with the recipe it shows) before the rename: at the
    `saving` pause it is there, hidden; after a SIGKILL there is no output and so no card."""
    ck, text = tiny_checkpoint
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = tmp_path / "paused"
    env = {**os.environ, "PRUNEKIT_CACHE": str(tmp_path / "cache"), "PRUNEKIT_PAUSE_AT": "saving",
           "PRUNEKIT_PAUSE_FILE": str(marker), "PYTHONPATH": str(Path("src").resolve())}
    argv = ["drop", ck, "--target", "attn", "--n", 1, *calib(text), "--out", run_dir / "out"]
    proc = subprocess.Popen([sys.executable, "-m", "prunekit", "-q", *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < 240, "the saving pause was never reached"
        time.sleep(0.05)
    (hidden,) = [p for p in run_dir.iterdir() if p.name.startswith(".out.tmp-")]
    assert (hidden / CARD_FILE).is_file() and RECIPE_FILE in (hidden / CARD_FILE).read_text()
    assert not (run_dir / "out").exists()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (run_dir / "out").exists()
    assert [p for p in run_dir.rglob(CARD_FILE) if not p.is_relative_to(hidden)] == []
