"""Errors a user can act on, and the guard that prints them as one line (no traceback).

Every error medlora raises on purpose is a `MedloraError`; the kinds below say where it came from. The
configuration, data and formatting errors are also `ValueError`s, as they were before this module existed.
"""

from __future__ import annotations

import functools
import sys


class MedloraError(RuntimeError):
    """A failure the user can act on (audit failed, output exists, model unreachable, ...)."""

    exit_code = 2


class ConfigError(MedloraError, ValueError):
    """Bad configuration; the message names the file or option."""


class DataError(MedloraError, ValueError):
    """Bad input data; the message names file, line and field."""


class FormattingError(MedloraError, ValueError):
    """A row or tokenizer cannot be formatted in the requested style."""


class AuditError(MedloraError):
    """A pre-flight audit found a silent failure (labels, tokens, gradients)."""


class KernelSetupError(MedloraError):
    """A kernel backend fast needs cannot be fetched or verified."""


class Interrupted(MedloraError):
    """The run stopped on a signal after saving a checkpoint; exit with 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def main_guard(func):
    """Turn expected errors into one clear line on stderr and their exit code (2; 128 + signal when stopped)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MedloraError as err:
            code = err.exit_code
            print(f"medlora: {'error' if code == 2 else 'stopped'}: {err}", file=sys.stderr)
            sys.exit(code)

    return wrapper
