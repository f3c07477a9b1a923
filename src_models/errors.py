"""The one exception type that carries a message meant for the user.

Every error that a user can cause (bad path, bad shape, bad checkpoint, ...) is raised as
:class:`R2UNetError` with a single-line message that says what is wrong and what to do. The CLI
prints it as one line on stderr; the napari plugin shows it as a notification. Anything else
that escapes is a bug.
"""

from __future__ import annotations


class R2UNetError(Exception):
    """A user-facing error: one line, naming the value or file and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class CancelledError(R2UNetError):
    """Raised when a long computation stops because the caller asked it to."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)
