import pyarrow as pa
import pytest

from genstress_ray.storage import RunStore, StorageError, resolve_uri


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
    store.write_manifest({"config": {"campaign": "camp"}, "class_names": ["a"]})
    store.update_manifest(stages={"a": 1}, status="running")
    store.update_manifest(stages={"b": 2})
    manifest = store.read_manifest()
    assert manifest["stages"] == {"a": 1, "b": 2} and manifest["class_names"] == ["a"]
    assert store.uri.endswith("/camp/run-1")


def test_a_lost_manifest_is_never_replaced_by_a_partial_one(store):
    """The object store lost manifest.json mid-run: the next update stops instead of writing a manifest
    that holds only the new fields (config, classes and models gone) and says 'complete'."""
    store.write_manifest({"config": {"campaign": "camp"}, "class_names": ["a"]})
    store.fs.rm(f"{store.path}/manifest.json")
    with pytest.raises(StorageError, match="missing or lost its config"):
        store.update_manifest(status="complete")
    assert not store.fs.exists(f"{store.path}/manifest.json")


def test_an_unreadable_manifest_is_an_error_that_names_it(store):
    store.fs.makedirs(store.path, exist_ok=True)
    store.fs.pipe_file(f"{store.path}/manifest.json", b"{not json")
    with pytest.raises(StorageError, match="cannot read .*manifest.json"):
        store.update_manifest(status="complete")


def test_relative_outputs_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunStore("runs", "c", "r").uri == f"{tmp_path}/runs/c/r"
    assert resolve_uri("s3://b/runs") == "s3://b/runs"


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


@pytest.mark.parametrize("campaign, run_id", [("..", "r1"), ("camp", ".."), (".", "."), ("a/b", "r1"), ("", "r1")])
def test_dot_folders_and_paths_are_not_names(tmp_path, campaign, run_id):
    """'..' matched the old name pattern: campaign '..' and run id '..' wrote a run two folders above the
    output, and its regions stage deleted a 'regions' folder found there."""
    (tmp_path / "regions").mkdir()
    (tmp_path / "regions" / "keep.txt").write_text("a user's file")
    output = tmp_path / "a" / "out"
    with pytest.raises(StorageError, match="is not a name"):
        RunStore(str(output), campaign, run_id)
    from genstress_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="(campaign|run_id): .* is not a name"):
        load_config({"campaign": campaign, "run_id": run_id, "output": str(output)})
    assert (tmp_path / "regions" / "keep.txt").read_text() == "a user's file"


def test_a_delete_outside_the_run_folder_is_refused(tmp_path):
    store = RunStore(str(tmp_path / "out"), "camp", "r1")
    (tmp_path / "out" / "camp" / "r1").mkdir(parents=True)
    (tmp_path / "keep").mkdir()
    for outside in (str(tmp_path / "keep"), f"{store.path}/../../../keep", store.path, f"{store.path}/.."):
        with pytest.raises(StorageError, match="not inside the run folder"):
            store.remove(outside)
    assert (tmp_path / "keep").is_dir()
    store.begin_stage("regions")
    store.remove(store.stage_path("regions"))
    assert not (tmp_path / "out" / "camp" / "r1" / "regions").exists()


def test_an_empty_output_is_refused_not_the_current_folder():
    from genstress_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="output: '' is not a location"):
        load_config({"output": ""})
    with pytest.raises(StorageError, match="is not a location"):
        RunStore("  ", "camp", "r1")
