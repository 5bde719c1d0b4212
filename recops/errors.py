"""The one exception type recops raises for bad input or a failed step."""


class RecopsError(Exception):
    """A user-facing failure: the message names the input and the fix."""
