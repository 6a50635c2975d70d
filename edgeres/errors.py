"""Errors a user can cause carry a one-line message that names the input and the fix."""

from edgeres.targets.base import TargetError  # one class for "a runtime failed" (exit 3), raised by targets and edgeres

__all__ = ["EdgeResError", "InputError", "TargetError"]


class EdgeResError(Exception):
    """Base of every error the CLI reports as one line. Exit code 2: bad input or usage."""

    exit_code = 2


class InputError(EdgeResError):
    """A file, flag or dataset the user gave cannot be used."""
