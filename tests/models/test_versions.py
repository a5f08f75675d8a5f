"""A model registry of versions: found on a folder or on object storage, ordered, and refused clearly."""

import json

import pytest
import torch

from genstress_ray.models import ModelError, get_model, load_module, save_checkpoint
from genstress_ray.models.versions import list_versions, newest_version
from genstress_ray.storage import filesystem_for

from conftest import TINY_CNN


def _publish(registry: str, version: str, seed: int, name: str = "model.safetensors", metadata=None) -> None:
    torch.manual_seed(seed)
    save_checkpoint(get_model("small_cnn", **TINY_CNN), f"{registry}/{version}/{name}", "small_cnn", TINY_CNN)
    if metadata is not None:
        fs, path = filesystem_for(f"{registry}/{version}/metadata.json")
        fs.pipe_file(path, json.dumps(metadata).encode())


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_versions_are_ordered_as_numbers_and_the_newest_loads(where, tmp_path, request):
    registry = str(tmp_path / "registry") if where == "folder" else request.getfixturevalue("s3_bucket") + "/cnn"
    for version, seed in (("v2", 2), ("v10", 10), ("v1", 1)):
        _publish(registry, version, seed)
    assert [v.version for v in list_versions(registry)] == ["v1", "v2", "v10"]
    newest = newest_version(registry)
    assert newest.uri == f"{registry}/v10/model.safetensors"
    torch.manual_seed(10)
    expected = get_model("small_cnn", **TINY_CNN).eval()
    loaded, _ = load_module(newest.uri)
    loaded.eval()
    x = torch.rand(2, *TINY_CNN["in_shape"])
    assert torch.allclose(loaded(x), expected(x))


def test_creation_times_order_versions_when_every_version_has_one(tmp_path):
    registry = str(tmp_path / "registry")
    _publish(registry, "release-b", 0, metadata={"created": "2026-12-01T02:00:00", "note": "retrained"})
    _publish(registry, "release-a", 1, metadata={"created": "2026-12-05T02:00:00"})
    versions = list_versions(registry)
    assert [v.version for v in versions] == ["release-b", "release-a"]
    assert versions[0].metadata["note"] == "retrained" and versions[1].created.day == 5


def test_metadata_may_name_the_checkpoint_among_several_files(tmp_path):
    registry = str(tmp_path / "registry")
    _publish(registry, "v1", 0, name="best.safetensors")
    _publish(registry, "v1", 1, name="last.safetensors", metadata={"checkpoint": "last.safetensors"})
    assert newest_version(registry).uri.endswith("/v1/last.safetensors")


@pytest.mark.parametrize("make, message", [
    (lambda r: None, "is not a folder or prefix"),
    (lambda r: r.mkdir(), "holds no versions"),
    (lambda r: (r / "v1").mkdir(parents=True), "v1: no checkpoint"),
    (lambda r: [_publish(str(r), "v1", 0, name=n) for n in ("a.safetensors", "b.pt")], "several checkpoints"),
    (lambda r: (_publish(str(r), "v1", 0), (r / "v1" / "metadata.json").write_text("{oops")), "cannot be read as JSON"),
    (lambda r: _publish(str(r), "v1", 0, metadata={"checkpoint": "../../etc/passwd"}), "is not a file of that version"),
    (lambda r: _publish(str(r), "v1", 0, metadata={"created": "yesterday"}), "not an ISO date-time"),
])
def test_a_registry_that_cannot_be_used_is_named(tmp_path, make, message):
    registry = tmp_path / "registry"
    make(registry)
    with pytest.raises(ModelError, match=message):
        list_versions(str(registry))
