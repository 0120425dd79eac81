"""Errors a user can act on. Each carries a one-line message and the process exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # verification or budget failed: the build ran, the result is not good enough
EXIT_BAD_INPUT = 2  # the user's input is wrong: fix it and run again
EXIT_TOOL = 3  # a backend tool failed on valid input


class EdgekitError(Exception):
    """Base: a message meant for the user, on one line, saying what to do."""

    exit_code = EXIT_TOOL

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class BadInput(EdgekitError):
    exit_code = EXIT_BAD_INPUT


class UnsupportedOp(BadInput):
    """An op of the model that a backend the target needs cannot run."""


class BackendUnavailable(EdgekitError):
    exit_code = EXIT_BAD_INPUT


class VerificationFailed(EdgekitError):
    exit_code = EXIT_FAILED


class DeviceUnreachable(BadInput):
    """A device that cannot be reached or trusted over SSH (refused, unknown or changed host key, no key)."""
