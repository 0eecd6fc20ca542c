"""User-facing errors: raised for bad input, printed as one line by the CLI (no traceback)."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""
