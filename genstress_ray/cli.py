"""The ``genstress`` command: demo, run, assess, label, correct, report, train."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from genstress_ray.config import ConfigError
from genstress_ray.data import DataError, get_source
from genstress_ray.labeling import LabelError
from genstress_ray.models import ModelError, train_and_save
from genstress_ray.storage import STAGES, StorageError

DEMO_CONFIG = {
    "campaign": "demo",
    "output": "genstress-runs",
    # Digits are 8x8; at that size a beta=4 VAE's KL term swamps the 64-pixel reconstruction and the
    # posterior collapses. Resized to 28x28 they also fit the MNIST architectures unchanged.
    "data": {"search": {"kind": "digits", "split": "test", "resize": 28}},
    # The classifier under test is trained briefly (4 epochs, about 95% test accuracy): a model with
    # failures to find and fix in a few minutes. The oracle is a second CNN trained for 25 epochs.
    "classifier": {"architecture": "small_cnn", "train": {"epochs": 4}},
    "generator": {"architecture": "beta_vae", "train": {"epochs": 60, "beta": 4.0}},
    # Small centred noise, as in jobs/mnist_defuse.yaml: larger draws mostly turn digits into other
    # digits, where the oracle agrees with the classifier and no region is a failure.
    "strategy": {"name": "defuse", "a": 5, "b": 5, "centred": True, "only_correct_reconstructions": True,
                 "draws": 100, "max_faults_per_image": 5},
    "reduce": {"samples_per_region": 50, "tau": 0.1},
    "oracle": {"architecture": "small_cnn", "train": {"epochs": 25, "seed": 1}},
    "correction": {"lambdas": [1e-10, 1.0, 100.0]},
}
CONFIG_ORACLE = "<config>"
USER_ERRORS = (ConfigError, DataError, ModelError, StorageError, LabelError)


def _demo(args) -> int:
    """The whole loop on the bundled digits: identify -> regions -> oracle labels -> correction -> report."""
    from genstress_ray import labeling
    from genstress_ray.correction import run_correction
    from genstress_ray.pipeline import config_oracle, run_campaign
    from genstress_ray.report import write_report
    from genstress_ray.storage import RunStore

    t0 = time.time()
    result = run_campaign(DEMO_CONFIG, output=args.output, run_id=args.run_id)
    print(result.summary(), flush=True)
    store = RunStore.from_uri(result.run_uri)
    if result.regions:
        # The oracle is a second CNN (another seed, more epochs).
        labeling.write_labels(store, labeling.label_run(store, config_oracle(store)), result.class_names)
        print(run_correction(result.run_uri).summary(), flush=True)
    print(f"report: {write_report(store)}")
    print(f"wall time {time.time() - t0:.1f}s")
    return 0


def _correct(args) -> int:
    from genstress_ray.correction import run_correction

    overrides = {k: v for k, v in {"lambdas": args.lambdas, "workers": args.workers, "epochs": args.epochs,
                                   "max_concurrent_trials": args.max_concurrent_trials,
                                   "baseline": False if args.no_baseline else None}.items() if v is not None}
    print(run_correction(args.run, overrides).summary())
    return 0


def _run(args) -> int:
    from genstress_ray.pipeline import run_campaign

    result = run_campaign(args.config, output=args.output, run_id=args.run_id, stop_after=args.until)
    print(result.summary())
    return 0


# ``genstress train <model>``: the registry kind and default architecture of each built-in.
TRAINABLE = {"classifier": ("classifier", "small_cnn"), "vae": ("latent_generator", "beta_vae"),
             "stylegan": ("style_generator", "small_stylegan"), "ddpm": ("diffusion_model", "small_ddpm")}


def _train(args) -> int:
    from genstress_ray.models import load_module

    role, default_architecture = TRAINABLE[args.model]
    data = {"uri": args.data_uri, "resize": args.resize, "seed": args.seed}
    if args.split_from:
        data["split_from"] = args.split_from
    train = get_source(args.data, split="train", **data).load()
    val = get_source(args.data, split="validation", **data).load()
    settings = {"seed": args.seed, **({"epochs": args.epochs} if args.epochs else {})}
    if args.model == "vae":
        settings["beta"] = args.beta
    if args.model in ("stylegan", "ddpm") and args.max_minutes:
        settings["max_seconds"] = 60 * args.max_minutes
    if args.model == "stylegan":
        if args.reference:
            settings["reference"], _ = load_module(args.reference)
    metrics = train_and_save(role, args.architecture or default_architecture, train, val, args.output, None, settings)
    print(f"wrote {args.output}: {metrics}")
    return 0


def _assess(args) -> int:
    import json

    from genstress_ray.assessment import assess_run

    overrides = {"quantile": args.quantile} if args.quantile else None
    print(json.dumps(assess_run(args.run, overrides=overrides), indent=2))
    return 0


def _label(args) -> int:
    import json

    from genstress_ray import labeling
    from genstress_ray.storage import RunStore, filesystem_for, write_bytes_atomic

    store = RunStore.from_uri(args.run)
    manifest = store.read_manifest()
    if "class_names" not in manifest:
        raise LabelError(f"run {store.uri} was made by an older genstress_ray (no class_names in its manifest); "
                         "rerun it with the same run id to record them")
    class_names = manifest["class_names"]
    if not (args.file or args.import_label_studio) and not store.is_complete("region_samples"):
        raise LabelError(f"run {store.uri} has no finished region_samples stage to label")
    if args.export_label_studio:
        tasks = labeling.export_tasks(store.read_table("region_samples"), class_names, store.uri, args.per_region)
        fs, path = filesystem_for(args.export_label_studio)
        write_bytes_atomic(fs, path, json.dumps(tasks).encode())
        config_path = path.rsplit(".", 1)[0] + ".xml"
        write_bytes_atomic(fs, config_path, labeling.labeling_config(class_names).encode())
        print(f"wrote {len(tasks)} Label Studio tasks to {args.export_label_studio} "
              f"and the labeling config to {config_path}")
        return 0
    if not (args.oracle or args.file or args.import_label_studio):
        from genstress_ray.labeling.review import ReviewServer

        server = ReviewServer(store, args.port, per_region=args.per_region)
        print(f"review page for {store.uri} (labels are saved as you click; Ctrl-C stops):\n  {server.url}",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    if args.oracle:
        from genstress_ray.pipeline import config_oracle
        from genstress_ray.stages import ModelRef, load_classifier

        reference = config_oracle(store) if args.oracle == CONFIG_ORACLE else \
            load_classifier(ModelRef(args.oracle), class_names, manifest["image_shape"])
        table = labeling.label_run(store, reference, args.rho, args.per_region, args.fault_labels)
    elif args.file:
        table = labeling.read_label_file(args.file)
    else:
        table = labeling.import_export(args.import_label_studio, store.uri)
    labeling.write_labels(store, table, class_names)
    info = store.marker("labels")
    faults = info["labels"] - info["regions"]
    print(f"labels: {info['regions']} regions labelled, {info['failure_regions']} failure regions"
          + (f", {faults} faults labelled one by one" if faults else "") + f" -> {store.uri}/labels")
    return 0


def _report(args) -> int:
    from genstress_ray.report import write_report
    from genstress_ray.storage import RunStore

    store = RunStore.from_uri(args.run)
    if not store.is_complete("region_samples"):
        raise StorageError(f"run {store.uri} has unfinished stages: run the campaign to the end first")
    print(f"report: {write_report(store, args.per_region)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genstress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the whole Defuse loop on scikit-learn's bundled digits (no data needed): "
                                       "identify, regions, oracle labels, correction, report")
    demo.add_argument("--output", help="output folder or URI (default: ./genstress-runs)")
    demo.add_argument("--run-id")
    demo.set_defaults(func=_demo)
    run = sub.add_parser("run", help="run or resume a campaign from a YAML config")
    run.add_argument("config")
    run.add_argument("--output", help="overrides the config's output (local path or fsspec URI)")
    run.add_argument("--run-id", help="overrides the config's run id; an existing run id resumes")
    run.add_argument("--until", choices=STAGES,
                     help="stop after this stage (a later run without it resumes)")
    run.set_defaults(func=_run)
    assess = sub.add_parser("assess", help="measure a run's search output: fault detection, diversity, validity, "
                                           "Frechet distance (writes assessment.json into the run)")
    assess.add_argument("run", help="the run URI: <output>/<campaign>/<run_id>")
    assess.add_argument("--quantile", type=float, help="validity: quantile of real reconstruction errors (0.99)")
    assess.set_defaults(func=_assess)
    label = sub.add_parser("label", help="label a run's regions, one label per region: with no option, serve the "
                                         "review page on 127.0.0.1")
    label.add_argument("run", help="the run URI: <output>/<campaign>/<run_id>")
    how = label.add_mutually_exclusive_group()
    how.add_argument("--oracle", metavar="CHECKPOINT", nargs="?", const=CONFIG_ORACLE,
                     help="a reference classifier labels the region samples (no CHECKPOINT: the config's oracle)")
    how.add_argument("--file", help="import region labels from a CSV/JSON file (region_id,label[,is_failure])")
    how.add_argument("--export-label-studio", metavar="TASKS_JSON", help="write Label Studio tasks (+ config .xml)")
    how.add_argument("--import-label-studio", metavar="EXPORT_JSON", help="import Label Studio's JSON export")
    label.add_argument("--rho", type=float, default=0.5, help="oracle: failure when more than rho disagree")
    label.add_argument("--per-region", type=int, default=10, help="samples reviewed (or shown) per region")
    label.add_argument("--port", type=int, default=0, help="review page: port on 127.0.0.1 (default: any free one)")
    label.add_argument("--fault-labels", type=int, default=5000, metavar="N",
                       help="oracle: also label N random faults one by one, for the correction baseline (0: none)")
    label.set_defaults(func=_label)
    correct = sub.add_parser("correct", help="fine-tune the classifier on the labelled failure regions "
                                             "(Ray Train, lambda sweep, Defuse and baseline)")
    correct.add_argument("run", help="the run URI: <output>/<campaign>/<run_id>")
    correct.add_argument("--lambdas", type=float, nargs="*", help="overrides correction.lambdas")
    correct.add_argument("--workers", type=int, help="Ray Train workers per trial (0: local mode)")
    correct.add_argument("--epochs", type=int, help="passes over the training data per trial")
    correct.add_argument("--max-concurrent-trials", type=int)
    correct.add_argument("--no-baseline", action="store_true", help="skip the individually-labelled-faults baseline")
    correct.set_defaults(func=_correct)
    report = sub.add_parser("report", help="write the run's self-contained HTML report into the run")
    report.add_argument("run", help="the run URI: <output>/<campaign>/<run_id>")
    report.add_argument("--per-region", type=int, default=16, help="images shown per region")
    report.set_defaults(func=_report)
    train = sub.add_parser("train", help="train a built-in model and write it as safetensors")
    train.add_argument("model", choices=list(TRAINABLE))
    train.add_argument("--data", default="digits", help="dataset kind (digits, mnist, fashion_mnist, ...)")
    train.add_argument("--data-uri", help="where the dataset lives (folder or fsspec URI)")
    train.add_argument("--resize", type=int)
    train.add_argument("--architecture")
    train.add_argument("--split-from", choices=["test", "train"],
                       help="carve train/validation/test out of one file set (Fashion-MNIST here has test files only)")
    train.add_argument("--epochs", type=int, help="default: 5 (classifier), 20 (vae), 4 (stylegan), 10 (ddpm)")
    train.add_argument("--beta", type=float, default=4.0, help="vae: KL weight")
    train.add_argument("--reference", metavar="CHECKPOINT",
                       help="stylegan: a classifier trained on real data; its accuracy on generated images against "
                            "their class (sample validity) is logged each epoch and stored with the model")
    train.add_argument("--max-minutes", type=float, help="stylegan, ddpm: stop after the epoch that passes this")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output", required=True, help="checkpoint URI (.safetensors)")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="genstress: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
