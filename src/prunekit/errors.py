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


class MemoryLimitError(PrunekitError):
    """The run needs more memory (or address space, under `ulimit -v`) than this machine or process has."""


class ActivationOverflowError(PrunekitError):
    """Hidden states became inf/NaN (typically float16 overflow): the scores would be meaningless."""


class TaskError(PrunekitError, ValueError):
    """A zero-shot task is unknown, or its definition or data cannot be used. (Also a `ValueError`, as it was
    before it joined the hierarchy, so existing `except ValueError` code keeps working.)"""


class DeviceError(PrunekitError):
    """A device was asked for that does not exist here (no CUDA, a mistyped name)."""


class DtypeError(PrunekitError):
    """A dtype name prunekit does not know."""


class DistributedError(PrunekitError):
    """The torch.distributed environment (RANK / WORLD_SIZE / LOCAL_RANK) is inconsistent or too small."""


class ExportError(PrunekitError):
    """A checkpoint cannot be written in the asked format (a structure the format cannot express, a missing
    binding for a quantization type)."""


class OptionError(PrunekitError):
    """A command-line or API option has an impossible value (a batch size of 0, a negative count, ...)."""
