"""The engine: one layer-by-layer runner (`runner`) over two layer sources, resident (`sources`) and
streamed from safetensors files (`streamed`), and memory probing (`memory`)."""

from prunekit.engine.runner import FiniteCheck, LayerRunner, Observer, TensorStore, check_finite
from prunekit.engine.sources import LayerSource, ResidentLayers, as_source, capture_calls

__all__ = ["FiniteCheck", "LayerRunner", "LayerSource", "Observer", "ResidentLayers", "TensorStore", "as_source",
           "capture_calls", "check_finite"]
