"""Errors a user can cause carry a one-line message that names the input and the fix."""


class EdgeResError(Exception):
    """Base of every error the CLI reports as one line. Exit code 2: bad input or usage."""

    exit_code = 2


class InputError(EdgeResError):
    """A file, flag or dataset the user gave cannot be used."""


class TargetError(EdgeResError):
    """A runtime or target failed to compile or run an artifact (exit 3)."""

    exit_code = 3
