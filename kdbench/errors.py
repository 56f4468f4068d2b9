"""The one exception type the command line turns into a one-line message."""


class KdbenchError(Exception):
    """A user-facing error: the message names what is wrong and how to fix it."""
