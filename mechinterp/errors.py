"""What the suite raises on purpose.

Each class is also the built-in exception it refines (an `InputError` is a `ValueError`, an
`UnsupportedError` a `NotImplementedError`), so `except ValueError` keeps working. The command line
prints a `MechinterpError` as one line naming the problem and the fix (exit status 2); anything else
that escapes the suite is a crash and is shown with its traceback (exit status 1).
"""

from __future__ import annotations

import errno


class MechinterpError(Exception):
    """An error the suite raises on purpose; its message names the problem and the fix."""


class InputError(MechinterpError, ValueError):
    """An input the suite cannot use: a config, a selection, a data file, a prompt, a run
    directory; the message names which one, where, and what it accepts."""


class UnsupportedError(MechinterpError, NotImplementedError):
    """Something the suite refuses because it cannot do it correctly on this model or with these
    settings (named in the message, with what to use instead)."""


class SetupError(MechinterpError, RuntimeError):
    """Something the environment lacks (an optional package, Chromium, a data package); the
    message says what to install."""


class MissingFileError(MechinterpError, FileNotFoundError):
    """A file the suite needs is not where it should be; the message says how to get it."""


class DiskFullError(MechinterpError, OSError):
    """The disk (or quota) filled while writing; the message names the path being written."""


#: An operating-system refusal of a named file is the user's to fix, like a `MechinterpError`.
FILE_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                         errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EEXIST})  # fmt: skip


def on_purpose(e: BaseException) -> bool:
    """Whether `e` is an error to print as one line: one the suite raises on purpose, or the
    operating system refusing a file it names."""
    if isinstance(e, MechinterpError):
        return True
    return isinstance(e, OSError) and e.filename is not None and e.errno in FILE_ERRNOS


def crash_hint(e: BaseException) -> str:
    """What to try after a crash, where the kind of crash says (out of memory); else ""."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return (" Out of memory: `mechinterp plan COMMAND ...` predicts each stage's peak; "
                "lower the batch size or the lengths, or run on a larger machine.")  # fmt: skip
    return ""
