"""benchmarks/gpu_check.py at toy size on the CPU: the whole check runs (the CPU against itself, so float32
compares exactly equal), writes its one JSON and prints its table, so the script is ready when a GPU is."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))  # the script sets its own; restored after
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_every_section_on_the_cpu_at_toy_size(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--sizes", "tiny", "--out", str(out), "--budget-s", "300"]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["versions"]["torch"] and result["meta"]["device"] == "cpu"
    tiny = result["correctness"]["tiny"]
    for key in ("cpu/float32", "device/float32", "device/bfloat16"):
        assert {k for k, v in tiny["runs"][key].items() if v["ok"]} == {
            "score", "drop", "width", "compress", "heal", "eval", "bench"}, key
    f32 = tiny["compare"]["float32"]
    assert f32["score"]["max_abs_diff"] == 0 and f32["eval"]["rel_diff"] == 0 and f32["heal"]["max_rel_diff"] == 0
    assert all(v["same_plan"] for k, v in f32.items() if k in ("drop", "width", "compress"))
    assert tiny["pass"], tiny["compare"]
    scale = result["scale"]
    assert scale["size"] == "tiny"
    for item in ("build_in_memory", "scoring_cost", "speed", "write_checkpoint", "streamed_scoring", "compress"):
        assert scale[item]["ok"], (item, scale[item])
    assert scale["streamed_scoring"]["peak_bytes"] > 0 and scale["compress"]["peak_bytes"] > 0
    assert scale["speed"]["n"] == 2 and len(scale["speed"]["dropped"]) == 2
    table = capsys.readouterr().out
    assert "correct tiny" in table and "streamed_scoring" in table and "FAILED" not in table


def test_a_failing_step_is_recorded_and_the_next_still_runs(gpu_check):
    clock = gpu_check.Clock(60)
    rec: dict = {}

    def fails() -> dict:
        raise RuntimeError("CUDA out of memory")

    assert gpu_check.guarded(rec, "a", clock, fails) is None
    assert gpu_check.guarded(rec, "b", clock, lambda: {"x": 1})["x"] == 1
    assert rec["a"]["ok"] is False and "CUDA out of memory" in rec["a"]["error"] and rec["b"]["ok"] is True
    spent = gpu_check.Clock(0)
    assert gpu_check.guarded(rec, "c", spent, lambda: {"x": 1}) is None
    assert "SectionTimeout" in rec["c"]["error"]


def test_a_different_plan_on_the_device_is_a_failure(gpu_check):
    ref = {"drop": {"ok": True, "dropped": ["attn@1"], "widths": {}},
           "eval": {"ok": True, "perplexity": 100.0}}
    got = {"drop": {"ok": True, "dropped": ["attn@2"], "widths": {}},
           "eval": {"ok": True, "perplexity": 100.05}}
    out = gpu_check.compare(ref, got, bf16=False)
    assert out["drop"] == {"same_plan": False, "pass": False}
    assert out["eval"]["pass"] is True and out["eval"]["rel_diff"] == pytest.approx(5e-4)
    assert gpu_check.compare(ref, {**got, "eval": {"ok": False}}, bf16=False)["eval"]["pass"] is False
