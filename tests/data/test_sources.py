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
    assert {"digits", "mnist", "fashion_mnist", "image_folder", "imagenet", "parquet"} <= set(list_sources())
    with pytest.raises(DataError, match="unknown dataset kind 'cifar'.*allowed: digits"):
        get_source("cifar")


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
    assert sum(len(p) for p in parts) == 10 and all(len(p) for p in (parts[0], parts[2]))
    assert len(set().union(*(p.source_ids for p in parts))) == 10
    assert parts[2].images.shape[1:] == (1, 12, 12)
    assert all(i.startswith("image_folder:test:") and i.endswith(".png") for i in parts[2].source_ids)


def test_a_split_is_a_function_of_the_key_alone(tmp_path):
    """Adding images never moves an existing image to another split (no driver-side permutation)."""
    _write_folder(tmp_path)
    before = {s: set(get_source("image_folder", uri=str(tmp_path), split=s).load().source_ids)
              for s in ("train", "validation", "test")}
    (tmp_path / "dog" / "extra.png").write_bytes(_png(np.zeros((12, 12), np.uint8)))
    for split, ids in before.items():
        assert ids <= set(get_source("image_folder", uri=str(tmp_path), split=split).load().source_ids)


def test_image_folder_names_the_file_whose_size_differs(tmp_path):
    _write_folder(tmp_path, sizes={("dog", 3): 10})
    with pytest.raises(DataError, match="dog/3.png.*differs"):
        get_source("image_folder", uri=str(tmp_path), split="train", test_fraction=0.0).load()


def test_an_unreadable_image_in_a_shard_is_counted_skipped_and_named(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    source = get_source("image_folder", uri=str(tmp_path), split="train", test_fraction=0.0,
                        validation_fraction=0.0)
    tables = [source.read_shard(shard) for shard in source.shards(4)]
    counts = [c for _, c in tables if c]
    assert len(counts) == 1 and counts[0]["unreadable"] == 1 and "cat/broken.png" in counts[0]["unreadable_first"][0]
    assert sum(t.num_rows for t, _ in tables) == 10


@needs_shared_data
def test_limit_is_a_seeded_sample_across_classes_and_classes_picks_a_subset():
    uri = str(SHARED_DATA / "gtsrb" / "images")
    sample = get_source("image_folder", uri=uri, split="train", limit=400).load()
    assert len(sample) == 400 and len(set(sample.labels.tolist())) > 30  # not the first classes in path order
    assert get_source("image_folder", uri=uri, split="train", limit=400, seed=1).load().source_ids != sample.source_ids
    names = ["01_speed_limit_30", "03_speed_limit_60"]
    subset = get_source("image_folder", uri=uri, split="test", classes=names).load()
    assert subset.class_names == names and set(subset.labels.tolist()) == {0, 1} and subset.images.shape[1:] == (3, 35, 35)
    with pytest.raises(DataError, match="classes: '99_unicorn' not among the data's 43 classes"):
        get_source("image_folder", uri=uri, split="test", classes=["99_unicorn"]).catalog()


def test_imagenet_synset_folders_follow_their_mapping_file(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\nn03 shark\n")
    for synset in ("n01", "n03"):
        (tmp_path / synset).mkdir()
        for i in range(6):
            arr = rng.integers(0, 255, (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG")
            (tmp_path / synset / f"{i}.JPEG").write_bytes(buf.getvalue())
    data = get_source("imagenet", uri=str(tmp_path), split="train", test_fraction=0, validation_fraction=0,
                      resize=16).load()
    assert data.class_names == ["tench, Tinca tinca", "goldfish", "shark"]
    assert set(data.labels.tolist()) == {0, 2} and data.images.shape == (12, 3, 16, 16)
    (tmp_path / "n09").mkdir()
    with pytest.raises(DataError, match="mapping file disagrees with the folders: 1 folder.*n09"):
        get_source("imagenet", uri=str(tmp_path), split="train").catalog()


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
    with pytest.raises(DataError, match="label_column: column 'y' not in .*d.parquet"):
        get_source("parquet", uri=str(tmp_path / "d.parquet"), label_column="y").load()


def test_parquet_shards_with_train_and_test_only_give_a_validation_split(tmp_path):
    """Hugging Face style: a folder of shards, image structs, several row groups, no validation rows."""
    rng = np.random.default_rng(3)
    (tmp_path / "data").mkdir()
    for part in range(2):
        images = [{"bytes": _png(rng.integers(0, 255, (8, 8), dtype=np.uint8)), "path": None} for _ in range(40)]
        pq.write_table(pa.table({"image": images, "label": np.arange(40) % 3,
                                 "split": ["train"] * 30 + ["test"] * 10}), tmp_path / "data" / f"p{part}.parquet",
                       row_group_size=16)
    splits = {s: get_source("parquet", uri=str(tmp_path / "data"), split=s, validation_fraction=0.2).load()
              for s in ("train", "validation", "test")}
    assert len(splits["test"]) == 20 and len(splits["train"]) + len(splits["validation"]) == 60
    assert 3 <= len(splits["validation"]) <= 25
    assert not set(splits["train"].source_ids) & set(splits["validation"].source_ids)
    assert splits["test"].source_ids[0] == "parquet:test:p0.parquet:30"
    pq.write_table(pa.table({"image": [b"x"], "split": ["train"]}), tmp_path / "data" / "p9.parquet")
    with pytest.raises(DataError, match="label_column: column 'label' not in .*p9.parquet"):
        get_source("parquet", uri=str(tmp_path / "data"), split="train").catalog()


def test_parquet_source_reads_from_s3(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    with fs.open(f"{s3_bucket}/data/d.parquet", "wb") as f:
        pq.write_table(_parquet_table(), f)
    train = get_source("parquet", uri=f"{s3_bucket}/data/d.parquet", split="train", validation_fraction=0.0).load()
    assert len(train) == 3 and train.labels.tolist() == [0, 1, 0]


def test_synthetic_scenes_carry_masks_that_agree_with_their_labels():
    from genstress_ray.data import IGNORE, ImageSet

    scenes = get_source("scenes", split="test", size=100, side=16).load()
    assert scenes.class_names == ["ground", "sky", "sign", "car"] and scenes.masks.shape == (20, 16, 16)
    for mask, label, image in zip(scenes.masks, scenes.labels, scenes.images):
        assert set(np.unique(mask)) == {0, 1, int(label)}  # ground, sky and the labelled object
        red = image[0].astype(int) - image[2].astype(int)
        assert (red[mask == 2] > 100).all() and (red[mask != 2] < 50).all()  # the sign is the red pixels
    small = get_source("scenes", split="test", size=100, side=32, resize=16).load()
    assert small.masks.shape == (20, 16, 16) and set(np.unique(small.masks)) <= {0, 1, 2, 3}  # nearest
    with pytest.raises(DataError, match="masks hold class indices outside"):
        ImageSet(scenes.images, scenes.labels, scenes.source_ids, scenes.class_names, scenes.masks + 4)
    with pytest.raises(DataError, match=r"masks must be uint8 \(N, H, W\)"):
        ImageSet(scenes.images, scenes.labels, scenes.source_ids, scenes.class_names, scenes.masks[:, :8])
    assert ImageSet(scenes.images, scenes.labels, scenes.source_ids, scenes.class_names,
                    np.full_like(scenes.masks, IGNORE)).masks is not None
    with pytest.raises(DataError, match="size >= 10 and side >= 16"):
        get_source("scenes", side=8).load()
