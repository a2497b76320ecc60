"""The `heal` job: load a (pruned) checkpoint, run recovery fine-tuning (`prunekit.recovery`), save it with
its plan and the run's record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunekit.data import calibration_data
from prunekit.io.checkpoint import load_model, resolve_model_path
from prunekit.io.outputs import prepare_output
from prunekit.plans import PLAN_FILE, PruningPlan
from prunekit.recovery import check_settings, recover
from prunekit.save import save


def heal_checkpoint(model: str, out: str, *, text: str = "c4", samples: int = 64, seq_len: int = 512,
                    batch_size: int = 4, steps: int = 100, lr: float = 5e-5, warmup: float = 0.1,
                    weight_decay: float = 0.0, seed: int = 0, dtype: str = "float32", device: str = "cpu",
                    force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Load a checkpoint, `recover` it, save it to `out` with its plan (if it has one) plus the run's record
    appended to `plan.recovery`. Returns the record. Settings and the output are checked before loading."""
    check_settings(steps=steps, lr=lr, batch_size=batch_size, warmup=warmup)
    prepare_output(out, force)
    net, tok = load_model(model, dtype=dtype, device=device)
    data = calibration_data(tok, text, samples, seq_len)
    plan_file = Path(resolve_model_path(model)) / PLAN_FILE
    plan = PruningPlan.load(plan_file) if plan_file.is_file() else PruningPlan(method="none")
    rec = recover(net, data, steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, weight_decay=weight_decay,
                  seed=seed, progress=progress)
    rec["source"] = str(model)
    plan.recovery.append(rec)
    save(net, tok, out, plan, force=force)
    return rec
