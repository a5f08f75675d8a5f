"""Dataset sources behind one interface, and their registry.

Example:
    >>> from genstress_ray.data import get_source
    >>> test = get_source("digits", split="test").load()
    >>> test.images.shape[1:], len(test.class_names)
    ((1, 8, 8), 10)
"""

from genstress_ray.data.base import (IGNORE, SPLITS, Catalog, DataError, DatasetSource, ImageSet, Shard, SplitLabels, class_name, png_bytes,
                                     png_uri, rows_table, slice_shards, split_indices, to_float, to_uint8)
from genstress_ray.data.sources import DigitsSource, FashionMnistSource, MnistSource, ScenesSource, decode_images
from genstress_ray.data.streaming import ImageFolderSource, ImageNetSource, ParquetSource, hash_split, hash_unit
from genstress_ray.registry import Registry

SOURCES: Registry[type[DatasetSource]] = Registry("dataset kind", DataError)


def register_source(cls: type[DatasetSource]) -> type[DatasetSource]:
    """Register a ``DatasetSource`` subclass under its ``name`` (usable as a decorator)."""
    return SOURCES.register(cls.name, cls)


def list_sources() -> list[str]:
    return sorted(SOURCES)


def source_options(kind: str) -> list[str]:
    """The parameters the source ``kind`` takes (what ``data.<split>.options`` may set)."""
    import inspect

    names = []
    for klass in SOURCES.get(kind).__mro__:
        if "__init__" in vars(klass):
            for p in list(inspect.signature(klass.__init__).parameters.values())[1:]:
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names:
                    names.append(p.name)
    return names


def get_source(kind: str, **params) -> DatasetSource:
    """Build the registered source ``kind`` with ``params`` (uri, split, limit, seed, ...)."""
    if kind not in SOURCES:
        raise DataError(f"data.kind: unknown dataset kind {kind!r}; allowed: {', '.join(list_sources())}")
    return SOURCES.get(kind)(**params)


for _cls in (DigitsSource, MnistSource, FashionMnistSource, ImageFolderSource, ImageNetSource, ParquetSource,
             ScenesSource):
    register_source(_cls)

__all__ = ["IGNORE", "SOURCES", "SPLITS", "Catalog", "DataError", "class_name", "DatasetSource", "ImageSet", "Shard", "SplitLabels",
           "decode_images", "get_source", "hash_split", "hash_unit", "list_sources", "png_bytes", "png_uri",
           "register_source", "rows_table", "slice_shards", "source_options", "split_indices", "to_float", "to_uint8"]
