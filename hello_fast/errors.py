"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class HelloError(Exception):
    """A problem with the user's input (data, config, artifact) that the user can fix."""
