"""The docs cannot drift from the code or the measurements: the site builds strictly, the CLI reference is the
parser's, every results table equals what its JSON gives, the README's commands exist with the flags shown, its
Python example runs, and the package map lists exactly the files under src/prunekit."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


render_results = _module(ROOT / "benchmarks" / "render_results.py", "render_results")
cli_reference = _module(ROOT / "docs" / "hooks" / "cli_reference.py", "cli_reference")


# --- results tables ---------------------------------------------------------------------------------------------------
def test_every_results_table_equals_what_its_json_gives():
    assert render_results.stale() == [], "run `make results` (benchmarks/render_results.py) and commit"


def test_a_hand_edited_number_is_caught(tmp_path):
    for page in render_results.PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    text = (tmp_path / "README.md").read_text()
    start = text.index("<!-- results:headline -->")
    row = text.index("| attention drop 8 |", start)
    edited = text[:row] + text[row:].replace("38.06", "37.06", 1)
    assert edited != text
    (tmp_path / "README.md").write_text(edited)
    assert render_results.stale(tmp_path) == ["README.md: headline"]


def test_the_readme_has_a_headline_table_and_every_region_is_known():
    assert "headline" in render_results.regions(README.read_text())
    for page in render_results.PAGES:
        for name in render_results.regions((ROOT / page).read_text()):
            assert name in render_results.TABLES, f"{page}: unknown results region {name}"


def test_every_result_file_is_cited_by_the_docs():
    pages = "".join((ROOT / p).read_text() for p in render_results.PAGES)
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        assert f"(benchmarks/results/{path.name})" in pages, f"{path.name} is cited by no table: remove it or cite it"


# --- CLI reference ----------------------------------------------------------------------------------------------------
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from prunekit.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_the_committed_cli_reference_is_the_parsers():
    page = ROOT / "docs" / "cli.md"
    text = page.read_text()
    assert cli_reference.rendered(text, ROOT) == text, "run `python docs/hooks/cli_reference.py` and commit"


def test_the_cli_reference_names_every_command_and_flag():
    text = (ROOT / "docs" / "cli.md").read_text()
    for name, parser in _subparsers().items():
        section = text.split(f"## prunekit {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                assert f"`{flag}`" in section, f"prunekit {name} {flag} is missing from docs/cli.md"


# --- README ----------------------------------------------------------------------------------------------------------
def test_the_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 300


def _readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("prunekit ")]


def test_every_readme_command_exists_with_the_flags_shown():
    commands = _readme_commands()
    assert len(commands) >= 9
    parsers = _subparsers()
    for argv in commands:
        parser = parsers[argv[1]]
        known = {s: a for a in parser._actions for s in a.option_strings}
        for word in argv[2:]:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"{' '.join(argv)}: prunekit {argv[1]} has no {word}"
        parser.parse_args(argv[2:])  # the whole line parses (values of the right type and choice)


def test_every_flag_the_docs_show_exists():
    parsers = _subparsers()
    pages = [p for p in (ROOT / "docs").rglob("*.md") if p.name != "cli.md"]
    checked = 0
    for page in pages:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) < 2 or words[0] != "prunekit":
                    continue
                known = {s for a in parsers[words[1]]._actions for s in a.option_strings}
                checked += 1
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(words[2:])):
                    assert flag in known, f"{page.name}: prunekit {words[1]} has no {flag}"
    assert checked >= 10


def test_every_command_in_the_readme_table_links_to_its_reference():
    text = README.read_text()
    for name in _subparsers():
        assert f"[`prunekit {name}`](docs/cli.md#prunekit-{name})" in text


def test_the_readme_python_example_runs(tiny_checkpoint, tmp_path, isolated_cache):
    """The README's example, on the tiny checkpoint instead of SmolLM2 (same calls, same arguments), in a fresh
    interpreter as a user would run it."""
    checkpoint, text = tiny_checkpoint
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    for old, new in [('"smollm2-135m"', repr(str(checkpoint))), ('"c4"', repr(str(text))),
                     ('"wiki"', repr(str(text))), ("n=4", "n=2"), ("mlp_keep=0.75", "mlp_keep=0.75, multiple_of=1"),
                     ('"pruned/"', repr(str(tmp_path / "pruned")))]:
        assert old in code
        code = code.replace(old, new)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PRUNEKIT_CACHE": str(isolated_cache)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "pruned" / "prunekit_plan.json").is_file()


# --- architecture page --------------------------------------------------------------------------------------------
def test_the_package_map_lists_exactly_the_files_under_src():
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", text, re.M))
    package = ROOT / "src" / "prunekit"
    real = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    assert sorted(real - listed) == [], "files missing from docs/architecture.md"
    assert sorted(listed - real) == [], "docs/architecture.md lists files that do not exist"


# --- the site ---------------------------------------------------------------------------------------------------------
def _build(root: Path, site: Path) -> subprocess.CompletedProcess:
    # Not -q: quiet mode hides the warnings that --strict turns into a failure.
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(site.parent)})


needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed")


@needs_mkdocs
def test_the_site_builds_strictly(tmp_path):
    result = _build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "cli" / "index.html").is_file()
    assert (tmp_path / "site" / "benchmarks" / "results" / "paper_limit100.json").is_file()


@needs_mkdocs
def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    for part in ("docs", "src", "benchmarks"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    page = copy / "docs" / "index.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md)\n")
    result = _build(copy, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr
