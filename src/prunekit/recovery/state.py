"""Resumable training state for long recovery runs (`--save-every`).

Every `save_every` steps the loop writes what it needs to continue exactly where it was: the trainable
tensors (every weight for full fine-tuning, the LoRA matrices otherwise), AdamW's moments, the scheduler,
the batch-order generator and the rest of the current epoch's order, the losses so far and the tokens seen.
A run started again with the same settings on the same model and data picks it up and finishes with the
same weights and losses as an uninterrupted run; one with other settings is refused (its state would not
mean anything), so a stale state can never leak into a different run.

The file is written to a temporary sibling and renamed, so a kill while saving keeps the previous state.
The job removes the state once the healed checkpoint is saved. It holds only tensors and plain containers
and is read with `weights_only=True`: a file planted there can fail to load, but it cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import RecoveryError
from prunekit.io.outputs import owned_file

STATE_FILE = "training_state.pt"


def run_key(model: nn.Module, settings: dict[str, Any]) -> str:
    """What a saved state belongs to: the settings and the starting weights (their shapes and a checksum)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}{tuple(t.shape)}{t.dtype}{float(t.double().sum()):.12e}".encode())
    return h.hexdigest()


def save_state(folder: Path, state: dict[str, Any]) -> None:
    with owned_file(folder / STATE_FILE) as tmp:  # a kill while saving keeps the previous state
        torch.save(state, tmp)


def load_state(folder: Path, key: str) -> dict[str, Any] | None:
    """The saved state of the run `key` in `folder`, None when there is none; `RecoveryError` when the state
    there belongs to another run."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # torch's advice on a foreign pickle is not for prunekit's users
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or code-carrying file: say so instead of a pickle traceback
        raise RecoveryError(f"cannot read the training state {path}: it is damaged or was not written by prunekit "
                            f"({type(e).__name__}); nothing in it was run; remove it to start again") from e
    if not isinstance(state, dict) or state.get("key") != key:
        raise RecoveryError(f"{path} holds the state of a run with other settings, model or data; remove it to "
                            "start again, or rerun with the settings it was written with")
    return state


def remove_state(folder: Path) -> None:
    """Remove a finished run's state, and its folder once empty (anything else found there is left alone)."""
    (folder / STATE_FILE).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def capture(key: str, net: nn.Module, opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator,
            run: dict[str, Any]) -> dict[str, Any]:
    """Everything the loop needs to continue: the trainable tensors (every weight, or the LoRA matrices),
    AdamW's moments, the scheduler, the batch-order generator and `run` (step, remaining order, losses)."""
    return {"key": key, "params": {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
            "run": run}


def restore(state: dict[str, Any], net: nn.Module, opt: torch.optim.Optimizer, sched: Any,
            gen: torch.Generator) -> dict[str, Any]:
    """Put a `capture`d state back into the loop's objects; returns its `run`."""
    params = dict(net.named_parameters())
    tensors = state["params"]
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing or set(tensors) - set(params):
        raise RecoveryError("the saved training state does not match the model's trainable tensors; remove it "
                            "to start again")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return state["run"]
