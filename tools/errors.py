"""Errors the tools raise for bad input. The command line (cli.py) prints them as
one line with exit code 2; library callers catch them by type."""


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a checkpoint): the
    message names it and says what to do."""
