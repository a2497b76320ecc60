"""The "nothing lost" cases, re-run as an attacker and a careless user would: what each command prints, its exit
code, and whether anything was lost, run or left behind. On the built-in SmolLM2-135M (a heterogeneous
attention-drop result of it is made first) with a private cache and temporary folder.

Each case is one prunekit command (or, for loading, plain transformers); a case passes when the command gives
the expected exit code and its check of the files holds. Prints a table and writes JSON.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_trust.py [--json benchmarks/results/trust_cases.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
CAL = ["--samples", "4", "--seq-len", "64", "--batch-size", "2"]


class Planted:
    """Unpickling this writes a marker file: a stand-in for `os.system(...)` in a planted pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


class Cases:
    def __init__(self, work: Path, cache: Path):
        self.work, self.cache = work, cache
        self.env = {**os.environ, "PRUNEKIT_CACHE": str(cache), "TMPDIR": str(work / "tmp"),
                    "PYTHONPATH": str(HERE.parent / "src")}
        (work / "tmp").mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []

    def cli(self, *argv: str, limit: int | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
        pre = None
        if limit is not None:
            def pre() -> None:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        return subprocess.run([sys.executable, "-m", "prunekit", "-q", *argv], env=self.env, cwd=self.work,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=pre)

    def case(self, n: str, what: str, expect_rc: int, run: Callable[[], subprocess.CompletedProcess | str],
             check: Callable[[], bool] = lambda: True) -> None:
        t0 = time.perf_counter()
        res = run()
        seconds = time.perf_counter() - t0
        if isinstance(res, str):  # a Python-level case reports its own outcome
            rc, err = (0 if res.startswith("ok") else 1), res
        else:
            rc, err = res.returncode, res.stderr
        lines = [line for line in err.strip().splitlines() if line.strip()]
        ok = rc == expect_rc and check() and "Traceback" not in err and (rc != 2 or len(lines) == 1)
        self.rows.append({"case": n, "what": what, "rc": rc, "stderr_lines": len(lines),
                          "prints": lines[-1] if lines else "", "seconds": round(seconds, 1), "ok": ok})
        print(f"[{'ok' if ok else 'FAIL'}] {n} {what}: rc {rc}, {seconds:.1f} s: {lines[-1] if lines else ''}",
              flush=True)


def tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))} if path.exists() else {}


def run_all(c: Cases) -> None:
    w = c.work
    drop = c.cli("drop", MODEL, "--target", "attn", "--n", "2", *CAL, "--out", str(w / "ck"))
    assert drop.returncode == 0, drop.stderr[-2000:]
    ck = w / "ck"
    ck_before = tree(ck)
    builtin = c.cache / "models" / MODEL
    builtin_before = tree(builtin)

    # 1. a pickle planted where heal keeps its state
    marker = w / "pickle-ran"
    (w / "out1.heal-state").mkdir()
    with open(w / "out1.heal-state" / "training_state.pt", "wb") as f:
        pickle.dump({"key": Planted(marker)}, f)
    c.case("1", "heal --save-every over a planted training_state.pt", 2,
           lambda: c.cli("heal", str(ck), "--steps", "2", "--save-every", "1", "--batch-size", "1", "--samples", "6",
                         "--seq-len", "64", "--out", str(w / "out1")),
           lambda: not marker.exists() and not (w / "out1").exists())

    # 2. --json over the checkpoint's own config.json
    c.case("2", "score CKPT --json CKPT/config.json", 2,
           lambda: c.cli("score", str(ck), "--samples", "4", "--seq-len", "128", "--json", str(ck / "config.json")),
           lambda: tree(ck) == ck_before)
    (w / "s.json").write_text("precious")
    c.case("2b", "score --json over an existing file, no --force", 2,
           lambda: c.cli("score", str(ck), *CAL, "--json", str(w / "s.json")),
           lambda: (w / "s.json").read_text() == "precious")

    # 3. an output that is an input
    for n, what, out in [("3a", "drop CKPT --out CKPT --force", ck),
                         ("3b", "drop --out $PRUNEKIT_CACHE/models/smollm2-135m --force", builtin),
                         ("3c", "drop CKPT --out CKPT/sub", ck / "sub"),
                         ("3d", "drop CKPT --out <folder holding CKPT> --force", w)]:
        c.case(n, what, 2, lambda out=out: c.cli("drop", str(ck), "--target", "attn", "--n", "1", *CAL, "--out",
                                                 str(out), "--force"),
               lambda: tree(ck) == ck_before and tree(builtin) == builtin_before)

    # 4. plain transformers on a heterogeneous result
    c.case("4", "AutoModelForCausalLM.from_pretrained(attn-drop result)", 0, lambda: load_check(ck))

    # 5. two runs with the same --out at once
    c.case("5", "two drops with the same --out at once", 0, lambda: race(c, ck))

    # 6. a plan with layer -5
    bad = w / "bad-plan"
    shutil.copytree(ck, bad)
    plan = json.loads((bad / "prunekit_plan.json").read_text())
    plan["dropped"][0]["layer"] = -5
    (bad / "prunekit_plan.json").write_text(json.dumps(plan))
    c.case("6a", "heal on a checkpoint whose plan has layer -5", 2,
           lambda: c.cli("heal", str(bad), "--steps", "1", "--out", str(w / "out6")),
           lambda: not (w / "out6").exists())
    c.case("6b", "compare with that checkpoint", 2,
           lambda: c.cli("compare", MODEL, str(bad), "--out", str(w / "out6b"), "--no-bench"),
           lambda: not (w / "out6b").exists())

    # 7. heal without --save-every beside an existing OUT.heal-state/
    (w / "out7.heal-state").mkdir()
    (w / "out7.heal-state" / "notes.txt").write_text("mine")
    c.case("7", "heal without --save-every, OUT.heal-state/ exists", 0,
           lambda: c.cli("heal", str(ck), "--text", "c4", "--steps", "1", "--batch-size", "1", "--samples", "2",
                         "--seq-len", "64", "--out", str(w / "out7")),
           lambda: (w / "out7.heal-state" / "notes.txt").read_text() == "mine")

    # 8. what refused or killed runs leave
    c.case("8a", "demo --drops 99 (refused)", 2,
           lambda: c.cli("demo", "--drops", "99", "--out", str(w / "demo")), lambda: not (w / "demo").exists())
    c.case("8b", "refused drop into new parent folders", 2,
           lambda: c.cli("drop", str(ck), "--target", "attn", "--n", "99", *CAL, "--out", str(w / "p" / "q" / "o")),
           lambda: not (w / "p").exists())
    c.case("8c", "compress killed (SIGKILL) while its scratch exists, then run again", 0,
           lambda: kill_then_rerun(c, ["compress", MODEL, "--budget", "params=0.9", "--samples", "4", "--seq-len",
                                       "64", "--rounds", "1", "--no-correct", "--out", str(w / "c8")],
                                   "scratch-compress"),
           lambda: list((w / "tmp" / f"prunekit-{os.getuid()}").iterdir()) == [])
    c.case("8d", "export killed (SIGKILL) while its scratch exists, then run again", 0,
           lambda: kill_then_rerun(c, ["export", str(ck), "--format", "gguf", "--out", str(w / "e8.gguf")],
                                   "scratch-tok"),
           lambda: list((w / "tmp" / f"prunekit-{os.getuid()}").iterdir()) == [])

    # 9. low memory
    c.case("9", "drop under ulimit -v 1500000", 2,
           lambda: c.cli("drop", MODEL, "--target", "attn", "--n", "2", *CAL, "--out", str(w / "out9"),
                         limit=1500000 * 1024),
           lambda: not (w / "out9").exists())

    # 10. modes
    c.case("10", "model.safetensors follows the umask (022 -> 0644)", 0, lambda: mode_check(ck))

    # 11. late or unclear checks
    c.case("11a", "bench --context 100000 (8192 positions)", 2, lambda: c.cli("bench", MODEL, "--context", "100000"))
    c.case("11b", "an unknown model name", 2, lambda: c.cli("eval", "nosuchmodel", "--json", str(w / "e.json")))
    c.case("11c", "--out ''", 2, lambda: c.cli("drop", str(ck), "--target", "attn", "--n", "1", *CAL, "--out", ""))


def load_check(ck: Path) -> str:
    code = f"""
import torch
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(ck)!r})
    print("loaded without remote code")
except Exception as e:
    print("refused:", type(e).__name__)
remote = AutoModelForCausalLM.from_pretrained({str(ck)!r}, trust_remote_code=True).eval()
from prunekit.io.checkpoint import load_model
ours, _ = load_model({str(ck)!r})
ids = torch.tensor([[1, 500, 900, 42, 7]])
with torch.no_grad():
    print("max logit difference", float((remote(ids).logits - ours(ids).logits).abs().max()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")}, timeout=600)
    # transformers may print its trust_remote_code question on the same line, before our answer.
    text = " ".join(line[line.find(w):] for line in out.stdout.splitlines()
                    for w in ("refused", "loaded without", "max logit") if w in line)
    good = "refused" in text and "max logit difference 0.0" in text
    return ("ok: " if good else "bad: ") + text


def race(c: Cases, ck: Path) -> str:
    argv = [sys.executable, "-m", "prunekit", "-q", "drop", str(ck), "--target", "attn", "--n", "1", *CAL,
            "--out", str(c.work / "race")]
    procs = [subprocess.Popen(argv, env=c.env, cwd=c.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=900), p.stderr.read().strip().splitlines()) for p in procs]
    rcs = sorted(rc for rc, _ in results)
    refusal = [lines[-1] for rc, lines in results if rc == 2]
    good = rcs == [0, 2] and len(refusal) == 1
    return ("ok: " if good else "bad: ") + f"exit codes {rcs}; " + (refusal[0] if refusal else "")


def kill_then_rerun(c: Cases, argv: list[str], point: str) -> subprocess.CompletedProcess:
    marker = c.work / "paused"
    env = {**c.env, "PRUNEKIT_PAUSE_AT": point, "PRUNEKIT_PAUSE_FILE": str(marker)}
    p = subprocess.Popen([sys.executable, "-m", "prunekit", "-q", *argv], env=env, cwd=c.work,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not marker.exists():
        assert p.poll() is None, f"{argv[0]} ended before {point}"
        time.sleep(0.1)
    marker.unlink()
    p.kill()
    p.wait()
    return c.cli(*argv)


def mode_check(ck: Path) -> str:
    mode = stat.S_IMODE((ck / "model.safetensors").stat().st_mode)
    return ("ok: " if mode == 0o644 else "bad: ") + f"model.safetensors is {mode:o}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(HERE / "results" / "trust_cases.json"))
    a = ap.parse_args()
    os.umask(0o022)
    from prunekit.io.assets import builtin_model_dir

    builtin_model_dir(MODEL)  # converted once into the user's cache; linked into the private one below
    with tempfile.TemporaryDirectory(prefix="trust-cases-") as tmp:
        work = Path(tmp)
        cache = work / "cache"
        (cache / "models").mkdir(parents=True)
        shutil.copytree(builtin_model_dir(MODEL), cache / "models" / MODEL)
        c = Cases(work / "w", cache)
        run_all(c)
    print()
    print("| case | what | exit | stderr lines | prints | s | ok |")
    print("|---|---|---:|---:|---|---:|---|")
    for r in c.rows:
        print(f"| {r['case']} | {r['what']} | {r['rc']} | {r['stderr_lines']} | {r['prints'][:160]} | "
              f"{r['seconds']} | {'yes' if r['ok'] else 'NO'} |")
    from prunekit.io.outputs import write_json

    write_json({"model": MODEL, "machine": platform.platform(), "python": platform.python_version(),
                "rows": c.rows}, a.json, force=True)
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
