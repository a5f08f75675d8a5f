"""The cluster files validate offline, as their tools would check them: cluster.yaml against Ray's launcher
schema and checks, jobs/k8s/*.yaml against KubeRay's CRD schemas (../shared/kuberay-crds) plus what the
schemas leave open, and the job files they run against the campaign schema."""

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from genstress_ray.cli import DEMO_CONFIG, build_parser
from genstress_ray.config import load_config
from genstress_ray.scan import load_scan_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "jobs" / "k8s"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
# RayJob.spec.submissionMode is a plain string in the CRD; these are the values the operator accepts.
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay's CRDs are not at {CRDS}")


def _crd_schema(kind: str) -> tuple[str, dict]:
    """(apiVersion, schema of the served storage version) of a KubeRay kind."""
    for path in CRDS.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["served"] and v.get("storage"))
            return f"{crd['spec']['group']}/{version['name']}", version["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for {kind} in {CRDS}")


def _validate(manifest: dict) -> None:
    api_version, schema = _crd_schema(manifest["kind"])
    assert manifest["apiVersion"] == api_version
    jsonschema.validate(manifest, schema)


def _ray_job_specs(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    return [spec["jobTemplate"]] if manifest["kind"] == "RayCronJob" else [spec] if manifest["kind"] == "RayJob" else []


def _words(command: str) -> list[str]:
    """A manifest's shell command as words, the night's date expanded to 2026-12-06."""
    return shlex.split(command.replace("$(date -u +%F)", "2026-12-06"))


def _genstress_args(command: str) -> list[str]:
    """The arguments of the genstress command in an entrypoint."""
    words = _words(command)
    return words[words.index("genstress") + 1:]


def test_cluster_yaml_is_a_valid_ray_launcher_config_with_gpu_workers():
    """Validated as ``ray up`` does: Ray's defaults filled in, then its JSON schema and its own checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)  # raises on schema errors and on Ray's checks
    workers = {name: n for name, n in cfg["available_node_types"].items() if name != cfg["head_node_type"]}
    assert workers and all(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in workers.values())
    assert all(0 <= n["min_workers"] <= n["max_workers"] for n in workers.values())
    assert cfg["docker"]["image"].startswith("rayproject/ray:") and "gpu" in cfg["docker"]["image"]
    assert any(o.startswith("--shm-size") for o in cfg["docker"]["run_options"])
    assert "~/genstress_ray" in cfg["file_mounts"] and any("pip install" in c and "genstress_ray" in c
                                                         for c in cfg["setup_commands"])
    # Ray's own checks run: a head type that is not one of the node types is refused.
    broken = prepare_config(copy.deepcopy({**raw, "head_node_type": "no_such_type"}))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(broken)


@needs_crds
@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"])
def test_kuberay_manifests_validate_against_the_crds(name):
    manifest = yaml.safe_load((K8S / name).read_text())
    _validate(manifest)
    for job in _ray_job_specs(manifest):
        assert job["submissionMode"] in SUBMISSION_MODES
        if "ttlSecondsAfterFinished" in job:  # the operator ignores it otherwise
            assert job["shutdownAfterJobFinishes"] is True
        # The entrypoint is a genstress command this version parses, on a job file that validates.
        _load_job_file(build_parser().parse_args(_genstress_args(job["entrypoint"])))


def _load_job_file(args) -> None:
    """The campaign or scan config a parsed genstress command names, validated."""
    if args.func.__name__ == "_scan":
        load_scan_config(ROOT / args.config, registry=args.registry)
    else:
        load_config(ROOT / args.config)


@needs_crds
def test_a_manifest_the_schema_refuses_is_refused():
    manifest = yaml.safe_load((K8S / "raycronjob.yaml").read_text())
    del manifest["spec"]["schedule"]
    with pytest.raises(jsonschema.ValidationError, match="schedule"):
        _validate(manifest)


def test_the_nightly_manifests_scan_with_the_night_as_date():
    cron = yaml.safe_load((K8S / "raycronjob.yaml").read_text())["spec"]["jobTemplate"]["entrypoint"]
    args = build_parser().parse_args(_genstress_args(cron))
    assert args.func.__name__ == "_scan" and args.date == "2026-12-06"


def test_the_plain_cronjob_submits_a_scan_that_validates_once_per_night():
    manifest = yaml.safe_load((K8S / "cronjob.yaml").read_text())
    assert manifest["kind"] == "CronJob" and manifest["spec"]["concurrencyPolicy"] == "Forbid"
    [container] = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container["args"][0]
    words = _words(command)
    assert words[:3] == ["ray", "job", "submit"] and words[words.index("--submission-id") + 1] == \
        "genstress-scan-2026-12-06"
    args = build_parser().parse_args(_genstress_args(command))
    assert args.func.__name__ == "_scan" and args.date == "2026-12-06"
    _load_job_file(args)


def test_the_digits_job_file_is_the_demo():
    assert load_config(ROOT / "jobs" / "digits_defuse.yaml").model_dump() == load_config(DEMO_CONFIG).model_dump()
