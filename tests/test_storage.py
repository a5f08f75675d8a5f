import pyarrow as pa
import pytest

from genstress_ray.storage import RunStore, StorageError


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    output = str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket") + "/out"
    return RunStore(output, "camp", "run-1")


def test_stage_lifecycle_markers_tables_and_manifest(store):
    store.check_writable()
    assert not store.is_complete("regions")
    store.begin_stage("regions")
    store.write_table("regions", pa.table({"region_id": [0, 1]}))
    assert not store.is_complete("regions")
    store.complete_stage("regions", {"regions": 2})
    assert store.is_complete("regions") and store.marker("regions")["regions"] == 2
    assert store.read_table("regions")["region_id"].to_pylist() == [0, 1]
    assert store.count_rows("regions") == 2
    store.update_manifest(stages={"a": 1}, status="running")
    store.update_manifest(stages={"b": 2})
    assert store.read_manifest()["stages"] == {"a": 1, "b": 2}
    assert store.uri.endswith("/camp/run-1")


def test_begin_stage_removes_what_an_interrupted_attempt_left(store):
    store.begin_stage("identify")
    store.write_table("identify", pa.table({"x": [1, 2, 3]}))
    store.begin_stage("identify")
    assert store.count_rows("identify") == 0


def test_unwritable_output_fails_early_with_the_uri(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="is not writable"):
        RunStore(str(blocker), "c", "r").check_writable()
