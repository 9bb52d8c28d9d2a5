"""Errors that mean "bad input", not "bug": the CLI prints them as one line and exits with code 2."""


class UsageError(ValueError):
    """Bad input from the user: a model that cannot be found, a layer out of range, an empty prompt file..."""
