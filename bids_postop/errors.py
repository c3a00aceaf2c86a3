"""Domain exceptions and the documented exit codes of the command-line tools.

Every error message says what failed, which file, the bad value and, where there is one, the fix.
"""

from __future__ import annotations

from pathlib import Path

# Documented exit codes (README, "Exit codes"). sysexits.h names where one fits.
EXIT_OK = 0
EXIT_PARTICIPANT_FAILED = 1  # at least one participant failed; the others finished
EXIT_USAGE = 64  # EX_USAGE: bad command line
EXIT_NO_INPUT = 66  # EX_NOINPUT: no usable input (missing dataset, no participant to process)
EXIT_CANT_CREATE = 73  # EX_CANTCREAT: output or work directory cannot be written


class BidsPostopError(Exception):
    """Base class of every error the application raises on purpose."""

    exit_code = EXIT_PARTICIPANT_FAILED


class UsageError(BidsPostopError):
    """The command line or a settings file is wrong."""

    exit_code = EXIT_USAGE


class InputDataError(BidsPostopError):
    """An input file or dataset cannot be used; the message names the file."""

    exit_code = EXIT_NO_INPUT

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class ModelError(BidsPostopError):
    """A model folder, model card or model archive is missing, damaged or inconsistent."""

    exit_code = EXIT_USAGE


class OutputError(BidsPostopError):
    """Outputs cannot be written where asked."""

    exit_code = EXIT_CANT_CREATE
