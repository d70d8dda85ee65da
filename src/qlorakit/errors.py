"""The exceptions qlorakit raises; each message names the cause and the fix."""


class QlorakitError(Exception):
    """Base class of every error qlorakit raises on purpose."""


class ConfigError(QlorakitError, ValueError):
    """An invalid configuration value."""


class QuantizationError(QlorakitError, ValueError):
    """A tensor or option that cannot be quantized."""


class StateDictError(QlorakitError, ValueError):
    """A state dict whose keys, shapes or metadata do not match."""


class DataError(QlorakitError, ValueError):
    """A malformed dataset file, row or field."""


class ModelLoadError(QlorakitError, RuntimeError):
    """A model source that cannot be loaded."""


class StorageError(QlorakitError, OSError):
    """A file that could not be written (disk full, I/O error); the message says what was kept and the space needed."""


class TrainingDivergedError(QlorakitError, RuntimeError):
    """Training stopped after too many optimizer steps in a row with a non-finite loss or gradient norm."""


class DistributedError(QlorakitError, RuntimeError):
    """A multi-process run cannot continue: a rank died or hung, or the ranks disagree on the run."""
