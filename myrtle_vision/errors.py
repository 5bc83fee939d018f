"""The one error type that means "the user gave us something wrong".

Scripts catch :class:`UserError` (see :func:`myrtle_vision.cli.main_guard`), print its message as
one line on stderr and exit with status 2. Anything else is a bug and keeps its traceback.
"""

import difflib


def did_you_mean(word: str, choices, otherwise: str = "") -> str:
    """`` (did you mean 'X'?)`` for the choice closest to ``word``, or ``otherwise`` when none is close."""
    hint = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else otherwise


def reason(e: BaseException) -> str:
    """What went wrong, for one line: an OSError's strerror, else the first line of the message, else the type."""
    text = getattr(e, "strerror", None) or str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class UserError(Exception):
    """A mistake in the user's input: a config, a dataset, a checkpoint, a command-line flag."""

    exit_code = 2

    def __init__(self, message: str):
        # A UserError raised inside a DataLoader worker comes back to the main process re-created
        # from a message that embeds the worker's traceback; keep only the original message.
        if "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class ConfigError(UserError):
    """A config file field that is missing, unknown, of the wrong type or impossible."""

    def __init__(self, path, field: str, problem: str):
        if not field.isprintable():  # a field name typed with a newline or a control character
            field = field.encode("unicode_escape").decode("ascii")
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {field}: {problem}" if field else f"{path}: {problem}")

    def __reduce__(self):  # keep it picklable across worker processes
        return (ConfigError, (self.path, self.field, self.problem))


class TrainingStopped(UserError):
    """A run that cannot go on (a checkpoint that cannot be written, a loss that is not finite): one line, exit 3."""

    exit_code = 3


class WriteFailed(TrainingStopped):
    """A file that could not be written once the work was done or under way (a full disk, a file-size limit,
    a folder made read-only mid-run); what was there before is intact. One line, exit 3."""
