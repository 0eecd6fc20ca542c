"""User-facing errors: raised for bad input, printed as one line by the CLI (no traceback)."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""


def unknown(key: str, value, choices) -> UserError:
    """The one-line error of a setting whose value is not one of its choices (a registry's names)."""
    listed = ", ".join("null" if choice is None else str(choice) for choice in choices)
    return UserError(f"{key}={value} is unknown; choose one of {listed}")
