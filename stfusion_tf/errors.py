"""The error a user can fix: missing data or model, a wrong flag, an unreadable file.

Library code raises ``UserError`` with a message that names the problem and,
where there is one, the command that fixes it; ``main`` prints it as one line
and exits with a non-zero code, without a traceback (``--debug`` shows it).
Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem the user can fix (subclass of ValueError, so callers that catch
    ValueError for bad arguments keep working)."""


#: What the operating system says when a write cannot complete for lack of room.
_NO_ROOM = ("No space left on device", "File too large", "Disk quota exceeded")
_NO_ACCESS = ("Permission denied", "Read-only file system", "Operation not permitted")
_NO_ROOM_ERRNO = (28, 27, 122)  # ENOSPC, EFBIG, EDQUOT
_NO_ACCESS_ERRNO = (13, 30, 1)  # EACCES, EROFS, EPERM


def environment_message(e: BaseException) -> str | None:
    """One line for an error of the machine rather than the program (a full disk, a
    read-only or foreign directory), from Python's OSError or TensorFlow's errors; None
    for anything else."""
    if isinstance(e, OSError):
        errno, text = e.errno, f"{e.strerror or e}{'; ' + str(e.filename) if e.filename else ''}"
        room, access = errno in _NO_ROOM_ERRNO, errno in _NO_ACCESS_ERRNO
    elif type(e).__module__.startswith("tensorflow"):
        text = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        room = any(s in text for s in _NO_ROOM)
        access = any(s in text for s in _NO_ACCESS)
    else:
        return None
    if room:
        return (f"the disk is full ({text}): artefacts are written whole or not at all, so the "
                "previous complete one is kept; free space and re-run the same command")
    if access:
        return (f"cannot write or read a file ({text}); check the permissions of --data_dir, "
                "--model_dir and --export_dir")
    return None
