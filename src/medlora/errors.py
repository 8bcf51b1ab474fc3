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


MAX_MESSAGE_CHARS = 4000  # an error message is a few lines; a value echoed into it is cut, never megabytes


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit:,} more characters)"


def shown(value, limit: int = 80) -> str:
    """`repr(value)` for an error message, cut to `limit` characters: an echoed value never floods the screen."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_os_error(err: OSError) -> str:
    """One line for what the operating system refused, naming the path."""
    import errno

    path = err.filename if err.filename is not None else "a file"
    what = {errno.ENOSPC: "no space left on device writing", errno.EROFS: "read-only file system, cannot write",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.ENOENT: "no such file or directory", errno.ELOOP: "symbolic link loop",
            errno.EISDIR: "is a directory, not a file", errno.ENOTDIR: "a parent is not a directory",
            errno.EDQUOT: "disk quota exceeded writing", errno.ENAMETOOLONG: "file name too long"}.get(err.errno)
    return f"{what}: {path}" if what else f"{err.strerror or type(err).__name__}: {path}"


def write_traceback() -> str:
    """The full traceback of the exception being handled, in a file of its own; returns its path."""
    import os
    import tempfile
    import time
    import traceback

    path = os.path.join(tempfile.gettempdir(), f"medlora-traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt")
    try:
        with open(path, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(traceback.format_exc())
    except OSError:
        return "(could not be written)"
    return path


def main_guard(func):
    """Every entry point's last word: an expected error is one clear line and exit 2 (128 + signal when stopped
    by one); what the file system refused is one line naming the path (exit 2); anything else is a bug in medlora:
    one line `medlora: internal error: ...` naming the file the full traceback went to, exit 1.
    MEDLORA_DEBUG=1 re-raises instead (for a debugger)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import os

        try:
            return func(*args, **kwargs)
        except SystemExit:
            raise
        except MedloraError as err:
            code = err.exit_code
            print(f"medlora: {'error' if code == 2 else 'stopped'}: {bounded(err)}", file=sys.stderr)
            sys.exit(code)
        except KeyboardInterrupt:
            print("medlora: stopped: interrupted (SIGINT); the last committed checkpoint, if any, is intact",
                  file=sys.stderr)
            sys.exit(130)
        except OSError as err:
            if os.environ.get("MEDLORA_DEBUG"):
                raise
            print(f"medlora: error: {bounded(describe_os_error(err))}", file=sys.stderr)
            sys.exit(2)
        except Exception as err:  # noqa: BLE001 - the last resort: a bug of medlora's, never a bare traceback
            if os.environ.get("MEDLORA_DEBUG"):
                raise
            path = write_traceback()
            print(f"medlora: internal error: {type(err).__name__}: {bounded(err, 300)} (full traceback in {path}; "
                  "please report it)", file=sys.stderr)
            sys.exit(1)

    return wrapper
