"""Errors that lego_core raises for bad input.

Every message is one line that says what is wrong, so that the CLI can print it
and the service can return it as a 422 without a traceback.
"""


class LegoError(ValueError):
    """Base class: the input (file, class, option, dataset) is not usable."""


class ModelFileError(LegoError):
    """A model file cannot be read, or does not fit its stated architecture."""


class DatasetError(LegoError):
    """A dataset directory or archive is unreadable, unsafe or empty."""


class UnknownClassError(LegoError):
    """A class name or index that the model does not have."""


class IncompatibleComponentsError(LegoError):
    """Components that cannot be assembled in the requested form."""
