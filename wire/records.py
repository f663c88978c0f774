"""Conversions between Flower's ArrayRecord and the plain numpy arrays the core works on."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays keyed by state-dict name → an ArrayRecord (order kept)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord → numpy arrays keyed by name."""
    return {name: array.numpy() for name, array in record.items()}
