"""Hard stops, concurrent runs and bad input: no leaked files, no tracebacks, no checkpoint that fails to load.

Kills land at named pause points (`prunekit.faults`): the child process writes a marker file when it reaches
the point and waits there, so the signal arrives at a known moment, not after a sleep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import gguf_ready_checkpoint, tiny_model, tiny_tokenizer

from prunekit.cli import main
from prunekit.io.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _cli(tmp: Path, argv: list[str], *, pause: str | None = None) -> subprocess.Popen:
    (tmp / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "PRUNEKIT_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp / "tmp")}
    if pause:
        env.update(PRUNEKIT_PAUSE_AT=pause, PRUNEKIT_PAUSE_FILE=str(tmp / "paused"))
    # A test run started in the background (`make test &`) inherits an IGNORED SIGINT, and Python then never
    # installs its KeyboardInterrupt handler; the child gets the default disposition like a foreground run.
    return subprocess.Popen([sys.executable, "-m", "prunekit", "-q", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_pause(tmp: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    marker = tmp / "paused"
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, "the pause point was never reached"
        time.sleep(0.05)
    marker.unlink()


def _commands(ck: Path, text: Path, out: Path) -> dict[str, list]:
    calib = ["--calib", text, "--samples", 4, "--seq-len", 24, "--batch-size", 2]
    return {
        "score": ["score", ck, *calib, "--json", out],
        "drop": ["drop", ck, "--target", "attn", "--n", 1, *calib, "--out", out],
        "drop-stream": ["drop", ck, "--target", "attn", "--n", 1, *calib, "--stream", "--out", out],
        "width": ["width", ck, "--mlp-keep", 0.5, "--shots", 2, *calib, "--out", out],
        "width-stream": ["width", ck, "--mlp-keep", 0.5, "--shots", 2, *calib, "--stream", "--out", out],
        "heal": ["heal", ck, "--text", text, "--samples", 2, "--seq-len", 24, "--batch-size", 2, "--steps", 1,
                 "--out", out],
    }


def _result(out: Path):
    return json.loads(out.read_text()) if out.is_file() else _tensors(out)


def _same(a, b) -> bool:
    if isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
        return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    return a == b


FAST = [("drop", "saving", signal.SIGTERM), ("drop-stream", "saving", signal.SIGKILL),
        ("score", "scoring", signal.SIGINT)]
FULL = [(cmd, point, sig) for cmd in ("score", "drop", "drop-stream", "width", "width-stream", "heal")
        for point in ("scoring", "saving") for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
        if not (cmd == "score" and point == "saving") and not (cmd == "heal" and point == "scoring")]
SLOW = [c for c in FULL if c not in FAST]


def _kill_and_rerun(tiny_checkpoint, tmp_path, cmd, point, sig):
    ck, text = tiny_checkpoint
    out = tmp_path / "run" / ("out.json" if cmd == "score" else "out")
    out.parent.mkdir()
    argv = _commands(ck, text, out)[cmd]
    proc = _cli(tmp_path, argv, pause=point)
    _wait_for_pause(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert not out.exists()  # nothing half-written
    if sig != signal.SIGKILL:  # a handled stop cleans up on its way out, in one line
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), err[-2000:]
        assert _hidden(out.parent) == [] and "Traceback" not in err
    rerun = _cli(tmp_path, argv)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    assert _hidden(out.parent) == []  # a killed run's temporary siblings are gone after the next run
    ref_out = tmp_path / "ref" / out.name
    ref_out.parent.mkdir()
    ref = _cli(tmp_path, _commands(ck, text, ref_out)[cmd])
    assert ref.wait(timeout=600) == 0
    if cmd != "heal":  # heal's record holds its own timing; its weights are compared below
        assert _same(_result(out), _result(ref_out))
    else:
        assert _same(_tensors(out), _tensors(ref_out))


@pytest.mark.parametrize("cmd,point,sig", FAST, ids=[f"{c}-{p}-{s.name}" for c, p, s in FAST])
def test_killed_run_leaves_nothing_and_reruns(tiny_checkpoint, tmp_path, cmd, point, sig):
    _kill_and_rerun(tiny_checkpoint, tmp_path, cmd, point, sig)


@pytest.mark.slow
@pytest.mark.parametrize("cmd,point,sig", SLOW, ids=[f"{c}-{p}-{s.name}" for c, p, s in SLOW])
def test_killed_run_leaves_nothing_and_reruns_everywhere(tiny_checkpoint, tmp_path, cmd, point, sig):
    _kill_and_rerun(tiny_checkpoint, tmp_path, cmd, point, sig)


def _concurrent(tiny_checkpoint, tmp_path, cmd):
    ck, text = tiny_checkpoint
    outs = [tmp_path / f"o{i}" / ("out.json" if cmd.startswith("score") else "out") for i in range(2)]
    procs = []
    for out in outs:
        out.parent.mkdir()
        argv = _commands(ck, text, out)[cmd.removesuffix("-stream") if cmd == "score-stream" else cmd]
        procs.append(_cli(tmp_path, [*argv, "--stream"] if cmd == "score-stream" else argv))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert _same(_result(outs[0]), _result(outs[1]))


@pytest.mark.parametrize("cmd", ["score-stream"])
def test_two_concurrent_runs_both_succeed_alike(tiny_checkpoint, tmp_path, cmd):
    _concurrent(tiny_checkpoint, tmp_path, cmd)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", ["score", "drop", "drop-stream", "width", "width-stream"])
def test_two_concurrent_runs_of_every_command(tiny_checkpoint, tmp_path, cmd):
    _concurrent(tiny_checkpoint, tmp_path, cmd)


# --- bad input: exit 2, exactly one line, nothing written --------------------------------------------------------

def _bad_cases(ck: Path, text: Path, tmp: Path) -> dict[str, list]:
    (tmp / "a-dir").mkdir()
    (tmp / "a-file").write_text("x")
    notok = tmp / "no-tokenizer"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes((ck / f).read_bytes())
    j = tmp / "e.json"
    calib = ["--calib", text, "--samples", 2, "--seq-len", 24]
    return {
        "unknown task": ["eval", ck, "--tasks", "nosuchtask", "--json", j],
        "missing --task-dir": ["eval", ck, "--tasks", "mmlu", "--task-dir", tmp / "nope", "--json", j],
        "--batch-size 0": ["eval", ck, "--batch-size", 0, "--json", j],
        "--batch-size -1": ["eval", ck, "--batch-size", -1, "--json", j],
        "bench --context 0": ["bench", ck, "--context", 0],
        "bench --repeats 0": ["bench", ck, "--repeats", 0],
        "--device cuda:99": ["eval", ck, "--device", "cuda:99", "--json", j],
        "--device gpu": ["bench", ck, "--device", "gpu"],
        "score --json DIR": ["score", ck, *calib, "--json", tmp / "a-dir"],
        "unwritable --json": ["score", ck, *calib, "--json", tmp / "a-file" / "s.json"],
        "unwritable --out": ["drop", ck, "--target", "attn", "--n", 1, *calib, "--out", tmp / "a-file" / "o"],
        "compare missing model": ["compare", ck, tmp / "missing", "--out", tmp / "report"],
        "no tokenizer": ["eval", notok, "--json", j],
        "no such path": ["eval", tmp / "nope" / "model", "--json", j],
        "n too large": ["drop", ck, "--target", "attn", "--n", 4, *calib, "--out", tmp / "o"],
        "keep ratio > 1": ["width", ck, "--mlp-keep", 1.5, *calib, "--out", tmp / "o"],
        "heal --steps 0": ["heal", ck, "--steps", 0, "--out", tmp / "o"],
        "heal --save-every -1": ["heal", ck, "--save-every", -1, "--out", tmp / "o"],
        "heal --teacher-cache without --teacher": ["heal", ck, "--teacher-cache", "--out", tmp / "o"],
        "bad dtype": ["eval", ck, "--dtype", "float8", "--json", j],
        "unknown option": ["drop", ck, "--targte", "attn", "--out", tmp / "o"],
        "export over a file": ["export", ck, "--format", "gguf", "--out", tmp / "a-file"],
        "export into a file's folder": ["export", ck, "--format", "nemotron-nas", "--out", tmp / "a-file" / "x"],
        "compress budget > 1": ["compress", ck, "--budget", "params=1.5", *calib, "--out", tmp / "o"],
        "compress unknown budget key": ["compress", ck, "--budget", "flops=0.5", *calib, "--out", tmp / "o"],
        "compress impossible budget": ["compress", ck, "--budget", "params=0.05", *calib, "--out", tmp / "o"],
        "compress budget without =": ["compress", ck, "--budget", "0.8", *calib, "--out", tmp / "o"],
    }


BAD = sorted([
    "unknown task", "missing --task-dir", "--batch-size 0", "--batch-size -1", "bench --context 0",
    "bench --repeats 0", "--device cuda:99", "--device gpu", "score --json DIR", "unwritable --json",
    "unwritable --out", "compare missing model", "no tokenizer", "no such path", "n too large", "keep ratio > 1",
    "heal --steps 0", "heal --save-every -1", "heal --teacher-cache without --teacher", "bad dtype", "unknown option", "export over a file", "export into a file's folder",
    "compress budget > 1", "compress unknown budget key", "compress impossible budget", "compress budget without ="])


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_checkpoint, tmp_path, capsys, case):
    ck, text = tiny_checkpoint
    work = tmp_path / "work"
    work.mkdir()
    argv = _bad_cases(ck, text, work)[case]
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    assert main(["-q", *map(str, argv)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: "), captured.err
    assert captured.out == ""
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # nothing written, no temp files


def test_partial_drop_of_a_model_with_its_own_remote_code_loads_with_plain_transformers(tmp_path):
    """A source config naming remote code (auto_map) must not leave entries whose .py files are not carried."""
    from transformers import AutoModelForCausalLM

    src = save_checkpoint(tiny_model("llama"), tiny_tokenizer(), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                       "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["pruning keeps what matters"] * 400))
    for argv, out in ((["--target", "attn", "--n", 1], tmp_path / "partial"), (["--target", "block", "--n", 1],
                                                                            tmp_path / "blocks")):
        assert main(["-q", "drop", str(src), *map(str, argv), "--calib", str(text), "--samples", "2", "--seq-len",
                     "24", "--no-cache", "--out", str(out)]) == 0
        saved = json.loads((out / "config.json").read_text())
        assert all(v.startswith("modeling_prunekit.") for v in saved.get("auto_map", {}).values())
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


def test_outputs_follow_the_umask(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    old = os.umask(0o022)
    try:
        assert main(["-q", "score", str(ck), "--calib", str(text), "--samples", "2", "--seq-len", "24",
                     "--json", str(tmp_path / "s.json")]) == 0
        assert main(["-q", "drop", str(ck), "--target", "attn", "--n", "1", "--calib", str(text), "--samples", "2",
                     "--seq-len", "24", "--out", str(tmp_path / "d")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "s.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def _scratch_commands(ck: Path, text: Path, tmp: Path) -> dict[str, tuple[list, Path]]:
    """A command that reaches each scratch folder, and the folder its scratch lives in."""
    from prunekit.evaluation.user_tasks import make_jsonl_task

    calib = ["--calib", text, "--samples", 4, "--seq-len", 24, "--batch-size", 2]
    temp_root = tmp / "tmp" / f"prunekit-{os.getuid()}"
    quiz = tmp / "quiz.jsonl"
    quiz.write_text("\n".join(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2})
                              for i in range(4)) + "\n")
    make_jsonl_task("quiz", quiz, tmp / "tasks")
    return {
        "compress": (["compress", ck, "--budget", "params=0.8", *calib, "--out", tmp / "run" / "out"], temp_root),
        "tok": (["export", gguf_ready_checkpoint(tmp / "gguf-ready"), "--format", "gguf", "--quant", "f32", "--out", tmp / "run" / "out.gguf"], temp_root),
        "tasks": (["eval", ck, "--text", text, "--windows", 1, "--window-len", 32, "--tasks", "quiz", "--task-dir",
                   tmp / "tasks", "--limit", 2, "--json", tmp / "run" / "out.json"], temp_root),
        "loss": (["drop", ck, "--target", "attn", "--n", 1, *calib, "--criterion", "loss", "--stream",
                  "--offload-dir", tmp / "offload", "--out", tmp / "run" / "out"], tmp / "offload"),
    }


@pytest.mark.parametrize("what", ["compress", "tok", "tasks", "loss"])
def test_scratch_left_by_a_killed_run_is_gone_after_the_next(tiny_checkpoint, tmp_path, what):
    """SIGKILL while a scratch folder exists (nothing can clean up), then the same command again: it succeeds
    and leaves neither its own scratch nor the killed run's."""
    ck, text = tiny_checkpoint
    (tmp_path / "run").mkdir()
    argv, where = _scratch_commands(ck, text, tmp_path)[what]
    proc = _cli(tmp_path, argv, pause=f"scratch-{what}")
    _wait_for_pause(tmp_path, proc)
    assert [p.name.split("-")[1] for p in where.iterdir()] == [what]  # the killed run's scratch is there
    proc.kill()
    proc.communicate(timeout=60)
    rerun = _cli(tmp_path, argv)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    assert list(where.iterdir()) == []
    assert _hidden(tmp_path / "run") == []


def test_zero_shot_eval_writes_nothing_outside_the_cache(tiny_checkpoint, tmp_path):
    """`eval --tasks` keeps what `datasets` prepares under $PRUNEKIT_CACHE (not ~/.cache/huggingface) and prints
    no git noise from lm-eval."""
    ck, text = tiny_checkpoint
    argv, _ = _scratch_commands(ck, text, tmp_path)["tasks"]
    (tmp_path / "run").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HOME", "HF_DATASETS", "XDG_CACHE"))}
    env.update(HOME=str(home), PRUNEKIT_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "prunekit", "-q", *map(str, argv)], env=env, cwd=home,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fatal" not in proc.stderr
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
    assert (tmp_path / "cache" / "datasets").is_dir()


def test_a_killed_recipe_leaves_no_scratch_stage_after_the_next_run(tiny_checkpoint, tmp_path):
    """SIGKILL while the first stage saves into the recipe's scratch folder (a hidden sibling of the final
    output), then the same recipe again: it succeeds and nothing hidden is left beside the output."""
    ck, text = tiny_checkpoint
    (tmp_path / "run").mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"stages": [
        {"command": "drop", "options": {"model": str(ck), "target": "attn", "n": 1, "calib": str(text),
                                        "samples": 4, "seq_len": 24, "batch_size": 2}},
        {"command": "heal", "options": {"text": str(text), "samples": 2, "seq_len": 24, "batch_size": 2,
                                        "steps": 1}}]}))
    argv = ["run", recipe, "--out", tmp_path / "run" / "out"]
    proc = _cli(tmp_path, argv, pause="saving")
    _wait_for_pause(tmp_path, proc)
    assert _hidden(tmp_path / "run")  # the scratch stage folder is there
    proc.kill()
    proc.communicate(timeout=60)
    rerun = _cli(tmp_path, argv)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    assert _hidden(tmp_path / "run") == [] and (tmp_path / "run" / "out" / "prunekit_recipe.yaml").is_file()
