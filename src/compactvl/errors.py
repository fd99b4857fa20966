"""User-facing errors.

Every error compactvl raises for bad input is a :class:`CompactVLError` whose message names the problem and
what to do about it. The CLI prints these without a traceback; anything else is a bug in compactvl.
"""


class CompactVLError(Exception):
    """Bad input or configuration; the message says what is wrong and how to fix it."""


class ConfigError(CompactVLError, ValueError):
    """A recipe, knob or model name is invalid."""


class InputError(CompactVLError, ValueError):
    """An image, prompt, dataset record or file is invalid."""


class CheckpointError(CompactVLError, OSError):
    """A checkpoint or model directory is missing, incomplete or unreadable."""


class CompactVLWarning(UserWarning):
    """A notice from compactvl itself (a substitute a method uses, an unsupported library version, ...). Tests and
    users filter on this category, never on the warnings other libraries may emit."""
