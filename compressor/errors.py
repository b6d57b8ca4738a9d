"""Typed errors. Each carries the process exit code the CLI maps it to.

Exit codes are public API (README, ``compress --help``) and never renumbered:
0 success, 1 anything else, 2 bad input or usage, 3 a gate failed,
4 verification failed.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_VERIFICATION_FAILED = 4


class CompressorError(Exception):
    """Base class of every error compressor raises on purpose."""

    exit_code = EXIT_OTHER


class BadInputError(CompressorError, ValueError):
    """Bad input or usage: the message names the problem and the fix."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(BadInputError):
    """A recipe key is unknown, of the wrong type, or out of range."""


class CheckpointError(BadInputError):
    """A checkpoint cannot be read, is refused (pickle), or does not fit the architecture."""


class DataError(BadInputError):
    """A data spec cannot be read or does not fit the model."""


class OutputError(BadInputError):
    """The output directory cannot be written."""


class VerificationError(CompressorError):
    """The pruned or exported model disagrees with the sparse model."""

    exit_code = EXIT_VERIFICATION_FAILED


class DivergenceError(CompressorError):
    """Training produced a non-finite loss; the last good state was kept."""

    exit_code = EXIT_OTHER
