"""Upload encodings: a client's model as it crosses the wire, and how many bytes it takes (numpy only).

The global model goes down in the model's own dtype (float32). What a client sends back is encoded as the
scenario's ``training.upload`` says, one of :data:`ENCODINGS`:

- ``float32``: the arrays as they are;
- ``float16``: every floating array cast to float16 (half the bytes). Values beyond float16's range
  (±65504) become ±inf, which the server rejects as a non-finite update;
- ``int8``: every floating array as int8 with one symmetric float32 scale per tensor,
  ``x ≈ q · s`` with ``s = max|x| / 127`` (a quarter of the bytes, plus 4 per tensor). The scale travels as
  its own float32 array of shape ``(1,)`` under ``<name>#scale``. A tensor holding NaN or ±inf is sent as
  zeros with a NaN scale, so it decodes to NaN and screening still rejects it.

Arrays that are not floating point pass unchanged in every encoding. The client encodes right before
sending (after any adversary has had its way) and validates the model it sends, decoded; the server decodes
before screening (``fed_deq.screening.decode_upload``), into the dtypes of the model it sent.

Bytes on the wire (``payload_bytes``) are the tensor payload of a record: Σ elements × item size over its
arrays, scales included. It is what Flower's ArrayRecord carries as array data; the ``.npy`` header Flower
adds to each array (128 bytes) and the message framing are left out: they do not depend on the model or
on its encoding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

Arrays = dict[str, np.ndarray]

#: Suffix of the key carrying an int8 tensor's scale ('#' is never part of a torch state-dict name).
SCALE_SUFFIX = "#scale"
#: Largest int8 code used; symmetric, so -128 is never produced.
INT8_LEVELS = 127


@dataclass(frozen=True)
class Encoding:
    """How floating arrays travel: the wire dtype (None: as they are) and whether a per-tensor scale goes along."""

    summary: str
    wire_dtype: np.dtype | None
    scaled: bool = False


#: Upload encoding name → what it does (the choices of ``training.upload``).
ENCODINGS: Mapping[str, Encoding] = MappingProxyType({
    "float32": Encoding("the arrays as they are", None),
    "float16": Encoding("floating arrays cast to float16", np.dtype(np.float16)),
    "int8": Encoding("floating arrays as int8 codes with a symmetric float32 scale per tensor",
                     np.dtype(np.int8), scaled=True),
})


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of a record on the wire: Σ elements × item size over its arrays (see the module docstring)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def upload_bytes(arrays: Mapping[str, np.ndarray], encoding: str) -> int:
    """``payload_bytes(encode(arrays, encoding))``, from shapes and dtypes alone."""
    spec = _spec(encoding)
    total = 0
    for value in arrays.values():
        value = np.asarray(value)
        if spec.wire_dtype is None or not _is_float(value):
            total += value.nbytes
        else:
            total += value.size * spec.wire_dtype.itemsize + (np.dtype(np.float32).itemsize if spec.scaled else 0)
    return int(total)


def encode(arrays: Mapping[str, np.ndarray], encoding: str) -> Arrays:
    """The arrays as a client sends them under ``encoding`` (key order kept, a scale after its tensor)."""
    spec = _spec(encoding)
    if spec.wire_dtype is None:
        return dict(arrays)
    wire: Arrays = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if not _is_float(value):
            wire[name] = value
        elif spec.scaled:
            wire[name], wire[name + SCALE_SUFFIX] = _to_int8(value)
        else:
            with np.errstate(over="ignore"):  # out of float16's range: inf, rejected by the server
                wire[name] = value.astype(spec.wire_dtype)
    return wire


def decode(wire: Mapping[str, np.ndarray], encoding: str, reference: Mapping[str, np.ndarray]) -> Arrays:
    """An upload back in the dtypes of ``reference`` (the model that was sent down).

    Only arrays whose reference is floating point are decoded; anything else passes unchanged for screening
    to judge (an unknown key, a wrong shape). Raises ValueError for an upload that does not follow the
    encoding: a floating array in another dtype, an int8 tensor without a one-element floating scale, or a
    scale without its tensor. Non-finite values decode to non-finite values; nothing here warns or raises on them.
    """
    spec = _spec(encoding)
    if spec.wire_dtype is None:
        return dict(wire)
    scales = {k for k in wire if k.endswith(SCALE_SUFFIX)} if spec.scaled else set()
    used: set[str] = set()
    decoded: Arrays = {}
    for name, value in wire.items():
        if name in scales:
            continue
        value, ref = np.asarray(value), reference.get(name)
        if ref is None or not _is_float(np.asarray(ref)):
            decoded[name] = value
            continue
        if value.dtype != spec.wire_dtype:
            raise ValueError(f"{name!r} arrived as {value.dtype}, a {encoding} upload sends {spec.wire_dtype}")
        dtype = np.asarray(ref).dtype
        if spec.scaled:
            decoded[name] = _from_int8(value, _scale_of(wire, name), dtype)
            used.add(name + SCALE_SUFFIX)
        else:
            decoded[name] = value.astype(dtype)
    if scales - used:
        raise ValueError(f"scale without its tensor: {', '.join(sorted(scales - used))}")
    return decoded


def _to_int8(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One tensor as int8 codes and its float32 scale, ``x ≈ q · s``; |x − q·s| ≤ s / 2."""
    with np.errstate(invalid="ignore", over="ignore"):
        peak = float(np.max(np.abs(value))) if value.size else 0.0
    if not math.isfinite(peak):
        # A NaN scale decodes the whole tensor to NaN: the update stays non-finite and is rejected.
        return np.zeros(value.shape, np.int8), np.array([np.nan], np.float32)
    scale = np.float32(peak / INT8_LEVELS)
    if scale == 0:
        return np.zeros(value.shape, np.int8), np.array([0.0], np.float32)
    codes = np.clip(np.rint(value / scale.astype(value.dtype)), -INT8_LEVELS, INT8_LEVELS)
    return codes.astype(np.int8), np.array([scale], np.float32)


def _from_int8(codes: np.ndarray, scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``q · s`` in ``dtype``; a huge or non-finite scale gives inf/NaN for screening to reject, silently."""
    with np.errstate(over="ignore", invalid="ignore"):
        return codes.astype(dtype) * scale.astype(dtype).reshape(())


def _scale_of(wire: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    scale = wire.get(name + SCALE_SUFFIX)
    if scale is None:
        raise ValueError(f"{name!r} arrived without its scale {name + SCALE_SUFFIX!r}")
    scale = np.asarray(scale)
    if scale.size != 1 or not _is_float(scale):
        raise ValueError(f"the scale of {name!r} must be one floating number, got {scale.dtype} {scale.shape}")
    return scale


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def _spec(encoding: str) -> Encoding:
    try:
        return ENCODINGS[encoding]
    except KeyError:
        raise ValueError(f"unknown upload encoding {encoding!r}; valid: {', '.join(ENCODINGS)}") from None
