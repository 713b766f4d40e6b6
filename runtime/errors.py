"""One family of exceptions for expected failures.

Every message is one line that says what is wrong and what to do next; the CLI prints it
without a traceback and maps the class to an exit code. Bugs stay ordinary exceptions.
"""


class AriaError(Exception):
    """An expected failure the user can act on (exit code 1)."""

    exit_code = 1


class UsageError(AriaError):
    """A bad flag value or argument combination (exit code 2)."""

    exit_code = 2


class ConfigError(AriaError):
    """config.json is missing, unreadable, or lacks a required key."""


class CheckpointError(AriaError):
    """Weights are missing, unexpected, mis-shaped, truncated or corrupt."""


class ImageError(AriaError):
    """An image could not be read or is unusable."""


class ModelNotFoundError(AriaError):
    """A model name, path or Hub repo cannot be found (or not offline)."""


class InputError(AriaError):
    """The prompt and images do not fit together (for example token/feature count mismatch)."""


class PlacementError(AriaError):
    """The model does not fit the memory budget as asked (GPU memory, context, expert slots)."""
