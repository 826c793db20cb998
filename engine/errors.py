"""Typed errors for user mistakes; the CLI prints each as one line, never a traceback."""


class EngineError(Exception):
    """Base class for every error caused by input the user gave us."""


class ConfigError(EngineError):
    """A .cfg or .data file is missing, malformed, or describes a network that cannot be built."""


class WeightsError(EngineError):
    """A .weights file is missing, truncated, too long, or has an unknown header."""


class DataError(EngineError):
    """Training or test data is missing or cannot be decoded."""


class BackendError(EngineError):
    """The requested compute backend is not usable on this machine."""


class NumericalError(EngineError):
    """A forward pass produced NaN or infinite values: the results would be meaningless."""


class TrainingError(EngineError):
    """Training cannot go on (the loss diverged, or nothing is left to train)."""
