"""The error a user can fix: missing data or model, a wrong flag, an unreadable file.

Library code raises ``UserError`` with a message that names the problem and,
where there is one, the command that fixes it; ``main`` prints it as one line
and exits with a non-zero code, without a traceback (``--debug`` shows it).
Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem the user can fix (subclass of ValueError, so callers that catch
    ValueError for bad arguments keep working)."""
