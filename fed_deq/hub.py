"""Hugging Face hub datasets as arrays: ``load_hub`` pools a hub dataset's splits, ``from_hf_dataset`` converts
one local ``datasets.Dataset`` (image or array column, label column) to float32/int64 arrays."""

from __future__ import annotations

import numpy as np

from fed_deq.errors import InputError

IMAGE_KEYS = ("image", "img")
LABEL_KEYS = ("label", "fine_label")

# Convert hub images in chunks so a 60k-image dataset never sits in memory twice as float32.
_CONVERT_CHUNK = 4096


def load_hub(name: str, image_key: str | None, label_key: str | None) -> tuple[np.ndarray, np.ndarray, int]:
    """All splits of hub dataset ``name`` pooled: ``(x float32, y int64, num_classes)`` (needs the network)."""
    import datasets

    try:
        splits = datasets.load_dataset(name)
    except Exception as exc:  # any failure (offline, unknown name, bad config) means the same to the user
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"dataset.name: cannot load hub dataset {name!r} ({detail}); offline, use 'mnist1d' or 'digits'"
        ) from exc
    if not isinstance(splits, datasets.DatasetDict):
        splits = datasets.DatasetDict({"train": splits})
    xs, ys, num_classes = [], [], 0
    for split in splits.values():
        x, y = from_hf_dataset(split, image_key, label_key)
        xs.append(x)
        ys.append(y)
        num_classes = max(num_classes, _num_classes(split, label_key, y))
    if len({x.shape[1:] for x in xs}) != 1:
        raise InputError(f"dataset.name: splits of {name!r} have different sample shapes")
    return np.concatenate(xs), np.concatenate(ys), num_classes


def from_hf_dataset(ds, image_key: str | None = None, label_key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Convert a local ``datasets.Dataset`` to ``(x float32, y int64)`` arrays.

    The feature column may hold PIL images or arrays; it defaults to ``image``/``img`` and the label column
    to ``label``/``fine_label``. 8-bit pixels are scaled to [0, 1]; 2-D samples become ``(N, 1, H, W)``,
    HWC images become ``(N, C, H, W)``, 1-D samples stay ``(N, D)``.
    """
    import datasets

    image_key = _resolve_column(ds, image_key, IMAGE_KEYS, "image_key")
    label_key = _resolve_column(ds, label_key, LABEL_KEYS, "label_key")
    if ds.num_rows == 0:
        raise InputError("dataset: the hub dataset has no rows")
    is_image = isinstance(ds.features[image_key], datasets.Image)
    x = _convert_features(ds.with_format("numpy"), image_key, is_image)
    y = np.asarray(ds.with_format("numpy")[label_key][:])
    if not np.issubdtype(y.dtype, np.integer) or np.any(y < 0):
        raise InputError(f"dataset.label_key: column {label_key!r} must hold integers >= 0, got dtype {y.dtype}")
    return x, y.astype(np.int64)


def _resolve_column(ds, given: str | None, candidates: tuple[str, ...], what: str) -> str:
    columns = list(ds.column_names)
    if given is not None:
        if given not in columns:
            raise InputError(f"dataset.{what}: column {given!r} not found; columns are {columns}")
        return given
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise InputError(f"dataset.{what}: none of {list(candidates)} found in columns {columns}; set it explicitly")


def _convert_features(numpy_ds, key: str, is_image: bool) -> np.ndarray:
    chunks = []
    for start in range(0, numpy_ds.num_rows, _CONVERT_CHUNK):
        batch = numpy_ds[start : start + _CONVERT_CHUNK][key]
        if not isinstance(batch, np.ndarray) or batch.dtype == object:
            raise InputError(f"dataset.image_key: samples in column {key!r} differ in shape or are not numeric")
        chunks.append(_to_unit_float(batch, key))
    shapes = {c.shape[1:] for c in chunks}
    if len(shapes) != 1:
        raise InputError(f"dataset.image_key: samples in column {key!r} differ in shape {sorted(shapes)}")
    return np.ascontiguousarray(_channels_first(np.concatenate(chunks), is_image, key))


def _to_unit_float(batch: np.ndarray, key: str) -> np.ndarray:
    if batch.dtype == bool:
        return batch.astype(np.float32)
    if np.issubdtype(batch.dtype, np.integer):
        if batch.min() < 0 or batch.max() > 255:
            raise InputError(f"dataset.image_key: integer pixels in {key!r} must be in [0, 255]")
        return batch.astype(np.float32) / np.float32(255)
    if np.issubdtype(batch.dtype, np.floating):
        return batch.astype(np.float32)
    raise InputError(f"dataset.image_key: column {key!r} has unsupported dtype {batch.dtype}")


def _channels_first(x: np.ndarray, is_image: bool, key: str) -> np.ndarray:
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4:
        # PIL decodes to HWC; raw array columns are taken as CHW unless only the last axis looks like channels.
        hwc = is_image or (x.shape[-1] <= 4 < x.shape[1])
        return np.transpose(x, (0, 3, 1, 2)) if hwc else x
    raise InputError(f"dataset.image_key: column {key!r} has {x.ndim - 1}-D samples; expected 1-D, 2-D or 3-D")


def _num_classes(ds, label_key: str | None, y: np.ndarray) -> int:
    import datasets

    key = _resolve_column(ds, label_key, LABEL_KEYS, "label_key")
    feature = ds.features[key]
    if isinstance(feature, datasets.ClassLabel):
        return int(feature.num_classes)
    return int(y.max()) + 1
