"""Errors raised by the SAE library. Every message names the file (or object) and what is wrong."""


class SAEError(Exception):
    """Base class of the library's errors. Each error class names itself after the library's package
    (`sae_models.SAEFormatError`), also where a host application imports the library under a longer name that
    holds its folder (ComfyUI shows that name to the user of a workflow)."""

    __module__ = "sae_models"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = "sae_models"


class SAEFormatError(SAEError):
    """A file or folder cannot be read as an SAE: unknown format, missing or malformed tensors, bad config."""

    def __init__(self, path, message: str):
        self.path = str(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")


class UnsafePickleError(SAEFormatError):
    """A pickled file needs more than tensors and plain containers to be loaded; it was not executed."""
