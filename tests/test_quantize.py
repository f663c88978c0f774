"""Upload encodings (fed_deq/quantize.py): error bounds, bytes, what the server makes of bad uploads."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fed_deq import quantize
from fed_deq.screening import Rejected, check_payload, decode_upload
from wire.records import from_array_record, to_array_record

SUFFIX = quantize.SCALE_SUFFIX


def model(seed: int = 0) -> dict[str, np.ndarray]:
    """A small float32 model with one integer buffer (which no encoding may touch)."""
    rng = np.random.default_rng(seed)
    return {"encoder.weight": rng.normal(0, 0.7, (16, 8)).astype(np.float32),
            "encoder.bias": rng.normal(0, 0.05, (16,)).astype(np.float32),
            "cell.weight": rng.uniform(-3, 3, (4, 4, 3)).astype(np.float32),
            "steps": np.array([7, 9], dtype=np.int64)}


FLOATS = 16 * 8 + 16 + 4 * 4 * 3       # 192 floating elements in 3 tensors
INT_BYTES = 2 * 8


def test_float32_sends_the_arrays_as_they_are():
    arrays = model()
    wire = quantize.encode(arrays, "float32")
    assert all(wire[k] is arrays[k] for k in arrays) and list(wire) == list(arrays)
    assert quantize.decode(wire, "float32", arrays).keys() == arrays.keys()
    assert quantize.payload_bytes(wire) == FLOATS * 4 + INT_BYTES


def test_float16_halves_the_floats_and_rounds_to_half_precision():
    arrays = model()
    wire = quantize.encode(arrays, "float16")
    assert quantize.payload_bytes(wire) == FLOATS * 2 + INT_BYTES
    decoded = quantize.decode(wire, "float16", arrays)
    for name, value in arrays.items():
        assert decoded[name].dtype == value.dtype and decoded[name].shape == value.shape
        # float16 keeps 11 significant bits: relative error <= 2^-11 in the normal range
        assert np.all(np.abs(decoded[name] - value) <= np.maximum(np.abs(value) * 2.0**-11, 2.0**-25))
    assert wire["steps"].dtype == np.int64 and np.array_equal(decoded["steps"], arrays["steps"])


def test_int8_is_about_a_quarter_and_within_half_a_step_of_each_value():
    arrays = model(1)
    wire = quantize.encode(arrays, "int8")
    assert list(wire) == ["encoder.weight", "encoder.weight" + SUFFIX, "encoder.bias", "encoder.bias" + SUFFIX,
                          "cell.weight", "cell.weight" + SUFFIX, "steps"]
    assert quantize.payload_bytes(wire) == FLOATS + 3 * 4 + INT_BYTES
    decoded = quantize.decode(wire, "int8", arrays)
    assert list(decoded) == list(arrays)
    for name in ("encoder.weight", "encoder.bias", "cell.weight"):
        x, step = arrays[name], float(np.max(np.abs(arrays[name]))) / 127
        assert wire[name].dtype == np.int8 and int(np.max(np.abs(wire[name]))) == 127
        assert decoded[name].dtype == np.float32
        assert np.max(np.abs(decoded[name] - x)) <= step / 2 * (1 + 1e-5)
    assert np.array_equal(decoded["steps"], arrays["steps"])


@pytest.mark.parametrize("encoding", sorted(quantize.ENCODINGS))
def test_upload_bytes_counts_what_encode_produces(encoding):
    arrays = model(2)
    assert quantize.upload_bytes(arrays, encoding) == quantize.payload_bytes(quantize.encode(arrays, encoding))


def test_an_all_zero_tensor_survives_int8():
    arrays = {"w": np.zeros((3, 2), np.float32)}
    decoded = quantize.decode(quantize.encode(arrays, "int8"), "int8", arrays)
    assert np.array_equal(decoded["w"], arrays["w"])


@pytest.mark.parametrize("encoding", ["float16", "int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6])
def test_non_finite_or_out_of_range_updates_still_fail_screening_after_decoding(encoding, bad):
    reference = model()
    arrays = {k: v.copy() for k, v in reference.items()}
    arrays["encoder.bias"][3] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # encoding and decoding never warn, whatever the values
        wire = quantize.encode(arrays, encoding)
        decoded = decode_upload(wire, encoding, reference)
    if encoding == "int8" and bad == 1e6:
        # int8 has no range limit (the scale grows with the tensor): a finite value stays finite
        assert np.all(np.isfinite(decoded["encoder.bias"])) and decoded["encoder.bias"][3] == pytest.approx(1e6)
        return
    assert not np.all(np.isfinite(decoded["encoder.bias"]))
    with pytest.raises(Rejected, match="non-finite"):
        check_payload(decoded, {}, reference)


def test_a_huge_int8_scale_overflows_to_inf_quietly_and_is_rejected():
    reference = {"w": np.ones((2, 2), np.float32)}
    wire = {"w": np.full((2, 2), 127, np.int8), "w" + SUFFIX: np.array([3e38], np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_upload(wire, "int8", reference)
    with pytest.raises(Rejected, match="non-finite"):
        check_payload(decoded, {}, reference)


@pytest.mark.parametrize("encoding, wire, reason", [
    ("float16", {"w": np.ones(3, np.float32)}, "arrived as float32"),
    ("int8", {"w": np.ones(3, np.float16)}, "arrived as float16"),
    ("int8", {"w": np.ones(3, np.int8)}, "without its scale"),
    ("int8", {"w": np.ones(3, np.int8), "w" + SUFFIX: np.ones(2, np.float32)}, "one floating number"),
    ("int8", {"w": np.ones(3, np.int8), "w" + SUFFIX: np.ones(1, np.int32)}, "one floating number"),
    ("int8", {"w": np.ones(3, np.int8), "w" + SUFFIX: np.ones(1, np.float32), "v" + SUFFIX: np.ones(1, np.float32)},
     "scale without its tensor"),
])
def test_an_upload_that_breaks_its_encoding_is_rejected_with_the_reason(encoding, wire, reason):
    with pytest.raises(Rejected, match=f"unreadable {encoding} upload: .*{reason}"):
        decode_upload(wire, encoding, {"w": np.zeros(3, np.float32)})


def test_unknown_keys_pass_decoding_for_screening_to_reject():
    reference = {"w": np.zeros(3, np.float32)}
    wire = {"w": np.ones(3, np.float16), "extra": np.ones(2, np.float16)}
    decoded = decode_upload(wire, "float16", reference)
    assert decoded["extra"].dtype == np.float16
    with pytest.raises(Rejected):
        check_payload(decoded, {}, reference)


def test_unknown_encoding_is_a_value_error_naming_the_valid_ones():
    with pytest.raises(ValueError, match="float32, float16, int8"):
        quantize.encode(model(), "float8")


@pytest.mark.parametrize("encoding", sorted(quantize.ENCODINGS))
def test_every_encoding_survives_flowers_array_record_with_the_same_bytes(encoding):
    """The Flower path measures what it received after ArrayRecord → numpy: the same number as in-process."""
    arrays = model(3)
    wire = quantize.encode(arrays, encoding)
    received = from_array_record(to_array_record(wire))
    assert list(received) == list(wire)
    for name, value in wire.items():
        assert received[name].dtype == value.dtype and received[name].shape == value.shape
        assert np.array_equal(received[name], value)
    assert quantize.payload_bytes(received) == quantize.payload_bytes(wire)
    # Each Array's serialised data is the payload plus a small .npy header, which payload_bytes leaves out.
    record = to_array_record(wire)
    assert all(0 < len(record[name].data) - value.nbytes <= 128 for name, value in wire.items())
