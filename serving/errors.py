"""The serving layer's exception: every client/server failure, carrying the server's own message."""

import numpy as np

from recops.errors import RecopsError


class ServingError(RecopsError):
    """A request or model-control call failed (unknown model, bad shape/dtype, timeout, no server)."""


def require_finite(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` if every floating-point entry is finite, else a ServingError: a NaN score is a broken model."""
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise ServingError(f"{what} returned {bad} non-finite (NaN/inf) values of {values.size}; the model is broken")
    return values
