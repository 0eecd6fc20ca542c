"""User-facing errors: raised for bad input, printed as one line by the CLI (no traceback)."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""


def shown_list(items, limit: int = 20) -> str:
    """A list for a one-line message: its first `limit` items and how many more (a task may have 100,000 labels)."""
    items = [str(item) for item in items]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + more + "]"


def short_line(text: str, limit: int = 2000) -> str:
    """An error line cut to `limit` characters (the middle goes): a message quoting a huge value stays readable."""
    text = " ".join(str(text).splitlines()) if "\n" in str(text) else str(text)
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ... ({len(text) - limit} characters cut) ... {text[-half:]}"


def unknown(key: str, value, choices) -> UserError:
    """The one-line error of a setting whose value is not one of its choices (a registry's names)."""
    choices = list(choices)
    listed = ", ".join("null" if choice is None else str(choice) for choice in choices[:20])
    listed += f", ... ({len(choices) - 20} more)" if len(choices) > 20 else ""
    return UserError(f"{key}={value} is unknown; choose one of {listed}")
