"""The serving layer's exception: every client/server failure, carrying the server's own message."""

from recops.errors import RecopsError


class ServingError(RecopsError):
    """A request or model-control call failed (unknown model, bad shape/dtype, timeout, no server)."""
