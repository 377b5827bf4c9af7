"""One error type for everything the user got wrong; the CLI turns it into one line and exit 2."""


class UserError(Exception):
    """Bad input: an unknown name, a bad size, a missing or incompatible file."""
