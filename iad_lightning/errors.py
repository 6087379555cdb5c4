"""Exceptions with messages that name the file, key or value at fault."""


class IADError(Exception):
    """Base class of the framework's own errors."""


class DatasetError(IADError, ValueError):
    """A dataset root, category, index file, image or mask is missing or invalid."""


class WeightsError(IADError, RuntimeError):
    """Pretrained weights could not be resolved or loaded."""


class ConfigError(IADError, ValueError):
    """A configuration key has an invalid value."""
