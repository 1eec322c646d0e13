"""The one base of swinkit's expected failures, and what the command line reports in one line.

An expected failure is a bad input or a refused operation: a checkpoint that cannot be read,
a config key that cannot be used, a run folder another run holds. Its message names the file,
key or argument and says why; `swinkit` prints it as one line and exits with status 2.
Anything else that escapes a command is a bug: the traceback is printed with a request to
report it (status 1).
"""
from __future__ import annotations


class SwinkitError(Exception):
    """An expected failure; the message names the file, key or argument and says why."""


# What the command line reports in one line (exit status 2): swinkit's own errors, and the standard
# ones a bad input raises on its way through the Python API (argument values, files, disks, memory).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (SwinkitError, ValueError, OSError, MemoryError)
