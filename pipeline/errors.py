"""The one base class of clipgram's expected errors: what a user can cause and fix.

The CLI prints any of them as one line (their messages say what to do) and exits 2;
anything else is a bug and keeps its traceback.
"""


class ClipgramError(Exception):
    """An expected error whose message says what to do."""
