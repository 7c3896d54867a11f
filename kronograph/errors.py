"""The one exception kronograph raises for bad input: its message names the problem and the fix."""


class KronographError(ValueError):
    """Bad input from the user (a model, a file, an option). The CLI prints it as one line, exit 2."""
