"""User-facing errors: each carries one line that tells the user what went wrong and what to do."""


class CxrError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line, exit 2."""


class ConfigError(CxrError, ValueError):
    """A configuration value is invalid. Every config dataclass raises it from `__post_init__`:
    a `ValueError` to code that builds configs, one line (`cxr: error: ...`) from the CLI."""


class ImageRejected(CxrError):
    """One input image cannot be used; `reason` goes into the manifest and the summary."""

    def __init__(self, reason: str, path: str | None = None):
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its class name if the message is empty), for
    one-line errors and manifest reasons."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
