"""How much calibration `compress` should take by default, judged on a text used for no reported number.

`compress` refits every kept output projection by least squares from its input Gram, so it depends on the
amount of calibration text more than the choosing-only commands do. This runs `compress --budget
params=0.8` on SmolLM2 with 16 x 512 tokens (2 rounds, the other commands' default), 16 x 512 with 4 rounds, and
64 x 512 (2 rounds), all from c4's calibration half, and measures perplexity on 10 x 1024 tokens of LAMBADA
(lambada_openai test passages, novels: in no built-in text, used for no other decision or table here),
which decides the default, and, for the record, on wiki's evaluation half. Writes
benchmarks/results/compress_calibration.json (`--json`); `--configs` runs other (sequences x rounds) settings.
`--calib` takes calibration from other texts: one name, or several with weights as `--text` takes them
(`c4:2,technical:1,tiny:1`: each text's share of the sequences from its calibration half, interleaved so the
search's held-out last quarter holds every text in its share).

    .venv/bin/python benchmarks/bench_compress_calibration.py [--configs 64x2,128x2] [--calib c4] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import prunekit
from prunekit.compress import Budget, compress
from prunekit.recovery.sources import calibration_texts

sys.path.insert(0, str(Path(__file__).parent))
from bench_compress import correction_summary  # noqa: E402
from bench_heal import lambada_windows  # noqa: E402

CONFIGS = "16x2,16x4,64x2"  # (calibration sequences) x (rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=CONFIGS, help="comma-separated SAMPLESxROUNDS")
    p.add_argument("--calib", default="c4", help="calibration text(s), e.g. c4 or c4:2,technical:1,tiny:1")
    p.add_argument("--json", default="benchmarks/results/compress_calibration.json")
    a = p.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in a.configs.split(",")]
    dense, tok = prunekit.load_model("smollm2-135m")
    wiki = prunekit.eval_windows(tok, "wiki", 10, 1024)
    lam = lambada_windows(tok, 10, 1024)
    out = {"model": "smollm2-135m", "budget": "params=0.8", "calibration": a.calib,
           "decided_on": "lambada (10 x 1024)", "runs": {}}
    # Every setting's calibration is cut before any search, so one the text cannot give (c4's calibration half
    # holds 76 sequences of 512) fails at once, not after the searches before it.
    calibs = {samples: calibration_texts(tok, a.calib, samples, 512) for samples, _ in configs}
    for samples, rounds in configs:
        calib = calibs[samples]
        m = copy.deepcopy(dense)
        t0 = time.time()
        r = compress(m, prunekit.get_adapter(m), calib, Budget("params", 0.8), rounds=rounds, progress=False)
        row = {"seconds": time.time() - t0, "chosen": r.chosen,
               "correction": correction_summary(r.plan),
               "lambada": prunekit.perplexity(m, lam, progress=False)["perplexity"],
               "wiki": prunekit.perplexity(m, wiki, progress=False)["perplexity"]}
        out["runs"][f"{samples}x512, {rounds} rounds"] = row
        print(f"{samples} x 512, {rounds} rounds: LAMBADA {row['lambada']:.2f}  wiki {row['wiki']:.2f}  "
              f"[{row['seconds']:.0f} s, {row['chosen']}]", flush=True)
        path = Path(a.json)
        path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
