"""Layer sources: where the runner gets decoder layers from, and how it learns the way the model calls them.

A `LayerSource` gives the runner three things for a model: the layer-0 input (the embedding output) of a
calibration batch, the arguments the model passes to each decoder layer for that batch (masks, rotary
embeddings, positions: everything but the hidden states), and decoder layer `i` with its weights; and, for
what is computed from the last layer's output, the final norm and LM head (`head`). Weight edits that are
tried and undone (`compress`'s refitted projections) go through `write` / `revert`: a resident model's
parameters are overwritten (the originals kept), a streamed model's are kept aside and used instead of the
files' values whenever a layer is read, and when its checkpoint is saved. Two
sources exist: `ResidentLayers` (a model in memory: layers are simply there) and
`prunekit.engine.streamed.StreamedLayers` (a meta-device skeleton whose layers are read one at a time from
the safetensors files and released after use). Everything that computes over layers is written once, as
observers of the one runner (`prunekit.engine.runner`), and runs on either source.

How layers are called. Masks (causal, sliding-window, per-layer-type) and rotary embeddings are not
re-implemented here: the model's own forward computes them. The decoder layers are swapped for
`_CallRecorder` stubs that record the (args, kwargs) each layer is called with and return their input, the
final norm for an identity; one forward of the decoder stack then gives every layer's call exactly as the
full model makes it. Calls are recorded with the embedding replaced by a zero stub when only the calls are
wanted (masks and rotary embeddings depend on shapes, positions and the attention mask, not on embedding
values), so a streamed model reads its embedding once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Protocol

import torch
from torch import nn

from prunekit.adapters import ModelAdapter, get_adapter
from prunekit.plans import LayerWidth

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]


class LayerSource(Protocol):
    """What the runner needs of a model. `resumable`: whether a run over it is long enough that its hidden
    states are worth keeping on disk for a resume (streamed) or not (resident)."""

    adapter: ModelAdapter
    device: torch.device
    dtype: torch.dtype
    resumable: bool

    def embedding(self) -> Any:
        """Context manager during which `capture(..., embed=True)` may compute layer-0 inputs."""

    def capture(self, ids: torch.Tensor, mask: torch.Tensor, *,
                embed: bool = False) -> tuple[torch.Tensor | None, dict[int, LayerCall]]:
        """(layer-0 input if `embed`, else None; {layer: (args, kwargs)}) for one batch."""

    def layer(self, i: int) -> Any:
        """Context manager giving decoder layer `i` with its weights."""

    def set_widths(self, widths: Mapping[int, LayerWidth]) -> None:
        """The widths (kept ORIGINAL indices) the model has been narrowed to so far."""

    def head(self) -> Any:
        """Context manager during which the final norm and LM head have their weights
        (`adapter.logits` may be called)."""

    def read(self, name: str) -> torch.Tensor:
        """The current value of the model tensor `name` (a state-dict name), edits included."""

    def write(self, name: str, value: torch.Tensor) -> None:
        """Replace the value of tensor `name` (same shape) for every later use, until `revert`."""

    def revert(self) -> None:
        """Undo every `write` since the last `commit`."""

    def commit(self) -> None:
        """Keep what was written: `revert` no longer undoes it."""


class _CallRecorder(nn.Module):
    """Stands in for decoder layer `index` during a capture forward: records how it was called (everything
    but the hidden states) and passes the hidden states on unchanged."""

    def __init__(self, index: int, calls: dict[int, LayerCall], inputs: dict[int, torch.Tensor]):
        super().__init__()
        self.index = index
        self.calls = calls
        self.inputs = inputs

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls[self.index] = (args, kwargs)
        if self.index == 0:
            self.inputs[0] = hidden_states
        return hidden_states


class _ZeroEmbedding(nn.Module):
    """Stands in for the token embedding when only the layers' call arguments are wanted."""

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.hidden_size = hidden_size
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.hidden_size, dtype=self.dtype, device=input_ids.device)


@contextmanager
def _stubbed(adapter: ModelAdapter, calls: dict[int, LayerCall], inputs: dict[int, torch.Tensor], *,
             zero_embed: torch.dtype | None) -> Iterator[None]:
    layers, norm, embed = adapter.layers(), adapter.final_norm(), adapter.embed()
    adapter.set_layers(nn.ModuleList([_CallRecorder(i, calls, inputs) for i in range(len(layers))]))
    adapter.set_final_norm(nn.Identity())
    if zero_embed is not None:
        adapter.set_embed(_ZeroEmbedding(adapter.hidden_size, zero_embed))
    try:
        yield
    finally:
        adapter.set_layers(layers)
        adapter.set_final_norm(norm)
        adapter.set_embed(embed)


@torch.no_grad()
def capture_calls(adapter: ModelAdapter, ids: torch.Tensor, mask: torch.Tensor, device: torch.device, *,
                  embed: bool, dtype: torch.dtype) -> tuple[torch.Tensor | None, dict[int, LayerCall]]:
    """One decoder-stack forward with recording stubs for the layers: (layer-0 input if `embed`, else None;
    {layer: (args, kwargs)})."""
    calls: dict[int, LayerCall] = {}
    inputs: dict[int, torch.Tensor] = {}
    with _stubbed(adapter, calls, inputs, zero_embed=None if embed else dtype):
        adapter.base_model()(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return (inputs.get(0) if embed else None), calls


class ResidentLayers:
    """A model in memory as a layer source: its layers are simply there (nothing to load or release), and a
    model narrowed by width pruning already has its narrowed weights (`set_widths` has nothing to do)."""

    resumable = False

    def __init__(self, model: nn.Module, adapter: ModelAdapter | None = None):
        self.model = model
        self.adapter = adapter if adapter is not None else get_adapter(model)
        self.device = self.adapter.device()
        self.dtype = self.adapter.dtype()
        self._originals: dict[str, torch.Tensor] = {}

    @contextmanager
    def embedding(self) -> Iterator[None]:
        yield

    def capture(self, ids: torch.Tensor, mask: torch.Tensor, *,
                embed: bool = False) -> tuple[torch.Tensor | None, dict[int, LayerCall]]:
        return capture_calls(self.adapter, ids, mask, self.device, embed=embed, dtype=self.dtype)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        yield self.adapter.layers()[i]

    def set_widths(self, widths: Mapping[int, LayerWidth]) -> None:
        pass

    @contextmanager
    def head(self) -> Iterator[None]:
        yield

    def read(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name).detach()

    @torch.no_grad()
    def write(self, name: str, value: torch.Tensor) -> None:
        param = self.model.get_parameter(name)
        if name not in self._originals:  # the first edit keeps what `revert` restores
            self._originals[name] = param.detach().clone()
        param.copy_(value)

    @torch.no_grad()
    def revert(self) -> None:
        for name, value in self._originals.items():
            self.model.get_parameter(name).copy_(value)
        self._originals.clear()

    def commit(self) -> None:
        self._originals.clear()


def as_source(model: nn.Module | LayerSource, adapter: ModelAdapter | None = None) -> LayerSource:
    """A layer source for `model`: itself when it already is one, else its resident layers."""
    if isinstance(model, nn.Module):
        return ResidentLayers(model, adapter)
    return model
