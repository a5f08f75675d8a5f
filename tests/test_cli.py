import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genstress_ray.cli import build_parser, main
from genstress_ray.data import get_source
from genstress_ray.models import load_module


def test_run_with_an_invalid_config_exits_2_and_names_the_field(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("campaign: x\nstrategy: {name: defuse, draws: -3}\n")
    assert main(["run", str(cfg)]) == 2
    assert "strategy.defuse.draws: Input should be greater than 0" in capsys.readouterr().err


def test_train_classifier_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "cnn.safetensors"
    assert main(["train", "classifier", "--data", "digits", "--epochs", "1", "--output", str(out)]) == 0
    module, meta = load_module(str(out))
    assert meta["architecture"] == "small_cnn" and meta["role"] == "classifier"
    assert meta["class_names"] == [str(i) for i in range(10)] and "val_acc" in meta["metrics"]


@pytest.mark.slow
def test_the_readmes_first_command_as_a_user_types_it(tmp_path):
    """`genstress demo`, exactly as the README's first line says: no arguments, from a fresh working
    directory (so the default output is the relative ./genstress-runs), with an empty model cache.
    Then the same run again: everything it finished is kept, labels and correction included."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "pip install -e . && genstress demo " in readme.splitlines()[3]
    env = {**os.environ, "GENSTRESS_CACHE": str(tmp_path / "cache")}
    work = tmp_path / "fresh"
    work.mkdir()
    proc = subprocess.run(["genstress", "demo"], cwd=work, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, err = proc.stdout, proc.stderr
    run_dir = Path(re.search(r"^run: (.+)$", out, re.M).group(1))
    assert run_dir.parent == work / "genstress-runs" / "demo"
    candidates, faults = map(int, re.search(r"candidates (\d+), faults (\d+)", out).groups())
    skipped = json.loads((run_dir / "identify" / "_COMPLETE").read_text())["seeds_skipped"]
    # The search takes half of the test split; the other half is held out for every verdict.
    searched = len(get_source("digits", split="test", share=(0.0, 0.5)).load())
    assert searched == 180
    # Images whose reconstruction is already misclassified make no candidates.
    assert candidates == (searched - skipped) * 100 and skipped < searched and 0 < faults < candidates
    fidelity = float(re.search(r"generator fidelity: ([\d.]+)% of 180 search images", out).group(1))
    assert fidelity == pytest.approx(100 * (180 - skipped) / 180, abs=0.06)  # the same check, the same images
    n_regions = int(re.search(r"regions: (\d+)", out).group(1))
    assert n_regions >= 1 and len(re.findall(r"region \d+: weight", out)) == n_regions
    stages = ("identify", "regions", "region_samples", "labels", "region_sets", "correction")
    assert all((run_dir / s / "_COMPLETE").exists() for s in stages)
    assert "train classifier: epoch" in err and "identify: 180/180 rows (100%)" in err
    assert "Traceback" not in err and "core_worker" not in err and "Dataset" not in err and "INFO" not in err
    assert "(raylet)" not in out and "Trial" not in out  # Ray's notices and Tune's tables stay in Ray's logs
    for noise in ("Exception ignored", "PlacementGroupCleaner", "not writable", "Warning"):
        assert noise not in out + err, noise
    n_failures = int(re.search(r"(\d+) failure regions of", out).group(1))
    assert n_failures >= 1
    before = float(re.search(r"before +[\d.]+ +([\d.]+)", out).group(1))
    after = float(re.search(r"defuse +[\d.]+ +([\d.]+)", out).group(1))
    assert after > before
    # The verdict on real held-out images, each against its own label, in two groups with their n.
    assert "real held-out test images inside the failure regions, against their own labels:" in out
    assert re.search(r"subgroup +n=\d+", out) and re.search(r"collateral +n=\d+", out)
    assert f"report: {run_dir}/report/index.html" in out and (run_dir / "report" / "index.html").exists()

    again = subprocess.run(["genstress", "demo", "--run-id", run_dir.name], cwd=work, capture_output=True,
                           text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed: skipped finished stages identify, regions, region_samples" in again.stdout
    assert "labels: already made by the oracle, kept" in again.stderr
    assert "correction: already complete with these settings and labels, skipped" in again.stderr
    assert re.search(r"defuse +[\d.]+ +([\d.]+)", again.stdout).group(1) == f"{after:.4f}"


def test_train_takes_odd_sized_rgb_images_and_architecture_options(tmp_path, capsys):
    from PIL import Image

    from genstress_ray.models import load_module

    for label in ("a", "b"):
        (tmp_path / "signs" / label).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (35, 35), (12 * i, 0, 0)).save(tmp_path / "signs" / label / f"{i}.png")
    common = ["--data", "image_folder", "--data-uri", str(tmp_path / "signs"), "--epochs", "1"]
    assert main(["train", "vae", *common, "--latent-dim", "15", "--width", "8", "--beta", "1",
                 "--output", str(tmp_path / "vae.safetensors")]) == 0
    vae, meta = load_module(str(tmp_path / "vae.safetensors"))
    assert meta["params"]["latent_dim"] == 15 and meta["params"]["in_shape"] == [3, 35, 35]
    assert vae.encode(torch.rand(1, 3, 35, 35))[0].shape == (1, 15)
    assert main(["train", "classifier", *common, "--latent-dim", "4", "--output", str(tmp_path / "c.safetensors")]) == 2
    assert "error: architecture 'small_cnn' cannot be built with" in capsys.readouterr().err


def test_version_and_help_text_for_every_argument():
    proc = subprocess.run([sys.executable, "-m", "genstress_ray.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("genstress_ray ")
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():
        for arg in action._actions:
            assert arg.help, f"{action.prog} {arg.dest} has no help"
            assert "``" not in arg.help and "this machine" not in arg.help
    assert "``" not in (parser.description or "")


def test_train_with_an_unknown_dataset_kind_exits_2_and_lists_the_kinds(tmp_path, capsys):
    assert main(["train", "classifier", "--data", "cifar", "--output", str(tmp_path / "m.safetensors")]) == 2
    assert "unknown dataset kind 'cifar'; allowed: digits" in capsys.readouterr().err


def test_train_stylegan_measures_validity_with_a_reference_classifier(tmp_path, capsys):
    reference = tmp_path / "cnn.safetensors"
    assert main(["train", "classifier", "--data", "digits", "--epochs", "1", "--output", str(reference)]) == 0
    out = tmp_path / "g.safetensors"
    assert main(["train", "stylegan", "--data", "digits", "--epochs", "1", "--reference", str(reference),
                 "--output", str(out)]) == 0
    module, meta = load_module(str(out))
    assert meta["architecture"] == "small_stylegan" and meta["role"] == "style_generator"
    assert 0 <= meta["metrics"]["validity"] <= 1 and module.num_ws == 7
    assert "validity" in capsys.readouterr().out


def test_train_ddpm_writes_a_class_conditional_unet(tmp_path):
    out = tmp_path / "ddpm.safetensors"
    assert main(["train", "ddpm", "--data", "digits", "--epochs", "1", "--output", str(out)]) == 0
    module, meta = load_module(str(out))
    assert meta["architecture"] == "small_ddpm" and module.config.num_class_embeds == 11


def test_errors_in_rays_own_destructors_are_dropped_and_every_other_one_is_shown():
    """A Ctrl-C can leave a Ray Data dataset half built; its __del__ then raised into the one-line
    interrupt message ("Exception ignored in: <function Dataset.__del__>")."""
    from types import SimpleNamespace

    import ray.data

    from genstress_ray.console import _quiet_ray_destructors

    shown = []
    hook = _quiet_ray_destructors(shown.append)
    hook(SimpleNamespace(object=ray.data.Dataset.__del__, exc_value=AttributeError("_current_executor")))
    assert shown == []
    mine = SimpleNamespace(object=test_version_and_help_text_for_every_argument, exc_value=ValueError("x"))
    hook(mine)
    assert shown == [mine]
    assert _quiet_ray_destructors(hook) is hook  # installed once, however often output is configured
