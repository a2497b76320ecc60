"""The command line contract: commands, options, JSON keys, files written, and clean failures."""

from __future__ import annotations

import json

import pytest

from prunekit.cli import main
from prunekit.io.checkpoint import load_model
from prunekit.io.files import tensor_bytes
from prunekit.plans import PLAN_FILE

pytestmark = pytest.mark.usefixtures("isolated_cache")


def run(*argv: str) -> int:
    return main(["-q", *map(str, argv)])


def test_score_json_contract(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    out = tmp_path / "scores.json"
    assert run("score", ck, "--calib", text, "--samples", 4, "--seq-len", 32, "--json", out) == 0
    data = json.loads(out.read_text())
    assert [r["index"] for r in data["layers"]] == [0, 1, 2, 3]
    assert set(data["layers"][0]) == {"index", "block", "attn", "mlp"}
    assert all(-1.0 <= r[k] <= 1.0 for r in data["layers"] for k in ("block", "attn", "mlp"))
    assert data["calibration"]["tokens"] == 4 * 32


def test_calibration_from_several_texts_reaches_the_plan(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    out = tmp_path / "scores.json"
    assert run("score", ck, "--calib", f"{text}:1,{text}:1", "--samples", 4, "--seq-len", 32, "--json", out) == 0
    assert json.loads(out.read_text())["calibration"]["source"] == str(text)  # one text named twice: merged
    assert run("score", ck, "--calib", f"{text}:0", "--samples", 4, "--seq-len", 32, "--json", out) == 2


def test_drop_writes_checkpoint_plan_and_eval_reports_smaller_model(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    out = tmp_path / "dropped"
    assert run("drop", ck, "--target", "attn", "--n", 2, "--calib", text, "--samples", 4, "--seq-len", 32,
               "--out", out) == 0
    plan = json.loads((out / PLAN_FILE).read_text())
    assert len(plan["dropped"]) == 2 and all(d["module"] == "attn" for d in plan["dropped"])
    assert set(plan["dropped"][0]) == {"layer", "module"}
    assert plan["calibration"]["sha256"] and plan["scores"]["layers"]
    assert (out / "tokenizer.json").is_file() and (out / "modeling_prunekit.py").is_file()
    dense_eval, pruned_eval = tmp_path / "d.json", tmp_path / "p.json"
    assert run("eval", ck, "--text", text, "--windows", 2, "--window-len", 64, "--json", dense_eval) == 0
    assert run("eval", out, "--text", text, "--windows", 2, "--window-len", 64, "--json", pruned_eval) == 0
    d, p = json.loads(dense_eval.read_text()), json.loads(pruned_eval.read_text())
    assert {"perplexity", "params", "kv_bytes_per_token"} <= set(p)
    # 2 of 4 attention layers gone: half the KV cache; params fall by exactly the removed attention weights
    assert p["kv_bytes_per_token"] * 2 == d["kv_bytes_per_token"]
    dense, _ = load_model(ck, tokenizer=False)
    attn = sum(x.numel() for x in dense.model.layers[0].self_attn.parameters())
    norm = dense.model.layers[0].input_layernorm.weight.numel()
    assert d["params"] - p["params"] == 2 * (attn + norm)
    assert tensor_bytes(ck) - tensor_bytes(out) == 2 * (attn + norm) * 4


def test_drop_iterative_and_consecutive(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    assert run("drop", ck, "--target", "block", "--n", 2, "--consecutive", "--calib", text, "--samples", 2,
               "--seq-len", 32, "--out", tmp_path / "c") == 0
    layers = [d["layer"] for d in json.loads((tmp_path / "c" / PLAN_FILE).read_text())["dropped"]]
    assert layers[1] == layers[0] + 1
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and "auto_map" not in cfg
    assert run("drop", ck, "--target", "joint", "--n", 3, "--iterative", "--calib", text, "--samples", 2,
               "--seq-len", 32, "--out", tmp_path / "i") == 0
    assert len(json.loads((tmp_path / "i" / PLAN_FILE).read_text())["history"]) == 3


@pytest.mark.parametrize("argv,message", [
    (["--target", "attn", "--n", "4"], "at most 3"),
    (["--target", "attn", "--n", "1", "--samples", "500"], "tokens but"),
])
def test_bad_input_fails_cleanly_without_output(tiny_checkpoint, tmp_path, capsys, argv, message):
    ck, text = tiny_checkpoint
    out = tmp_path / "never"
    code = run("drop", ck, *argv, "--calib", text, "--seq-len", 32, "--out", out)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_existing_output_needs_force(tiny_checkpoint, tmp_path, capsys):
    ck, text = tiny_checkpoint
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["drop", ck, "--target", "mlp", "--n", 1, "--calib", text, "--samples", 2, "--seq-len", 32, "--out", out]
    assert run(*args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert run(*args, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / PLAN_FILE).is_file()


def test_unknown_model_and_text(tmp_path, capsys):
    assert run("eval", tmp_path / "nope", "--json", tmp_path / "x.json") == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_module_entry_point_help():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "prunekit", "drop", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for opt in ("--target", "--n", "--consecutive", "--iterative", "--calib", "--samples", "--seq-len", "--out",
                "--force"):
        assert opt in proc.stdout


def test_unknown_task_is_one_line_before_any_work(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """`prunekit eval MODEL --tasks nosuchtask`: one line, exit 2, checked before the model is loaded."""
    import prunekit.io.checkpoint as checkpoint

    ck, _ = tiny_checkpoint
    monkeypatch.setattr(checkpoint, "load_model", None)  # loading would fail loudly
    assert run("eval", ck, "--tasks", "nosuchtask", "--json", tmp_path / "e.json") == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunekit: error: unknown task(s) nosuchtask; built-in tasks: ")
    assert "mmlu" in err[0] and captured.out == "" and not list(tmp_path.glob("*e.json*"))


def test_top_level_api_names_resolve():
    import prunekit

    for name in prunekit.__all__:
        assert getattr(prunekit, name) is not None, name
    assert issubclass(prunekit.PrunekitError, Exception)
    with pytest.raises(AttributeError):
        prunekit.no_such_name  # noqa: B018
