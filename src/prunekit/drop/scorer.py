"""LLM-Drop scoring over the one runner: the similarity observer, and a scorer that re-scores after drops
and resumes an interrupted first pass.

One pass gives all three scores (block, attention, MLP) per layer: the runner hands the observer each
layer's input, the residual stream between its attention and MLP (the "mid" state) and its output. The
pairwise matrix cos(h_i, h_j) of one batch needs all its layer states at once, so the observer stores each
state's unit rows and the sums are added after the last layer.

Resuming. With a `work_dir` (a layer-streamed job keys it by model, calibration tokens and options, see
`prunekit.jobs.cache`), hidden states live in files there and, after every finished layer, the sums and the
index of the next layer are written atomically (`_progress.safetensors`): an interrupted first pass started
again with the same `work_dir` continues at the next layer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from prunekit.adapters import ModelAdapter
from prunekit.data import CalibrationData
from prunekit.drop.similarity import SimilarityAccumulator, SimilarityScores, unit_rows
from prunekit.engine.runner import FiniteCheck, LayerRunner, Observer, TensorStore
from prunekit.engine.sources import LayerSource, as_source
from prunekit.io.outputs import owned_file

PROGRESS_FILE = "_progress.safetensors"
PROGRESS_FORMAT = "1"


def _u_key(state: int, batch: int) -> str:
    return f"u{state:05d}-b{batch:06d}"


class SimilarityObserver(Observer):
    """Feeds `SimilarityAccumulator.update_layer` and stores the unit rows the pairwise matrix needs."""

    def __init__(self, acc: SimilarityAccumulator, store: TensorStore):
        self.acc = acc
        self.store = store

    def observe(self, i: int, b: int, h_in: torch.Tensor, h_mid: torch.Tensor, h_out: torch.Tensor,
                mask: torch.Tensor | None) -> None:
        sq_out = self.acc.update_layer(i, h_in, h_mid, h_out, mask)
        if self.acc.pair is not None:
            if i == 0:
                self.store.put(_u_key(0, b), unit_rows(h_in, mask))
            self.store.put(_u_key(i + 1, b), unit_rows(h_out, mask, sq_out))

    def add_pairwise(self, n_batches: int, n_layers: int, device: torch.device) -> None:
        """Per batch, over all its states' unit rows (then freed)."""
        for b in range(n_batches):
            keys = [_u_key(j, b) for j in range(n_layers + 1)]
            self.acc.update_pairwise([self.store.get(k, device) for k in keys])
            for k in keys:
                self.store.delete(k)


def save_progress(work_dir: Path, next_layer: int, acc: SimilarityAccumulator) -> None:
    """Atomically record that layers < `next_layer` are done, with their sums."""
    with owned_file(work_dir / PROGRESS_FILE) as tmp:
        save_file(acc.to_tensors(), str(tmp), metadata={"format": PROGRESS_FORMAT, "next_layer": str(next_layer)})


def load_progress(work_dir: Path) -> tuple[int, SimilarityAccumulator] | None:
    path = work_dir / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as st:
            meta = st.metadata() or {}
            tensors = {k: st.get_tensor(k).clone() for k in st.keys()}
        if meta.get("format") != PROGRESS_FORMAT:
            return None
        return int(meta["next_layer"]), SimilarityAccumulator.from_tensors(tensors)
    except Exception:  # a damaged progress file means "start over", never a crash
        return None


class SimilarityScorer:
    """LLM-Drop scores of a model (in memory, or any `LayerSource`), re-scorable after in-place drops.

    `score(start_layer=j)` re-runs layers j.. only (the caller guarantees nothing before j changed);
    `rescore` makes the runner remember layer inputs for that. `acc` holds the running sums. `observers`:
    extra observers run in the same pass; `on_layer_done(i)` is called after layer i is finished (and its
    progress saved)."""

    def __init__(self, model: nn.Module | LayerSource, calib: CalibrationData, *, adapter: ModelAdapter | None = None,
                 batch_size: int = 4, pairwise: bool = True, rescore: bool = True,
                 work_dir: str | Path | None = None, state_budget_bytes: int = 2 << 30,
                 observers: Sequence[Observer] = (), check_overflow: bool = True, progress: bool = True,
                 on_layer_done: Callable[[int], None] | None = None):
        self.source = as_source(model, adapter)
        self.adapter = self.source.adapter
        self.calib = calib
        self.pairwise = pairwise
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.runner = LayerRunner(self.source, calib, batch_size=batch_size, work_dir=self.work_dir,
                                  remember_inputs=rescore, state_budget_bytes=state_budget_bytes, progress=progress)
        self.extra = list(observers)
        self.check = check_overflow
        self.on_layer_done = on_layer_done
        self.acc: SimilarityAccumulator | None = None
        self._runs = 0

    def score(self, start_layer: int = 0) -> SimilarityScores:
        n = self.adapter.num_layers
        # Only the first full pass (of the model as loaded) is resumable: later passes follow drops that a
        # new process would not know about.
        resumable = self._runs == 0 and start_layer == 0 and self.work_dir is not None
        if self._runs == 0 and self.work_dir is not None and not resumable:
            self._clear_work_dir()
        self._runs += 1
        resume_from = self._resume() if resumable else 0
        if resume_from == 0:
            if self.acc is None or start_layer == 0:
                self.acc = SimilarityAccumulator(n, self.pairwise)
            else:
                self.acc.reset_from(self.runner.restart_layer(start_layer))
        acc = self.acc
        assert acc is not None
        sim = SimilarityObserver(acc, self.runner.store)
        observers: list[Observer] = [FiniteCheck()] if self.check else []
        observers += [sim, *self.extra]

        def done(i: int) -> None:
            if resumable:
                save_progress(self.work_dir, i + 1, acc)  # type: ignore[arg-type]
            if self.on_layer_done is not None:
                self.on_layer_done(i)

        self.runner.run(observers, start_layer=max(start_layer, resume_from), on_layer_done=done, desc="scoring")
        if acc.pair is not None:
            sim.add_pairwise(len(self.runner.batches), n, self.source.device)
        if resumable:
            (self.work_dir / PROGRESS_FILE).unlink(missing_ok=True)  # type: ignore[operator]
        return acc.result(self.calib.describe())

    def _resume(self) -> int:
        """The layer an interrupted first pass left off at (its sums restored), or 0 (work dir cleared)."""
        assert self.work_dir is not None
        prog = load_progress(self.work_dir)
        if prog is not None and prog[1].num_layers == self.adapter.num_layers \
                and (prog[1].pair is not None) == self.pairwise and self.runner.resume_at(prog[0]):
            self.acc = prog[1]
            return prog[0]
        # Nothing to resume: files from another (or a half-dropped) run must not be trusted.
        self._clear_work_dir()
        return 0

    def _clear_work_dir(self) -> None:
        if self.work_dir is not None and self.work_dir.is_dir():
            for f in self.work_dir.iterdir():
                if f.is_file():
                    f.unlink()

    def cleanup(self) -> None:
        """Remove the work directory (hidden states) once no re-score will be asked for."""
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
