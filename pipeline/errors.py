"""The one base class of clipgram's expected errors: what a user can cause and fix.

The CLI prints any of them as one line (their messages say what to do) and exits 2, and
so a full disk (`disk_full`), whichever library met it; anything else is a bug and keeps
its traceback.
"""

import errno

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")  # DuckDB's, Arrow's words


class ClipgramError(Exception):
    """An expected error whose message says what to do."""


def disk_full(error: BaseException | None) -> bool:
    """Whether `error` (or one it was raised from) is a write that found the disk full: an
    OSError saying so, or DuckDB's or Arrow's error quoting the system's message."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if says_disk_full(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def says_disk_full(text: str) -> bool:
    return any(words in text for words in _DISK_FULL_TEXTS)
