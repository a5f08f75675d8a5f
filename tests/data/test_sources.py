import gzip
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import SHARED_DATA, needs_shared_data
from genstress_ray.data import DataError, get_source, list_sources


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_registry_lists_every_source_and_rejects_unknown_kinds():
    assert {"digits", "mnist", "fashion_mnist", "image_folder", "parquet"} <= set(list_sources())
    with pytest.raises(DataError, match="unknown dataset kind 'imagenet'.*allowed: digits"):
        get_source("imagenet")


def test_digits_splits_are_disjoint_complete_and_reproducible():
    splits = {s: get_source("digits", split=s).load() for s in ("train", "validation", "test")}
    ids = [set(splits[s].source_ids) for s in splits]
    assert sum(map(len, ids)) == 1797 and len(set.union(*ids)) == 1797
    again = get_source("digits", split="test").load()
    assert again.source_ids == splits["test"].source_ids
    assert np.array_equal(again.images, splits["test"].images)
    other_seed = get_source("digits", split="test", seed=1).load()
    assert other_seed.source_ids != splits["test"].source_ids
    x, y = splits["test"].tensors()
    assert x.shape[1:] == (1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert y.dtype.is_floating_point is False


def test_resize_gives_square_images_of_the_requested_side():
    data = get_source("digits", split="test", limit=5, resize=28).load()
    assert data.images.shape == (5, 1, 28, 28)


@needs_shared_data
def test_mnist_from_original_idx_files_matches_the_published_label_histogram():
    test = get_source("mnist", uri=str(SHARED_DATA / "mnist"), split="test").load()
    assert test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert test.source_ids[7] == "mnist:test:7"


@needs_shared_data
def test_mnist_npz_train_and_validation_are_carved_reproducibly():
    uri = str(SHARED_DATA / "mnist_train_first20k")
    train = get_source("mnist", uri=uri, split="train", validation_fraction=0.1).load()
    val = get_source("mnist", uri=uri, split="validation", validation_fraction=0.1).load()
    assert (len(train), len(val)) == (18000, 2000)
    assert not set(train.source_ids) & set(val.source_ids)


@needs_shared_data
def test_fashion_mnist_reads_npz_with_its_class_names():
    data = get_source("fashion_mnist", uri=str(SHARED_DATA / "fashion_mnist"), split="test", limit=10).load()
    assert data.images.shape == (10, 1, 28, 28)
    assert data.class_names[9] == "Ankle boot"


def test_idx_files_with_a_wrong_magic_number_are_rejected(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 12))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 4))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: not an IDX"):
        get_source("mnist", uri=str(tmp_path), split="test").load()


def test_missing_folder_and_missing_files_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nope"):
        get_source("mnist", uri=str(tmp_path / "nope"), split="test").load()
    with pytest.raises(DataError, match="has no test image\\+label pair"):
        get_source("mnist", uri=str(tmp_path), split="test").load()


def _write_folder(root, sizes=None):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            size = (sizes or {}).get((cls, i), 12)
            (root / cls / f"{i}.png").write_bytes(_png(rng.integers(0, 255, (size, size), dtype=np.uint8)))


def test_image_folder_reads_classes_from_sub_folders(tmp_path):
    _write_folder(tmp_path)
    parts = [get_source("image_folder", uri=str(tmp_path), split=s, test_fraction=0.2).load()
             for s in ("train", "validation", "test")]
    assert parts[0].class_names == ["cat", "dog"]
    assert [len(p) for p in parts] == [7, 1, 2]
    assert len(set().union(*(p.source_ids for p in parts))) == 10
    assert parts[2].images.shape[1:] == (1, 12, 12)
    assert all(i.startswith("image_folder:test:") and i.endswith(".png") for i in parts[2].source_ids)


def test_image_folder_names_the_file_whose_size_differs(tmp_path):
    _write_folder(tmp_path, sizes={("dog", 3): 10})
    with pytest.raises(DataError, match="dog/3.png.*differs"):
        get_source("image_folder", uri=str(tmp_path), split="train", test_fraction=0.0).load()


def _parquet_table():
    rng = np.random.default_rng(1)
    images = [_png(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(6)]
    return pa.table({"image": images, "label": ["a", "b", "a", "b", "a", "b"],
                     "split": ["test", "test", "train", "train", "train", "test"]})


def test_parquet_source_uses_its_split_column_and_string_labels(tmp_path):
    pq.write_table(_parquet_table(), tmp_path / "d.parquet")
    test = get_source("parquet", uri=str(tmp_path / "d.parquet"), split="test").load()
    assert test.class_names == ["a", "b"] and test.labels.tolist() == [0, 1, 1]
    assert test.images.shape == (3, 1, 8, 8)
    with pytest.raises(DataError, match="label_column: column 'y'"):
        get_source("parquet", uri=str(tmp_path / "d.parquet"), label_column="y").load()


def test_parquet_source_reads_from_s3(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    with fs.open(f"{s3_bucket}/data/d.parquet", "wb") as f:
        pq.write_table(_parquet_table(), f)
    train = get_source("parquet", uri=f"{s3_bucket}/data/d.parquet", split="train").load()
    assert len(train) == 3 and train.labels.tolist() == [0, 1, 0]
