"""Sources too large for the driver: image folders, ImageNet's synset folders and Parquet shards.

The driver builds an index (keys, labels and where each image lies: metadata, never pixels) and cuts
it into shards; Ray tasks read and decode one shard each (``read_shard``). Which split a row belongs
to is a function of its stable key and the seed (``hash_unit``), so every worker agrees without a
driver-side permutation; ``limit`` keeps a seeded random sample; ``classes`` a subset, by name.

An image that cannot be decoded (or has the wrong size) is skipped and counted; the first few are
named in the shard's counts, which the stage stores beside its rows.
"""

from __future__ import annotations

import io
import posixpath
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from genstress_ray.data.base import (Catalog, DataError, DatasetSource, ImageSet, Shard, SplitLabels, hash_unit, in_share,
                                     rows_table, slice_shards)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".jpe")
NAMED_SKIPS = 5  # unreadable images named per shard


def hash_split(keys, split: str, validation_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Mask of the rows of ``split``: test below ``test_fraction``, validation next, train the rest."""
    u = hash_unit(keys, seed)
    lo, hi = {"test": (0.0, test_fraction), "validation": (test_fraction, test_fraction + validation_fraction),
              "train": (test_fraction + validation_fraction, 1.0)}[split]
    return (u >= lo) & (u < hi)


def decode_fitted(data: bytes, mode: str, shape: tuple[int, int, int] | None, resize: int | None) -> np.ndarray:
    """One encoded image as uint8 (C, H, W) in ``mode``: with ``resize``, its shorter side scaled to
    ``resize`` and centre-cropped square; ``shape`` (when given) must then match, or ValueError."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert(mode)
    if resize:
        w, h = img.size
        scale = resize / min(w, h)
        size = (max(resize, round(w * scale)), max(resize, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, Image.BILINEAR, reducing_gap=None)
        left, top = (size[0] - resize) // 2, (size[1] - resize) // 2
        img = img.crop((left, top, left + resize, top + resize))
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"size {arr.shape} differs from the data set's {tuple(shape)} (set data.resize)")
    return arr


class StreamingSource(DatasetSource):
    """A source whose pixels stay out of the driver: subclasses build ``_entries`` (a table with
    ``key``, ``label`` and location columns) and ``_fetch`` a shard's encoded images."""

    streaming = True

    def __init__(self, *args, mode: str | None = None, classes: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if mode not in (None, "L", "RGB"):
            raise DataError(f"data.options.mode: {mode!r}; allowed: L, RGB")
        self.mode, self.classes = mode, classes
        self._index: pa.Table | None = None
        self._names: list[str] | None = None
        self._shape: tuple[int, int, int] | None = None

    def pool(self) -> str:
        # Keys are paths (or ids) inside the one location every split is carved from.
        return f"{self.name}|{(self.uri or '').rstrip('/')}"

    def __getstate__(self):
        # Read tasks get the source without its index: the shard they read carries its own rows.
        return {**self.__dict__, "_index": None}

    # ---- the driver's side: metadata only -------------------------------------------------------------
    def _entries(self) -> tuple[pa.Table, list[str]]:
        """(every row's ``key``, ``label`` and location, class names in label order)."""
        raise NotImplementedError

    def _split_mask(self, table: pa.Table) -> np.ndarray:
        return hash_split(table["key"].to_pylist(), self.split, self.validation_fraction, self.test_fraction, self.seed)

    def index(self) -> pa.Table:
        """The rows of this split, class subset and sample, in location order (computed once)."""
        if self._index is not None:
            return self._index
        table, names = self._entries()
        if self.classes is not None:
            table, names = self._select_classes(table, names)
        table = table.filter(pa.array(self._split_mask(table)))
        table = table.filter(pa.array(in_share(table["key"].to_pylist(), self.share, self.seed)))
        if self.limit is not None and table.num_rows > self.limit:
            order = np.argsort(hash_unit(table["key"].to_pylist(), self.seed, "limit"), kind="stable")
            table = table.take(np.sort(order[: self.limit]))
        if table.num_rows == 0:
            raise DataError(f"data.uri: {self.uri!r} has no images in split {self.split!r}")
        self._index, self._names = table, names
        return table

    def _select_classes(self, table: pa.Table, names: list[str]) -> tuple[pa.Table, list[str]]:
        unknown = [c for c in self.classes if c not in names]
        if unknown:
            raise DataError(f"data.options.classes: {', '.join(map(repr, unknown))} not among the data's "
                            f"{len(names)} classes ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
        new_label = np.full(len(names), -1, np.int64)
        new_label[[names.index(c) for c in self.classes]] = np.arange(len(self.classes))
        relabelled = new_label[table["label"].to_numpy()]
        table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(relabelled))
        return table.filter(pa.array(relabelled >= 0)), list(self.classes)

    def catalog(self) -> Catalog:
        index = self.index()
        if self._shape is None:
            first = self._fetch(index.slice(0, 1))[0]
            mode = self.mode or ("L" if Image.open(io.BytesIO(first)).mode in ("1", "L", "I;16", "I") else "RGB")
            try:
                self._shape = decode_fitted(first, mode, None, self.resize).shape
            except Exception as exc:
                raise DataError(f"{self._where(index, 0)}: not a readable image ({exc})") from None
            self.mode = mode
        names = list(self.class_names or self._names)
        return Catalog(names, tuple(self._shape), index.num_rows)

    def shards(self, rows_per_shard: int) -> list[Shard]:
        self.catalog()  # fixes mode and shape before the source is sent to read tasks
        return slice_shards(self.index(), rows_per_shard)

    def split_labels(self) -> SplitLabels:
        index, catalog = self.index(), self.catalog()
        ids = [f"{self.name}:{self.split}:{k}" for k in index["key"].to_pylist()]
        return SplitLabels(ids, index["label"].to_numpy().astype(np.int64), catalog.class_names)

    # ---- a read task's side ---------------------------------------------------------------------------
    def _fetch(self, rows: pa.Table) -> list[bytes | None]:
        """The encoded bytes of each row (None where it cannot be read)."""
        raise NotImplementedError

    def _where(self, rows: pa.Table, i: int) -> str:
        return str(rows["key"][i].as_py())

    def read_shard(self, shard: Shard) -> tuple[pa.Table, dict[str, Any]]:
        rows = shard.rows
        images, keep, skipped = [], [], []
        for i, data in enumerate(self._fetch(rows)):
            try:
                if data is None:
                    raise ValueError("cannot be read")
                images.append(decode_fitted(data, self.mode, self._shape, self.resize))
                keep.append(i)
            except Exception as exc:
                skipped.append(f"{self._where(rows, i)} ({str(exc).splitlines()[0][:80]})")
        kept = rows.take(keep)
        ids = [f"{self.name}:{self.split}:{k}" for k in kept["key"].to_pylist()]
        pixels = np.stack(images) if images else np.zeros((0, *self._shape), np.uint8)
        counts = {"unreadable": len(skipped)} if skipped else {}
        if skipped:
            counts["unreadable_first"] = skipped[:NAMED_SKIPS]
        return rows_table(ids, kept["label"].to_numpy(), pixels), counts

    def _load_split(self):
        index, catalog = self.index(), self.catalog()
        table, counts = self.read_shard(Shard("all", index.num_rows, index))
        if counts:
            raise DataError(f"data.uri: {counts['unreadable']} image(s) of {self.uri!r} cannot be read: "
                            f"{'; '.join(counts['unreadable_first'])}")
        pixels = np.frombuffer(b"".join(table["image"].to_pylist()), np.uint8).reshape(-1, *catalog.image_shape)
        keys = [s.split(":", 2)[2] for s in table["source_id"].to_pylist()]
        return pixels, table["source_label"].to_numpy(), catalog.class_names, keys

    def load(self):
        # Resizing happened at decode time (shorter side and centre crop); limit at index time.
        images, labels, names, keys = self._load_split()
        return ImageSet(np.ascontiguousarray(images), labels.astype(np.int64),
                        [f"{self.name}:{self.split}:{k}" for k in keys], names)


class ImageFolderSource(StreamingSource):
    """One sub-folder per class (``<uri>/<class>/<image>``), class names sorted; any fsspec URI.

    ``mode`` "L" or "RGB" converts every image (default: the first image's); all images must share
    one size unless ``resize`` (shorter side, then a centre crop) makes them. A row's key is its path
    relative to ``uri``.
    """

    name = "image_folder"

    def _class_folders(self) -> tuple[Any, str, list[str]]:
        fs, root = self._location("a folder")
        try:
            entries = fs.ls(root, detail=True)
        except (FileNotFoundError, NotADirectoryError, OSError) as exc:
            raise DataError(f"data.uri: cannot list {self.uri!r}: {exc}") from exc
        folders = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")
        if not folders:
            raise DataError(f"data.uri: {self.uri!r} has no class sub-folders")
        return fs, root.rstrip("/"), folders

    def _files(self, fs, root: str, folders: list[str], labels: list[int]) -> pa.Table:
        keys, out = [], []
        for label, folder in zip(labels, folders):
            for path in sorted(fs.find(f"{root}/{folder}")):
                if path.lower().endswith(IMAGE_SUFFIXES):
                    keys.append(posixpath.relpath(path, root))
                    out.append(label)
        if not keys:
            raise DataError(f"data.uri: {self.uri!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return pa.table({"key": keys, "label": np.asarray(out, np.int64)})

    def _entries(self):
        fs, root, folders = self._class_folders()
        return self._files(fs, root, folders, list(range(len(folders)))), folders

    def _fetch(self, rows):
        fs, root = self._location("a folder")
        out = []
        for key in rows["key"].to_pylist():
            try:
                out.append(fs.cat_file(f"{root.rstrip('/')}/{key}"))
            except OSError:
                out.append(None)
        return out


class ImageNetSource(ImageFolderSource):
    """ImageNet's synset folders (``<uri>/n01440764/*.JPEG``) with a mapping file that fixes each
    synset's index and name: one line per class, ``<synset> <description>`` in index order
    (``LOC_synset_mapping.txt``). Class names are the descriptions ("tench, Tinca tinca"), as the
    ``id2label`` of ImageNet classifiers on the Hugging Face hub has them. ``mapping`` defaults to
    ``LOC_synset_mapping.txt`` inside ``uri``; a folder the mapping lacks is an error, a class
    without a folder just has no images (a subset of ImageNet keeps ImageNet's indices).
    """

    name = "imagenet"

    def __init__(self, *args, mapping: str | None = None, **kwargs):
        kwargs.setdefault("resize", 224)
        kwargs.setdefault("mode", "RGB")
        super().__init__(*args, **kwargs)
        self.mapping = mapping

    def _synsets(self) -> tuple[list[str], list[str]]:
        from genstress_ray.storage import StorageError, read_bytes

        uri = self.mapping or f"{(self.uri or '').rstrip('/')}/LOC_synset_mapping.txt"
        try:
            text = read_bytes(uri).decode("utf-8")
        except (StorageError, UnicodeDecodeError) as exc:
            raise DataError(f"data.options.mapping: cannot read the synset mapping {uri!r}: {exc}") from None
        synsets, names = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                synset, _, name = line.strip().partition(" ")
                if not name.strip():
                    raise DataError(f"{uri} line {n}: expected '<synset> <description>', got {line.strip()!r}")
                synsets.append(synset)
                names.append(name.strip())
        if len(set(synsets)) != len(synsets):
            raise DataError(f"{uri}: a synset is listed twice")
        return synsets, names

    def _entries(self):
        synsets, names = self._synsets()
        fs, root, folders = self._class_folders()
        unknown = sorted(set(folders) - set(synsets))
        if unknown:
            raise DataError(f"data.options.mapping: the mapping file disagrees with the folders: "
                            f"{len(unknown)} folder(s) of {self.uri!r} are not in it ({', '.join(unknown[:5])})")
        return self._files(fs, root, folders, [synsets.index(f) for f in folders]), names


class ParquetSource(StreamingSource):
    """Parquet files (one, or a folder of shards) with encoded images and a label column; any fsspec URI.

    ``image_column`` holds PNG/JPEG bytes (or a struct with a ``bytes`` field, as Hugging Face datasets
    write it); ``label_column`` ints or class-name strings; ``id_column`` (optional) stable keys
    (default ``<file>:<row>``). A ``split_column`` selects the split by its values; when it has train
    but no validation rows, validation is carved out of train by key. The driver reads only the
    label, id and split columns; read tasks read the image column of their row groups.
    """

    name = "parquet"

    def __init__(self, *args, image_column: str = "image", label_column: str = "label",
                 id_column: str | None = None, split_column: str = "split", **kwargs):
        super().__init__(*args, **kwargs)
        self.image_column, self.label_column = image_column, label_column
        self.id_column, self.split_column = id_column, split_column

    def _files(self) -> tuple[Any, list[str]]:
        fs, path = self._location("a file or folder")
        try:
            files = sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.isdir(path) else [path]
        except OSError as exc:
            raise DataError(f"data.uri: cannot list {self.uri!r}: {exc}") from exc
        if not files:
            raise DataError(f"data.uri: {self.uri!r} holds no .parquet files")
        return fs, files

    def _entries(self):
        fs, files = self._files()
        root = self._location("a file or folder")[1].rstrip("/")
        parts = []
        for file in files:
            try:
                meta = pq.ParquetFile(fs.open(file, "rb"))
            except (OSError, ValueError) as exc:
                raise DataError(f"data.uri: {file} is not a readable Parquet file: {exc}") from None
            columns = meta.schema_arrow.names
            for field, column in (("image_column", self.image_column), ("label_column", self.label_column),
                                  ("id_column", self.id_column)):
                if column is not None and column not in columns:
                    raise DataError(f"data.options.{field}: column {column!r} not in {file} (columns: {columns})")
            wanted = [c for c in (self.label_column, self.id_column, self.split_column) if c and c in columns]
            rel = posixpath.relpath(file, root) if file != root else posixpath.basename(file)
            start = 0
            for group in range(meta.num_row_groups):
                t = meta.read_row_group(group, columns=wanted)
                n = t.num_rows
                keys = t[self.id_column].to_pylist() if self.id_column else [f"{rel}:{start + i}" for i in range(n)]
                parts.append(pa.table({
                    "key": pa.array([str(k) for k in keys]), "raw_label": t[self.label_column],
                    "split": t[self.split_column].cast(pa.string()) if self.split_column in t.column_names
                    else pa.nulls(n, pa.string()),
                    "file": [file] * n, "group": np.full(n, group, np.int64), "row": np.arange(n, dtype=np.int64)}))
                start += n
        table = pa.concat_tables(parts)
        raw = table["raw_label"].to_pylist()
        if all(isinstance(v, str) for v in raw):
            names = sorted(set(raw))
            labels = np.asarray([names.index(v) for v in raw], np.int64)
        else:
            labels = np.asarray(raw, np.int64)
            names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
        return table.drop_columns(["raw_label"]).append_column("label", pa.array(labels)), names

    def _split_mask(self, table):
        values = np.asarray(table["split"].to_pylist(), dtype=object)
        if all(v is None for v in values):
            return super()._split_mask(table)
        present = set(values) - {None}
        if self.split in ("train", "validation") and "train" in present and "validation" not in present:
            # Train and test only: validation is carved out of train, by key.
            carved = (values == "train") & (hash_unit(table["key"].to_pylist(), self.seed) < self.validation_fraction)
            return carved if self.split == "validation" else (values == "train") & ~carved
        if self.split in present:
            return values == self.split
        raise DataError(f"data.uri: {self.uri!r} has no rows for split {self.split!r} (its "
                        f"{self.split_column!r} column holds {', '.join(sorted(map(str, present)))})")

    def _fetch(self, rows):
        fs, _ = self._location("a file or folder")
        out: list[bytes | None] = [None] * rows.num_rows
        where = defaultdict(list)
        for i, (file, group, row) in enumerate(zip(rows["file"].to_pylist(), rows["group"].to_pylist(),
                                                   rows["row"].to_pylist())):
            where[(file, group)].append((i, row))
        for (file, group), items in where.items():
            try:
                cells = pq.ParquetFile(fs.open(file, "rb")).read_row_group(group, columns=[self.image_column])
            except (OSError, ValueError):
                continue
            cells = cells[self.image_column]
            for i, row in items:
                cell = cells[row].as_py()
                out[i] = cell.get("bytes") if isinstance(cell, dict) else cell
        return out

    def _where(self, rows, i):
        return f"{rows['file'][i].as_py()} row {rows['group'][i].as_py()}:{rows['row'][i].as_py()}"

