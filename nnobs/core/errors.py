"""The one exception type users see: a problem with their input, stated in one line."""


class NnobsError(Exception):
    """Bad input or an impossible request. The CLI prints ``error: <message>`` and exits 2.

    The message names the problem and what to do about it, in one line.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name): for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
