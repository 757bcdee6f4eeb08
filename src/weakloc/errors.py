"""Errors weakloc raises for bad user input.

Every message names the file (and row, where there is one) and says what is wrong, so the CLI can
print it as one line instead of a stack trace.
"""


class WeaklocError(Exception):
    """Base class for user-facing errors (bad input, bad arguments)."""


class ImageReadError(WeaklocError):
    """An image file is missing, unreadable, truncated or of an unsupported kind."""


class LabelError(WeaklocError):
    """A labels source (CSV, class folders) is malformed or names an unknown class."""


class AnnotationError(WeaklocError):
    """A ground-truth annotation file (COCO JSON, VOC XML) is malformed."""


class CheckpointError(WeaklocError):
    """A checkpoint is missing, incomplete or does not match its config."""


class OptionError(WeaklocError):
    """A command-line option or Python argument is out of range, of the wrong type or not a valid choice."""
