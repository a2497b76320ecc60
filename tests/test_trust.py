"""Nothing lost, nothing run that the user did not ask for: no file prunekit reads runs code, no input is
overwritten, outputs are published only as they were checked, and every refusal is one line with exit code 2
that leaves nothing behind."""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
from pathlib import Path

import pytest
from conftest import tiny_model, tiny_tokenizer

from prunekit.cli import main
from prunekit.errors import CheckpointError, MemoryLimitError, RecoveryError
from prunekit.io.checkpoint import save_checkpoint
from prunekit.io.outputs import atomic_dir, atomic_file, prepare_output, rename_noreplace, scratch_dir
from prunekit.recovery.state import STATE_FILE, load_state

pytestmark = pytest.mark.usefixtures("isolated_cache")
SRC = Path(__file__).resolve().parents[1] / "src" / "prunekit"


def run(*argv: object) -> int:
    return main(["-q", *map(str, argv)])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunekit: error: "), err
    return err[0]


def calib(text: Path) -> list[object]:
    return ["--calib", text, "--samples", 4, "--seq-len", 24, "--batch-size", 2]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


# --- 1. no unpickling of what a user's folder holds ------------------------------------------------------------
class _Planted:
    """A pickle that writes a marker file when it is unpickled, standing in for `os.system(...)`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def _plant(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / STATE_FILE, "wb") as f:
        pickle.dump({"key": _Planted(marker)}, f)


def test_a_planted_training_state_never_runs(tmp_path):
    marker = tmp_path / "ran"
    _plant(tmp_path / "state", marker)
    with pytest.raises(RecoveryError, match="cannot read the training state"):
        load_state(tmp_path / "state", "key")
    assert not marker.exists()


def test_heal_refuses_a_planted_state_without_running_it(tiny_checkpoint, tmp_path, capsys):
    ck, text = tiny_checkpoint
    out, marker = tmp_path / "out", tmp_path / "ran"
    _plant(tmp_path / "out.heal-state", marker)
    assert run("heal", ck, "--text", text, "--samples", 2, "--seq-len", 24, "--batch-size", 1, "--steps", 2,
               "--save-every", 1, "--out", out) == 2
    assert "training state" in one_error_line(capsys)
    assert not marker.exists() and not out.exists()


def test_no_unrestricted_unpickling_anywhere():
    """Every `torch.load` in prunekit passes `weights_only=True`, and nothing calls pickle at all."""
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        assert not re.search(r"\bpickle\.loads?\(|\bjoblib\.|allow_pickle\s*=\s*True", text), f
        for m in re.finditer(r"torch\.load\(", text):
            call = _call_text(text, m.end())
            assert "weights_only=True" in call, (f, call)


def _call_text(text: str, start: int) -> str:
    """The arguments of the call whose "(" ends just before `start`."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


# --- 2. --json never replaces a file without --force -------------------------------------------------------------
def test_json_output_is_not_overwritten_without_force(tiny_checkpoint, tmp_path, capsys):
    ck, text = tiny_checkpoint
    out = tmp_path / "scores.json"
    out.write_text("precious")
    assert run("score", ck, *calib(text), "--json", out) == 2
    assert "exists; pass --force" in one_error_line(capsys)
    assert out.read_text() == "precious"
    assert run("score", ck, *calib(text), "--json", out, "--force") == 0
    assert json.loads(out.read_text())["layers"]


def test_json_output_inside_the_model_is_refused_even_with_force(tiny_checkpoint, capsys):
    ck, text = tiny_checkpoint
    before = (ck / "config.json").read_text()
    assert run("score", ck, *calib(text), "--json", ck / "config.json", "--force") == 2
    assert "inside" in one_error_line(capsys)
    assert (ck / "config.json").read_text() == before


# --- 3. an output is never an input, inside one, or around one ---------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside", "around", "cache", "text"])
def test_an_output_that_overlaps_an_input_is_refused(tiny_checkpoint, tmp_path, isolated_cache, capsys, where):
    ck, text = tiny_checkpoint
    out = {"same": ck, "inside": ck / "sub", "around": ck.parent, "cache": isolated_cache / "models" / "x",
           "text": text}[where]
    before = snapshot(ck.parent)
    assert run("drop", ck, "--target", "attn", "--n", 1, *calib(text), "--out", out, "--force") == 2
    line = one_error_line(capsys)
    assert "this run reads" in line or "is an input" in line
    assert snapshot(ck.parent) == before  # nothing written, created or removed


def test_saving_a_model_over_the_folder_it_was_loaded_from_is_refused(tiny_checkpoint):
    from prunekit.io.checkpoint import load_model

    ck, _ = tiny_checkpoint
    model, tok = load_model(ck)
    with pytest.raises(CheckpointError, match="is an input"):
        save_checkpoint(model, tok, ck, force=True)


# --- 5. a target that appeared (or changed) while the run worked is never replaced ---------------------------------
def test_an_output_created_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    target = prepare_output(out, force=False)
    out.mkdir()  # another run published first
    (out / "theirs").write_text("theirs")
    with pytest.raises(CheckpointError, match="was created by someone else"):
        with atomic_dir(target) as tmp:
            (tmp / "ours").write_text("ours")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left


def test_an_output_replaced_meanwhile_is_not_replaced_again(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("old")
    target = prepare_output(out, force=True, kind="file")
    out.unlink()
    out.write_text("another run's")
    with pytest.raises(CheckpointError, match="was replaced or changed"):
        with atomic_file(target) as tmp:
            tmp.write_text("ours")
    assert out.read_text() == "another run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_forced_output_unchanged_since_the_check_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    target = prepare_output(out, force=True)
    with atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_rename_noreplace_never_replaces_an_empty_folder(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()  # os.rename would silently replace an empty folder
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "src").is_dir()


# --- 7. heal removes only the state it wrote -----------------------------------------------------------------------
def _heal_beside_a_user_file(tiny_checkpoint, tmp_path: Path, *extra: object) -> Path:
    """Heal into `out` while `out.heal-state/` already holds a file of the user's; returns that folder."""
    ck, text = tiny_checkpoint
    state = tmp_path / "out.heal-state"
    state.mkdir()
    (state / "notes.txt").write_text("mine")
    assert run("heal", ck, "--text", text, "--samples", 2, "--seq-len", 24, "--batch-size", 1, *extra,
               "--out", tmp_path / "out") == 0
    return state


def test_heal_without_save_every_leaves_an_existing_state_folder_alone(tiny_checkpoint, tmp_path):
    state = _heal_beside_a_user_file(tiny_checkpoint, tmp_path, "--steps", 1)
    assert (state / "notes.txt").read_text() == "mine"


def test_heal_with_save_every_removes_its_state_but_not_other_files(tiny_checkpoint, tmp_path):
    state = _heal_beside_a_user_file(tiny_checkpoint, tmp_path, "--steps", 2, "--save-every", 1)
    assert sorted(p.name for p in state.iterdir()) == ["notes.txt"]


# --- 8. refused runs leave nothing -----------------------------------------------------------------------------------
def test_a_refused_run_creates_no_parent_folders(tiny_checkpoint, tmp_path, capsys):
    ck, text = tiny_checkpoint
    assert run("drop", ck, "--target", "attn", "--n", 99, *calib(text), "--out", tmp_path / "a" / "b" / "out") == 2
    one_error_line(capsys)
    assert not (tmp_path / "a").exists()
    assert run("score", ck, "--calib", tmp_path / "missing.txt", "--json", tmp_path / "c" / "d" / "s.json") == 2
    one_error_line(capsys)
    assert not (tmp_path / "c").exists()


def test_output_parent_folders_are_made_when_publishing(tiny_checkpoint, tmp_path):
    ck, text = tiny_checkpoint
    out = tmp_path / "a" / "b" / "scores.json"
    assert run("score", ck, *calib(text), "--json", out) == 0
    assert json.loads(out.read_text())["layers"]


def test_demo_refuses_impossible_drops_before_any_work(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import prunekit.demo

    ck, _ = tiny_checkpoint
    monkeypatch.setattr(prunekit.demo, "score_model", lambda *a, **k: pytest.fail("scored before refusing"))
    out = tmp_path / "demo"
    assert run("demo", "--model", ck, "--drops", 99, "--out", out) == 2
    assert "cannot drop 99" in one_error_line(capsys)
    assert not out.exists()
    assert run("demo", "--model", ck, "--drops", "x", "--out", out) == 2
    assert "--drops" in one_error_line(capsys)


def test_scratch_folders_are_removed_and_stale_ones_cleaned(tmp_path):
    dead = tmp_path / "prunekit-tok-999999999-abc"  # a pid no process has
    dead.mkdir()
    live = tmp_path / f"prunekit-tok-{os.getpid()}-abc"
    live.mkdir()
    with scratch_dir("tok", tmp_path) as d:
        assert d.parent == tmp_path and d.is_dir()
        assert not dead.exists() and live.exists()  # a running process's folder is left alone
    assert not d.exists()


# --- 9. out of memory is one line ------------------------------------------------------------------------------------
def test_an_unmappable_weight_file_is_one_clear_error(tiny_checkpoint, monkeypatch):
    import prunekit.io.files as files

    ck, _ = tiny_checkpoint

    def fail(*a, **k):
        raise RuntimeError("unable to mmap 538090408 bytes from file <x>: Cannot allocate memory (12)")

    monkeypatch.setattr(files, "safe_open", fail)
    with pytest.raises(MemoryLimitError, match=r"not enough memory to map .*model.safetensors \(0\.00 GiB\)"):
        files.CheckpointFiles(ck)


def test_out_of_memory_anywhere_is_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import prunekit.jobs.drop

    ck, text = tiny_checkpoint

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 4294967296 bytes.\nsecond line")

    monkeypatch.setattr(prunekit.jobs.drop, "drop_job", oom)
    assert run("drop", ck, "--target", "attn", "--n", 1, *calib(text), "--out", tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "out of memory" in line and "4294967296 bytes" in line and "available" in line


# --- 10. file modes follow the umask ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_checkpoint_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = save_checkpoint(tiny_model("llama"), tiny_tokenizer(), tmp_path / "ck")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~mask for p in files}


# --- 11. early and clear checks ---------------------------------------------------------------------------------------
def test_bench_refuses_a_context_beyond_the_model_positions(tiny_checkpoint, capsys):
    ck, _ = tiny_checkpoint
    assert run("bench", ck, "--context", 100000) == 2
    assert "positions, but the model has 512" in one_error_line(capsys)


def test_an_empty_output_path_is_refused(tiny_checkpoint, capsys):
    ck, text = tiny_checkpoint
    assert run("drop", ck, "--target", "attn", "--n", 1, *calib(text), "--out", "") == 2
    assert "output path is empty" in one_error_line(capsys)


def test_an_unknown_model_name_is_one_line(tmp_path, capsys):
    assert run("eval", "no-such-model-anywhere", "--json", tmp_path / "e.json") == 2
    assert "no-such-model-anywhere" in one_error_line(capsys)


@pytest.mark.parametrize("weight_map", [[], {"a": "../outside.safetensors"}, {"a": 3}])
def test_a_corrupt_shard_index_is_one_clear_error(tmp_path, weight_map):
    from prunekit.io.files import INDEX_FILE, read_index

    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="is corrupt"):
        read_index(tmp_path)


def test_demo_writes_its_folder_all_at_once_and_replaces_it_only_with_force(tiny_checkpoint, tmp_path, capsys):
    ck, text = tiny_checkpoint
    out = tmp_path / "demo"
    argv = ["demo", "--model", ck, "--calib", text, "--text", text, "--samples", 4, "--seq-len", 32, "--windows", 1,
            "--window-len", 32, "--drops", 1, "--out", out]
    assert run(*argv) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(out / "report.md")
    assert {"report.md", "results.json", "scores.json", "similarity.png", "attn-drop-1"} <= {p.name for p in
                                                                                             out.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert run(*argv) == 2
    assert "exists; pass --force" in one_error_line(capsys)
    assert run(*argv, "--force") == 0
