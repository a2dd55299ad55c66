"""The one exception type that means "the user asked for something invalid"."""


class GemminerError(Exception):
    """Bad input: the CLI prints the message as one line and exits with code 2."""
