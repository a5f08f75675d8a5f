"""The one interface every dataset source implements, and the in-memory image set it returns."""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from genstress_ray.storage import filesystem_for

SPLITS = ("train", "validation", "test")
IGNORE = 255  # a mask's unlabelled pixels


class DataError(ValueError):
    """A dataset could not be found, read or understood. The message names the path or field."""


@dataclass(frozen=True)
class ImageSet:
    """Images of one split with labels and stable ids.

    Attributes:
        images: uint8 array (N, C, H, W).
        labels: int64 array (N,), indices into ``class_names``.
        source_ids: N strings, stable across runs (``"<dataset>:<split>:<index>"``).
        class_names: the class names, in label order.
        masks: for a segmentation data set, uint8 (N, H, W) per-pixel class indices into
            ``class_names`` (``IGNORE`` for unlabelled pixels); None otherwise.
    """

    images: np.ndarray
    labels: np.ndarray
    source_ids: list[str]
    class_names: list[str]
    masks: np.ndarray | None = None

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        n = len(self.images)
        if len(self.labels) != n or len(self.source_ids) != n:
            raise DataError(f"{n} images but {len(self.labels)} labels and {len(self.source_ids)} ids")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"labels must lie in [0, {len(self.class_names)}), got [{self.labels.min()}, {self.labels.max()}]")
        if self.masks is not None:
            if self.masks.shape != (n, *self.images.shape[2:]) or self.masks.dtype != np.uint8:
                raise DataError(f"masks must be uint8 (N, H, W) = {(n, *self.images.shape[2:])}, got "
                                f"{self.masks.dtype} {self.masks.shape}")
            known = (self.masks < len(self.class_names)) | (self.masks == IGNORE)
            if not known.all():
                raise DataError(f"masks hold class indices outside [0, {len(self.class_names)}) (and {IGNORE}, "
                                f"unlabelled): {sorted(set(self.masks[~known].tolist()))[:5]}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float NCHW in [0, 1] and labels as int64, the form models take."""
        return to_float(self.images), torch.from_numpy(self.labels.astype(np.int64))


@dataclass(frozen=True)
class Catalog:
    """What the driver knows of a split without holding its pixels: class names, image shape, rows,
    and whether its rows carry segmentation masks."""

    class_names: list[str]
    image_shape: tuple[int, int, int]
    rows: int
    masks: bool = False


@dataclass(frozen=True)
class SplitLabels:
    """A split's rows without their pixels: each row's source id and label, and the class names."""

    source_ids: list[str]
    labels: np.ndarray
    class_names: list[str]


@dataclass(frozen=True)
class Shard:
    """A fixed, named slice of a split: the unit a stage reads, writes and resumes by.

    ``rows`` is what ``DatasetSource.read_shard`` turns into source rows: the rows themselves for an
    in-memory source, index rows (keys, labels, locations) for a streaming one.
    """

    name: str
    size: int
    rows: pa.Table


def rows_table(source_ids: list[str], labels: np.ndarray, images: np.ndarray, masks: np.ndarray | None = None
               ) -> pa.Table:
    """Source rows of a search over images: ``source_id``, ``source_label`` and ``image`` (each image's
    raw uint8 C*H*W bytes; the stage knows the shape), and ``mask`` (raw uint8 H*W bytes) for a
    segmentation data set."""
    columns = {"source_id": pa.array(source_ids, pa.string()), "source_label": pa.array(np.asarray(labels, np.int64)),
               "image": pa.array([row.tobytes() for row in images.reshape(len(images), -1)], pa.binary())}
    if masks is not None:
        columns["mask"] = pa.array([row.tobytes() for row in masks.reshape(len(masks), -1)], pa.binary())
    return pa.table(columns)


def slice_shards(table: pa.Table, rows_per_shard: int) -> list[Shard]:
    """``table`` cut into consecutive shards named ``000000``, ``000001``, ...

    >>> [(s.name, s.size) for s in slice_shards(pa.table({"x": range(5)}), 2)]
    [('000000', 2), ('000001', 2), ('000002', 1)]
    """
    return [Shard(f"{start // rows_per_shard:06d}", min(rows_per_shard, table.num_rows - start),
                  table.slice(start, rows_per_shard)) for start in range(0, table.num_rows, rows_per_shard)]


def to_float(images_uint8: np.ndarray) -> torch.Tensor:
    # Arrays that come from Arrow are read-only; torch warns on a read-only buffer, so copy those.
    return torch.from_numpy(np.require(images_uint8, requirements=["C", "W"])).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    """PNG bytes of one uint8 (C, H, W) image."""
    pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)  # level 1: the sinks are I/O-bound anyway
    return buf.getvalue()


def png_uri(data: bytes) -> str:
    """A data: URI of PNG bytes, for self-contained HTML pages."""
    return "data:image/png;base64," + base64.b64encode(data).decode()


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of uint8 NCHW images to size x size."""
    out = torch.nn.functional.interpolate(to_float(images), size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
    return to_uint8(out)


def hash_unit(keys, seed: int, salt: str = "split") -> np.ndarray:
    """A number in [0, 1) per key, fixed by (seed, salt, key): splits and samples every worker agrees on.

    >>> hash_unit(["a.png", "b.png"], seed=0).round(3).tolist() == hash_unit(["a.png", "b.png"], 0).round(3).tolist()
    True
    """
    prefix = f"{seed}:{salt}:".encode()
    return np.fromiter((int.from_bytes(hashlib.blake2b(prefix + str(k).encode(), digest_size=8).digest(), "little")
                        for k in keys), dtype=np.float64, count=len(keys)) / 2.0 ** 64


def in_share(keys, share: tuple[float, float] | None, seed: int) -> np.ndarray:
    """Mask of the rows whose seeded hash of their key lies in ``share`` = [lo, hi): a part of a split
    that another part of the same split never overlaps (``DataSpec.share``). None keeps every row.

    >>> keys = [str(i) for i in range(100)]
    >>> first, second = in_share(keys, (0, 0.5), 0), in_share(keys, (0.5, 1), 0)
    >>> bool((first ^ second).all()), 40 < int(first.sum()) < 60
    (True, True)
    """
    if share is None:
        return np.ones(len(keys), bool)
    u = hash_unit(keys, seed, "share")
    lo, hi = share
    return (u >= lo) & ((u < hi) | (hi >= 1))


def split_indices(n: int, split: str, validation_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Reproducible indices of one split carved out of a single pool of ``n`` rows.

    The permutation's first ``test_fraction`` is test, the next ``validation_fraction`` validation,
    the rest train: the same arguments always give the same disjoint, sorted index sets.

    >>> split_indices(10, "test", 0.2, 0.3, seed=0).tolist()
    [2, 4, 6]
    """
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * validation_fraction))
    bounds = {"test": (0, n_test), "validation": (n_test, n_test + n_val), "train": (n_test + n_val, n)}
    lo, hi = bounds[split]
    return np.sort(order[lo:hi])


class DatasetSource:
    """Base of every dataset source: construct with parameters only, ``load()`` reads.

    Subclasses set ``name`` and implement ``_load_split``. ``split`` is one of ``train``,
    ``validation``, ``test``. A source that is one pool of rows carves the splits out of it with
    ``split_indices`` (``test_fraction``, ``validation_fraction``, ``seed``); a source with its own
    train/test files carves only validation out of train. ``resize`` makes every image square of
    that side (bilinear), so differently sized data fits one model. ``share`` = [lo, hi) keeps the
    rows of the split whose seeded hash of their key lies in that range (before ``limit``), so two
    parts of one split never share an image (a search half and a held-out half).
    """

    name: ClassVar[str]
    # Whether pixels stay out of the driver (``data.streaming``): shards are then read by Ray tasks.
    streaming: ClassVar[bool] = False

    def __init__(self, uri: str | None = None, split: str = "test", limit: int | None = None,
                 validation_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                 class_names: list[str] | None = None, resize: int | None = None,
                 share: tuple[float, float] | None = None):
        if split not in SPLITS:
            raise DataError(f"data.split: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        self.uri = uri
        self.split = split
        self.limit = limit
        self.validation_fraction = validation_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.class_names = class_names
        self.resize = resize
        self.share = None if share is None else (float(share[0]), float(share[1]))
        if self.share is not None and not 0 <= self.share[0] < self.share[1] <= 1:
            raise DataError(f"data.share: {list(share)} is not a range [lo, hi) with 0 <= lo < hi <= 1")

    def pool(self) -> str:
        """What the keys of this split index: rows of two specs are the same image when their pools
        and keys are equal (``origin_ids``). By default each split is a pool of its own (a source
        with a file set per split); a source that carves its splits out of one pool says so."""
        return f"{self.name}|{(self.uri or '').rstrip('/')}|{self.split}"

    def origin_ids(self) -> set[str]:
        """Every row's identity beyond its split name, ``<pool>/<key>``: what tells whether two specs
        (a search and a test split) share an image, whatever splits they name."""
        return {f"{self.pool()}/{sid.split(':', 2)[2]}" for sid in self.split_labels().source_ids}

    def _location(self, what: str):
        """The filesystem and path of ``uri``; a DataError when the source was given none."""
        if not self.uri:
            raise DataError(f"data.uri: the {self.name} source needs {what}")
        return filesystem_for(self.uri)

    def catalog(self) -> Catalog:
        """Class names, image shape and row count of the split (an in-memory source loads it)."""
        data = self._loaded()
        return Catalog(data.class_names, data.image_shape, len(data), data.masks is not None)

    def shards(self, rows_per_shard: int) -> list[Shard]:
        """The split cut into named shards of ``rows_per_shard`` rows, always the same way."""
        data = self._loaded()
        return slice_shards(rows_table(data.source_ids, data.labels, data.images, data.masks), rows_per_shard)

    def split_labels(self) -> SplitLabels:
        """Every row's source id and label (an in-memory source loads the split)."""
        data = self._loaded()
        return SplitLabels(data.source_ids, data.labels, data.class_names)

    def read_shard(self, shard: Shard) -> tuple[pa.Table, dict]:
        """A shard's source rows (``rows_table``) and its read counts (images skipped, ...)."""
        return shard.rows, {}

    def _loaded(self) -> ImageSet:
        if getattr(self, "_data", None) is None:
            self._data = self.load()
        return self._data

    def load(self) -> ImageSet:
        images, labels, default_names, keys, *masks = self._load_split()
        masks = masks[0] if masks else None
        names = list(self.class_names or default_names)
        if self.share is not None:
            keep = np.flatnonzero(in_share(keys, self.share, self.seed))
            images, labels, keys = images[keep], labels[keep], [keys[i] for i in keep]
            masks = None if masks is None else masks[keep]
        if self.limit is not None:
            images, labels, keys = images[: self.limit], labels[: self.limit], keys[: self.limit]
            masks = None if masks is None else masks[: self.limit]
        if self.resize and images.shape[-2:] != (self.resize, self.resize):
            images = resize_images(images, self.resize)
            if masks is not None:  # nearest: class indices do not blend
                masks = torch.nn.functional.interpolate(torch.from_numpy(masks[:, None]).float(), size=(
                    self.resize, self.resize), mode="nearest")[:, 0].to(torch.uint8).numpy()
        ids = [f"{self.name}:{self.split}:{k}" for k in keys]
        return ImageSet(np.ascontiguousarray(images), labels.astype(np.int64), ids, names,
                        None if masks is None else np.ascontiguousarray(masks))

    def _load_split(self) -> tuple:
        """Return (uint8 NCHW images, labels, default class names, a stable key per row), and for a
        segmentation data set a fifth item, the uint8 (N, H, W) masks.

        The key (an original row index or a relative file path) makes the row's source id.
        """
        raise NotImplementedError


def class_name(class_names: list[str], label: int) -> str:
    """A class's name; label -1 (no intended class: KLDB's boundary samples) reads "none"."""
    return class_names[label] if 0 <= label < len(class_names) else "none"
