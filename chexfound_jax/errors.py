"""Errors a program reports in one line (no traceback): the user's input, not the code, is at fault."""


class ConfigError(ValueError):
    """A config that cannot run, with a message naming the key."""
