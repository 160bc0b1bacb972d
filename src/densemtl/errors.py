"""Errors a person can act on: one or two lines naming the option or file and the fix.

Mistakes in how densemtl is called (an option, a config value, a file) surface as exceptions
raised by densemtl's own code, sometimes wrapped by the libraries that call it (jsonargparse
wraps every error of a class it instantiates). :func:`explain` finds densemtl's message in such
a chain; the ``densemtl`` command prints it instead of a traceback (``--debug`` or
``DENSEMTL_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path

PACKAGE = str(Path(__file__).resolve().parent)


class UsageError(ValueError):
    """densemtl was called in a way that cannot work (an option, a value, a missing file)."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _raised_by_us(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and last.tb_frame.f_code.co_filename.startswith(PACKAGE)


# exceptions that describe a mistake of the user when densemtl raises them
USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError,
               NotADirectoryError, PermissionError)


def explain(exc: BaseException) -> str | None:
    """The message to show for ``exc``, or None when it is not a user's mistake (a bug: the
    traceback should be shown)."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, UsageError):
            return _clean(str(e))
    for e in chain:  # the first one densemtl raised itself, from the outside in
        if isinstance(e, USER_ERRORS) and _raised_by_us(e):
            return _clean(_message(e))
    from .models.encoders import PretrainedWeightsError

    for e in chain:
        if isinstance(e, (PretrainedWeightsError, FileNotFoundError, PermissionError)):
            return _clean(_message(e))
    wrapped = _jsonargparse_message(str(exc))
    return _clean(wrapped) if wrapped else None


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:  # str(KeyError) adds quotes
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        return f"{e.strerror or e}: {e.filename}"
    return str(e)


def _jsonargparse_message(text: str) -> str | None:
    """The first real error of a jsonargparse "Does not validate against any of ..." report."""
    if "Does not validate" not in text:
        return None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("- ") and "Expected a <class 'NoneType'>" not in line:
            return line[2:]
    return None


def _clean(text: str) -> str:
    """At most two lines, no library type names."""
    text = re.sub(r"\s+\(type: [^)]*\)", "", text.strip())
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[:2]) if lines else "unknown error"


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("DENSEMTL_DEBUG", "") not in ("", "0")
