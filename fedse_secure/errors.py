"""The one base class of every error the library raises on purpose.

Each error message is one line that names the problem and the fix; the CLI catches :class:`FedseError` by
type, prints that line and exits with :attr:`FedseError.exit_code`. Anything else that escapes is a bug.
Subclasses keep a second, familiar base (``ValueError`` for bad input, ``RuntimeError`` for a failed
operation) so callers that only know Python's built-ins still catch them.
"""

from __future__ import annotations


class FedseError(Exception):
    """An expected failure: bad input, a refused round, a failed verification. Never a bug."""

    #: Exit status of the CLI command that hit it: 2 = bad input or refused operation (the default).
    exit_code: int = 2
