"""Typed options and recipes: every option is a flag and every flag an option, bad values are one error naming
the flag, every checkpoint keeps the recipe that made it, and running that recipe again makes the same bytes."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import gguf_ready_checkpoint

from prunekit.cli import build_parser, main
from prunekit.errors import OptionError
from prunekit.jobs.recipe import RECIPE_FILE, Recipe, run_recipe
from prunekit.jobs.stages import STAGES
from prunekit.options import COMMANDS, CompressOptions, DropOptions, HealOptions, flag_of

pytestmark = pytest.mark.usefixtures("isolated_cache")
OUTPUT_FLAGS = {"--out", "--json", "--force", "--quiet", "--help"}


def run(*argv: object) -> int:
    return main(["-q", *map(str, argv)])


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_a_flag_and_every_flag_an_option(command):
    cls = COMMANDS[command]
    parser = _subparser(command)
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    positionals = {a.dest for a in parser._actions if not a.option_strings}
    wanted = set()
    for f in fields(cls):
        meta = f.metadata["opt"]
        if meta["kind"] == "positional":
            assert f.name in positionals
        elif meta["kind"] == "choice_flags":
            wanted |= set(meta["flags"])
        elif meta["kind"] == "optional_bool":
            wanted |= {flag_of(cls, f.name), "--no-" + flag_of(cls, f.name)[2:]}
        else:
            wanted.add(flag_of(cls, f.name))
    assert flags - OUTPUT_FLAGS == wanted
    defaults = parser.parse_args([*(["x"] if positionals else []), *_required(cls)])
    assert cls(**{f.name: getattr(defaults, f.name) for f in fields(cls)}) is not None


def _required(cls) -> list[str]:
    given = {"target": "attn", "n": "1", "budget": "params=0.8", "format": "gguf", "mlp_keep": "0.5"}
    out = [a for f in fields(cls) if f.name in given for a in (flag_of(cls, f.name), given[f.name])]
    if cls.command in ("score", "eval"):
        return [*out, "--json", "x.json"]
    return out if cls.command == "bench" else [*out, "--out", "o"]


def test_library_defaults_match_the_options():
    from prunekit.compress import DEFAULT_PROBE_SAMPLES, DEFAULT_SAMPLES

    opts = CompressOptions(model="m", budget="params=0.8")
    assert (opts.samples, opts.probe_samples) == (DEFAULT_SAMPLES, DEFAULT_PROBE_SAMPLES)


@pytest.mark.parametrize("data,flag", [
    ({"model": "m", "target": "attn", "n": 0}, "--n"),
    ({"model": "m", "target": "nope", "n": 1}, "--target"),
    ({"model": "m", "target": "attn", "n": "2"}, "--n"),
    ({"model": "m", "target": "attn", "n": True}, "--n"),
    ({"model": "m", "target": "attn", "n": 1, "samples": 0}, "--samples"),
    ({"model": "m", "target": "attn", "n": 1, "stream": "yes"}, "--stream"),
    ({"target": "attn", "n": 1}, "model"),
    ({"model": "m", "target": "attn", "n": 1, "sampels": 4}, "sampels"),
])
def test_a_bad_option_is_one_error_naming_it(data, flag):
    with pytest.raises(OptionError, match=flag):
        DropOptions.from_dict(data)


def test_recipe_yaml_round_trip():
    recipe = Recipe.from_data({"stages": [
        {"command": "compress", "options": {"model": "m", "budget": "params=0.8"}},
        {"command": "heal", "options": {"steps": 3}, "out": "healed"},
        {"command": "export", "options": {"format": "gguf"}}]}, "r")
    again = Recipe.from_data(__import__("yaml").safe_load(recipe.to_yaml()), "r")
    assert again == recipe
    assert again.stages[1].options == HealOptions(model="@previous", steps=3)


@pytest.mark.parametrize("stages,match", [
    ([{"command": "nope"}], "unknown command"),
    ([{"command": "heal", "options": {"model": "@previous"}}], "no previous stage"),
    ([{"command": "export", "options": {"model": "m", "format": "gguf"}}, {"command": "heal"}],
     "no stage before it writes one"),
    ([{"command": "drop", "options": {"model": "m", "target": "attn", "n": 1}, "outt": "x"}], "unknown key"),
])
def test_a_bad_recipe_is_refused_before_any_work(tmp_path, stages, match):
    with pytest.raises(OptionError, match=match):
        run_recipe(Recipe.from_data({"stages": stages}, "r"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_recipe_of_several_stages_is_refused_under_torchrun(tmp_path, monkeypatch):
    """Only rank 0 writes a stage's checkpoint, so the next stage could not start on the other ranks: refused
    with one error before any work (a one-stage recipe, like every CLI command, runs data parallel)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    stages = [{"command": "drop", "options": {"model": "m", "target": "attn", "n": 1}},
              {"command": "heal", "options": {"model": "@previous"}}]
    with pytest.raises(OptionError, match="one stage per command"):
        run_recipe(Recipe.from_data({"stages": stages}, "r"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".gguf"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_every_checkpoint_keeps_its_recipe_and_the_recipe_makes_it_again(tiny_checkpoint, tmp_path, capsys):
    ck, text = tiny_checkpoint
    out = tmp_path / "dropped"
    assert run("drop", ck, "--target", "attn", "--n", 2, "--calib", text, "--samples", 4, "--seq-len", 24,
               "--out", out) == 0
    recipe = Recipe.load(out / RECIPE_FILE)
    assert recipe.stages[0].options == DropOptions(model=str(ck.resolve()), target="attn", n=2, calib=str(text),
                                                   samples=4, seq_len=24)
    capsys.readouterr()
    assert run("run", out / RECIPE_FILE, "--out", tmp_path / "again") == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["dropped"]
    assert _digest(out) == _digest(tmp_path / "again") and _digest(out)
    assert (tmp_path / "again" / RECIPE_FILE).read_text() == (out / RECIPE_FILE).read_text()


def test_compress_heal_export_recipe_reproduces_bit_for_bit(tiny_checkpoint, tmp_path):
    _, text = tiny_checkpoint
    base = gguf_ready_checkpoint(tmp_path / "base")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
stages:
- command: compress
  options: {{model: {base}, budget: params=0.85, multiple_of: 16, calib: {text}, samples: 8, seq_len: 24}}
- command: heal
  options: {{text: {text}, samples: 4, seq_len: 24, batch_size: 2, steps: 2, lr: 0.01}}
  out: {tmp_path / "healed"}
- command: export
  options: {{format: gguf, quant: f32}}
""")
    assert run("run", recipe, "--out", tmp_path / "a.gguf") == 0
    saved = Recipe.load(tmp_path / "healed" / RECIPE_FILE)
    assert [s.command for s in saved.stages] == ["compress", "heal"]
    assert saved.stages[1].options.model == "@previous"
    assert run("run", tmp_path / "healed" / RECIPE_FILE, "--out", tmp_path / "healed-again") == 0
    assert _digest(tmp_path / "healed") == _digest(tmp_path / "healed-again")
    (tmp_path / "healed").rename(tmp_path / "healed-first")
    assert run("run", recipe, "--out", tmp_path / "b.gguf") == 0
    assert _digest(tmp_path / "a.gguf")["a.gguf"] == _digest(tmp_path / "b.gguf")["b.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # scratch stage removed


def test_stage_commands_are_the_cli_commands():
    parser_commands = set(next(a for a in build_parser()._actions
                               if isinstance(a, argparse._SubParsersAction)).choices)
    assert set(STAGES) <= parser_commands


def test_a_plan_with_edited_weights_says_so_and_is_not_applied_as_if_it_rebuilt_them(tiny_checkpoint, tmp_path):
    from conftest import tiny_model

    from prunekit.adapters import get_adapter
    from prunekit.errors import PlanError
    from prunekit.plans import DropTarget, PruningPlan
    from prunekit.surgery import apply_plan

    plain = PruningPlan(dropped=[DropTarget(1, "attn")], method="llm-drop/attn")
    healed = PruningPlan(dropped=[DropTarget(1, "attn")], method="llm-drop/attn", recovery=[{"steps": 1}])
    compressed = PruningPlan(dropped=[DropTarget(1, "attn")], method="compress")
    assert plain.weight_edits() == [] and "weight_edits" not in plain.to_json()
    assert healed.to_json()["weight_edits"] == ["healing"]
    assert compressed.weight_edits() == ["compress's refitted projections"]
    for plan in (healed, compressed):
        with pytest.raises(PlanError, match="prunekit_recipe.yaml"):
            apply_plan(get_adapter(tiny_model("llama")), PruningPlan.from_json(plan.to_json()))
    a, b = tiny_model("llama"), tiny_model("llama")
    apply_plan(get_adapter(a), plain)
    apply_plan(get_adapter(b), healed, structure_only=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
@pytest.mark.real
def test_real_compress_and_heal_recipe_reproduces_bit_for_bit(tmp_path):
    """SmolLM2-135M: compress (small calibration) then a short heal, run as a recipe, then the saved recipe run
    again into another folder: the same weights, byte for byte."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("""
stages:
- command: compress
  options: {model: smollm2-135m, budget: params=0.9, rounds: 1, samples: 8, seq_len: 128, batch_size: 4}
- command: heal
  options: {text: c4, samples: 8, seq_len: 128, batch_size: 2, steps: 4}
""")
    assert run("run", recipe, "--out", tmp_path / "a") == 0
    assert run("run", tmp_path / "a" / RECIPE_FILE, "--out", tmp_path / "b") == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") and _digest(tmp_path / "a")
