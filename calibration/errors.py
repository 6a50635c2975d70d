"""The one error this package raises for bad data (the CLI reports it as exit 2, one line)."""


class DataError(ValueError):
    """Calibration or evaluation data that cannot be used; the message names the input and the fix."""

    exit_code = 2
