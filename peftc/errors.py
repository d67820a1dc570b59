"""peftc's exceptions: every user-facing failure is a PeftcError subclass."""

from __future__ import annotations

__all__ = ["PeftcError", "SpecError", "CaptureError", "CheckpointError", "PassError"]


class PeftcError(Exception):
    """Base class of all errors peftc raises on purpose."""


class SpecError(PeftcError, ValueError):
    """A spec field has a bad value; raised before any capture work starts."""

    def __init__(self, field: str, value: object, allowed: str, hint: str = ""):
        self.field, self.value, self.allowed = field, value, allowed
        msg = f"spec field {field!r}: got {value!r}; allowed: {allowed}"
        super().__init__(f"{msg}. {hint}" if hint else msg)


class CaptureError(PeftcError, RuntimeError):
    """The model could not be captured into a graph."""


class CheckpointError(PeftcError, ValueError):
    """An adapter checkpoint is missing, corrupt, or does not fit the compiled model."""


class PassError(PeftcError, RuntimeError):
    """A pass failed or left an invalid graph; names the pass and those that ran before."""
