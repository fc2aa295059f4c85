"""Errors that mean "this request is bad" (answered as INVALID_ARGUMENT), as opposed to a bug."""


class RequestError(ValueError):
    """A request the engine refuses (bad input); nothing it touched is kept."""
