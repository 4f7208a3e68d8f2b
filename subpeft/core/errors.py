"""Errors a user can act on. All are ValueError/TypeError subclasses."""


class SubpeftError(ValueError):
    """Base class of subpeft's errors about bad input."""


class ConfigError(SubpeftError):
    """An invalid or unreadable method configuration."""


class TargetError(SubpeftError):
    """A target specification that matches nothing, or matches a module of the wrong kind."""


class UnsupportedLayerError(TypeError):
    """A method was attached to a layer type it does not support."""


class AdapterLoadError(SubpeftError):
    """An adapter directory or file that cannot be loaded onto this model."""


class UnsafeMergeError(SubpeftError):
    """A merge that would write NaN or inf into the base weights."""


class AdapterNameError(SubpeftError):
    """An unknown, duplicate or invalid adapter name."""


class AdapterLoadWarning(UserWarning):
    """An adapter that loads but is suspect: NaN or inf in its tensors (named in the message)."""
