"""Errors a user can act on. Every failure caused by bad input raises a subclass of `PrunekitError`
with one clear sentence; the CLI prints it without a traceback."""


class PrunekitError(Exception):
    """Base class for errors caused by the user's input or environment."""


class UnsupportedArchitectureError(PrunekitError):
    """The model's `config.model_type` has no adapter."""


class PlanError(PrunekitError):
    """A pruning target is impossible (too many modules, zero width, GQA-incompatible, ...)."""


class DataError(PrunekitError):
    """Text is missing, unreadable or too short for what was asked."""


class CheckpointError(PrunekitError):
    """A checkpoint directory is missing files, corrupt, or an output would be overwritten."""


class RecoveryError(PrunekitError):
    """Recovery fine-tuning was asked for with impossible settings (no steps, a negative learning rate, ...)."""


class StorageError(PrunekitError):
    """A directory prunekit must write to (offload, cache, output) cannot be created or written, or the disk
    is full."""
