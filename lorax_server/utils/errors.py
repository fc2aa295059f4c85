"""Errors that mean "this request is bad" (answered as INVALID_ARGUMENT), as opposed to a bug."""


class RequestError(ValueError):
    """A request the engine refuses (bad input); nothing it touched is kept."""


# gRPC carries a status message in its trailing metadata, whose size is capped (8 KiB by default): a message
# echoing an unbounded input (a 100k-character adapter path) would turn into a metadata error instead.
MAX_MESSAGE_CHARS = 1000


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` cut to `limit` characters, saying how much was cut."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... ({len(message) - limit} more characters cut)"
