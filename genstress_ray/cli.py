"""The genstress command: demo, run, scan, submit, jobs, stop, runs, status, assess, label, repair, correct,
report, train."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
import traceback

from genstress_ray.config import ConfigError
from genstress_ray.console import HideRayNotices, configure_output
from genstress_ray.data import DataError, get_source
from genstress_ray.job_commands import add_jobs
from genstress_ray.jobs import JobError
from genstress_ray.label_commands import CONFIG_HELP, RUN_HELP, add_label, add_repair, print_flags
from genstress_ray.labeling import LabelError
from genstress_ray.models import ModelError, train_and_save
from genstress_ray.scan.run import ScanError
from genstress_ray.storage import STAGES, StageError, StorageError

DEMO_CONFIG = {
    "campaign": "demo",
    "output": "genstress-runs",
    # Digits are 8x8; at that size a beta=4 VAE's KL term swamps the 64-pixel reconstruction and the
    # posterior collapses. Resized to 28x28 they also fit the MNIST architectures unchanged. The
    # search takes half of the test split (180 images, by a seeded hash of each image's index); the
    # other half (179) is the held-out test split every verdict is measured on.
    "data": {"search": {"kind": "digits", "split": "test", "resize": 28, "share": [0.0, 0.5]}},
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
USER_ERRORS = (ConfigError, DataError, ModelError, StorageError, LabelError, JobError, ScanError)
log = logging.getLogger("genstress_ray.cli")


def _demo(args) -> int:
    """The whole loop on the bundled digits: identify -> regions -> oracle labels -> correction -> report."""
    from genstress_ray import labeling
    from genstress_ray.correction import run_correction
    from genstress_ray.pipeline import new_run_id, run_campaign
    from genstress_ray.report import write_report
    from genstress_ray.storage import RunStore

    t0 = time.time()
    run_id = args.run_id or new_run_id()
    args.resume = "genstress demo" + (f" --output {args.output}" if args.output else "") + f" --run-id {run_id}"
    result = run_campaign(DEMO_CONFIG, output=args.output, run_id=run_id)
    print(result.summary(), flush=True)
    store = RunStore.from_uri(result.run_uri)
    if result.regions:
        if store.is_complete("labels") and "oracle" in store.marker("labels").get("sources", []):
            log.info("labels: already made by the oracle, kept")
        else:  # the oracle is a second CNN (another seed, more epochs)
            table = labeling.LABELLERS.get("oracle").label(store, labeling.CONFIG_ORACLE, {})
            labeling.write_labels(store, table, result.class_names)
        print_flags(store.marker("labels").get("flagged", {}), store.uri)
        print(run_correction(result.run_uri).summary(), flush=True)
    print(f"report: {write_report(store)}")
    print(f"wall time {time.time() - t0:.1f}s")
    return 0


def _correct(args) -> int:
    from genstress_ray.correction import run_correction

    overrides = {k: v for k, v in {"lambdas": args.lambdas, "workers": args.workers, "epochs": args.epochs,
                                   "max_concurrent_trials": args.max_concurrent_trials,
                                   "baseline": False if args.no_baseline else None,
                                   "relabel": args.relabel or None, "region_data": args.region_data,
                                   "confirm_flagged": args.confirm_flagged}.items()
                 if v is not None}
    args.resume = shlex.join(["genstress", *args.argv])  # a failed trial's sweep is run again whole
    print(run_correction(args.run, overrides, config=args.config).summary())
    return 0


def _run(args) -> int:
    from genstress_ray.config import load_config
    from genstress_ray.pipeline import new_run_id, run_campaign

    _require_env(args.require_env)
    # The run id is fixed here, so an interrupted or failed run can say which command resumes it.
    cfg = load_config(args.config, output=args.output, run_id=args.run_id)
    if args.accept_low_fidelity:
        cfg = cfg.model_copy(update={"checks": cfg.checks.model_copy(update={"accept_low_fidelity": True})})
    run_id = cfg.run_id or new_run_id()
    args.resume = f"genstress run {args.config}" + (f" --output {args.output}" if args.output else "") + \
        f" --run-id {run_id}"
    result = run_campaign(cfg, run_id=run_id, stop_after=args.until)
    print(result.summary())
    return 0


def _require_env(names: list[str] | None) -> None:
    """A job names the credentials it needs (``--require-env``); say which are not set here."""
    missing = [name for name in names or () if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"--require-env: {', '.join(missing)} not set in this environment (on a cluster: set "
                          "them on every node, e.g. in cluster.yaml or the RayCluster's env)")


def _trainable() -> dict:
    """``genstress train <command>``: every registered model kind, by its command name."""
    from genstress_ray.models import MODEL_KINDS

    return {kind.command: kind for kind in MODEL_KINDS.values()}


# The options of ``genstress train`` a kind may take (``ModelKind.train_options``), as training settings.
TRAIN_OPTIONS = {
    "beta": lambda value: {"beta": value},
    "max_minutes": lambda value: {"max_seconds": 60 * value} if value else {},
    "reference": lambda value: {"reference": _load_module(value)} if value else {},
}


# Architecture parameters ``genstress train`` sets (a config sets them under ``<model>.params``).
ARCHITECTURE_OPTIONS = {"latent_dim": "vae: latent size (the Defuse paper: 10 on MNIST, 15 on traffic signs)",
                        "width": "classifier, vae, segmenter: channels of the first conv layer",
                        "hidden": "classifier, vae: units of the fully connected layers"}


def _load_module(uri: str):
    from genstress_ray.models import load_module

    return load_module(uri)[0]


def _train(args) -> int:
    kind = _trainable()[args.model]
    data = {"uri": args.data_uri, "resize": args.resize, "seed": args.seed}
    if args.split_from:
        data["split_from"] = args.split_from
    train = get_source(args.data, split="train", **data).load()
    val = get_source(args.data, split="validation", **data).load()
    settings = {"seed": args.seed, **({"epochs": args.epochs} if args.epochs else {})}
    for option in kind.train_options:
        settings.update(TRAIN_OPTIONS[option](getattr(args, option)))
    params = {name: getattr(args, name) for name in ARCHITECTURE_OPTIONS if getattr(args, name) is not None}
    metrics = train_and_save(kind.name, args.architecture or kind.default["architecture"], train, val, args.output,
                             params, settings, args.threads)
    print(f"wrote {args.output}: {metrics}")
    return 0


def _assess(args) -> int:
    import json

    from genstress_ray.assessment import assess_run

    overrides = {"quantile": args.quantile} if args.quantile else None
    print(json.dumps(assess_run(args.run, overrides=overrides, config=args.config), indent=2))
    return 0


def _report(args) -> int:
    from genstress_ray.report import write_report
    from genstress_ray.storage import RunStore

    store = RunStore.from_uri(args.run)
    if not store.is_complete("region_samples"):
        raise StorageError(f"run {store.uri} has unfinished stages: run the campaign to the end first")
    print(f"report: {write_report(store, args.per_region)}")
    return 0


def _runs(args) -> int:
    from genstress_ray.runs import list_runs

    runs = list_runs(args.output)
    if not runs:
        print(f"no runs under {args.output}")
        return 0
    print(f"{'campaign':<16} {'run id':<20} {'status':<22} {'age':>7}  {'stages done':<44} rows")
    for r in runs:
        done = ",".join(s for s, v in r["stages"].items() if v["done"]) or "-"
        counts = r["row_counts"]
        rows = ", ".join(f"{k} {counts[k]}" for k in ("candidates", "faults", "regions") if k in counts)
        print(f"{r['campaign']:<16} {r['run_id']:<20} {r['status']:<22} {r['age']:>7}  {done:<44} {rows}"
              + (f"  [lease: {r['lease']}]" if r["lease"] else ""))
    return 0


def _status(args) -> int:
    from genstress_ray.runs import run_status
    from genstress_ray.storage import RunStore

    status = run_status(RunStore.from_uri(args.run))
    print(f"run {status['uri']}\n  campaign {status['campaign']}, run id {status['run_id']}, "
          f"status {status['status']}, started {status['age']} ago")
    print(f"  lease: {status['lease'] or 'free (no driver is writing it)'}")
    for stage, info in status["stages"].items():
        rows = ", ".join(f"{k} {v}" for k, v in info.get("rows", {}).items())
        print(f"  {stage:<15} {'done' if info['done'] else 'not done':<9} rerun: {info['next']:<26} {rows}")
        for path, why in info.get("damaged", {}).items():
            print(f"    damaged: {path}: {why}")
    return 0


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="the whole Defuse loop on scikit-learn's bundled digits (no data needed): "
                                       "identify, regions, oracle labels, correction, report")
    demo.add_argument("--output", help="output folder or URI (default: ./genstress-runs)")
    demo.add_argument("--run-id", help="the run's id (default: the start time); an existing run id resumes")
    demo.set_defaults(func=_demo)


def _add_run(sub) -> None:
    from genstress_ray.strategies import STRATEGIES

    run = sub.add_parser("run", help="run or resume a campaign from a YAML config (strategies: "
                                     f"{', '.join(STRATEGIES)})")
    run.add_argument("config", help="the campaign's YAML config")
    run.add_argument("--output", help="overrides the config's output (local path or fsspec URI)")
    run.add_argument("--run-id", help="overrides the config's run id; an existing run id resumes")
    run.add_argument("--until", choices=STAGES, help="stop after this stage (a later run without it resumes)")
    run.add_argument("--accept-low-fidelity", action="store_true",
                     help="search even when the classifier recognises too few of the generator's reconstructions "
                          "(checks.min_fidelity; the figure is printed either way)")
    run.add_argument("--require-env", action="append", metavar="NAME",
                     help="fail early unless this environment variable is set (credentials a submitted job needs)")
    run.set_defaults(func=_run)


def _scan(args) -> int:
    from genstress_ray.scan import main_scan, scan_date

    _require_env(args.require_env)
    day = scan_date(args.date).isoformat()  # fixed here, so the resume command names the same scan
    args.resume = f"genstress scan {args.config}" + "".join(f" --{k} {v}" for k, v in (
        ("registry", args.registry), ("output", args.output), ("date", day)) if v)
    return main_scan(args.config, day, args.output, args.registry)


def _add_scan(sub) -> None:
    scan = sub.add_parser("scan", help="nightly scan: run the scan's campaigns on the registry's newest model version, "
                                       "track every failure region across versions (exit 3 when an alert fires)")
    scan.add_argument("config", help="the scan's YAML config (registry, campaigns, alert thresholds)")
    scan.add_argument("--date", help="the scan's date, YYYY-MM-DD (default: today, UTC); a rerun of a date resumes "
                                     "it, or does nothing when it is complete")
    scan.add_argument("--output", help="overrides the scan config's output (local path or fsspec URI)")
    scan.add_argument("--registry", help="overrides the scan config's model registry (folder or fsspec URI)")
    scan.add_argument("--require-env", action="append", metavar="NAME",
                      help="fail early unless this environment variable is set (credentials a scheduled scan needs)")
    scan.set_defaults(func=_scan)


def _add_inspection(sub) -> None:
    runs = sub.add_parser("runs", help="list the runs under an output folder or URI")
    runs.add_argument("output", nargs="?", default="genstress-runs", help="default: ./genstress-runs")
    runs.set_defaults(func=_runs)
    status = sub.add_parser("status", help="one run's stages, lease holder and what a rerun would do")
    status.add_argument("run", help=RUN_HELP)
    status.set_defaults(func=_status)
    assess = sub.add_parser("assess", help="measure a run's search output: fault detection, diversity, validity, "
                                           "Frechet distance (writes assessment.json into the run)")
    assess.add_argument("run", help=RUN_HELP)
    assess.add_argument("--quantile", type=float, help="validity: quantile of real reconstruction errors (0.99)")
    assess.add_argument("--config", help=CONFIG_HELP)
    assess.set_defaults(func=_assess)
    report = sub.add_parser("report", help="write the run's self-contained HTML report into the run")
    report.add_argument("run", help=RUN_HELP)
    report.add_argument("--per-region", type=int, default=16, help="images shown per region")
    report.set_defaults(func=_report)


def _add_correct(sub) -> None:
    correct = sub.add_parser("correct", help="fine-tune the classifier on the labelled failure regions "
                                             "(Ray Train, lambda sweep, Defuse and baseline)")
    correct.add_argument("run", help=RUN_HELP)
    correct.add_argument("--lambdas", type=float, nargs="*", help="overrides correction.lambdas")
    correct.add_argument("--workers", type=int, help="Ray Train workers per trial (0: local mode)")
    correct.add_argument("--epochs", type=int, help="passes over the training data per trial")
    correct.add_argument("--max-concurrent-trials", type=int, help="trials run at once (default: as CPUs allow)")
    correct.add_argument("--no-baseline", action="store_true", help="skip the individually-labelled-faults baseline")
    correct.add_argument("--relabel", action="store_true", help="apply the accepted relabels of genstress repair to D")
    correct.add_argument("--region-data", choices=["generated", "real", "both", "augmented"],
                         help="overrides correction.region_data: what Df holds for each failure region")
    correct.add_argument("--confirm-flagged", type=int, nargs="+", metavar="REGION",
                         help="use these failure regions although their label is flagged as unsupported "
                              "(genstress label says which are; they are left out otherwise)")
    correct.add_argument("--config", help=CONFIG_HELP)
    correct.set_defaults(func=_correct)


def _add_train(sub) -> None:
    from genstress_ray.data import list_sources

    kinds = _trainable()
    train = sub.add_parser("train", help="train a built-in model and write it as safetensors")
    train.add_argument("model", choices=list(kinds), help="which built-in: " + ", ".join(
        f"{command} ({kind.default['architecture']})" for command, kind in kinds.items()))
    train.add_argument("--data", default="digits", help=f"dataset kind: {', '.join(list_sources())}")
    train.add_argument("--data-uri", help="where the dataset lives (folder or fsspec URI)")
    train.add_argument("--resize", type=int, help="resize images to this side (square) before training")
    train.add_argument("--architecture", help="a registered architecture of that kind (default: the built-in)")
    train.add_argument("--split-from", choices=["test", "train"],
                       help="carve train/validation/test out of one file set (for data sets shipped as one file set)")
    train.add_argument("--epochs", type=int, help="default: " + ", ".join(
        f"{kind.default['train']['epochs']} ({command})" for command, kind in kinds.items()))
    train.add_argument("--beta", type=float, default=4.0, help="vae: KL weight")
    for name, text in ARCHITECTURE_OPTIONS.items():
        train.add_argument("--" + name.replace("_", "-"), type=int, help=text)
    train.add_argument("--reference", metavar="CHECKPOINT",
                       help="stylegan: a classifier trained on real data; its accuracy on generated images against "
                            "their class (sample validity) is logged each epoch and stored with the model")
    train.add_argument("--max-minutes", type=float, help="stylegan, ddpm: stop after the epoch that passes this")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights' init and the batch order")
    train.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1; the weights depend on it, so keep it to reproduce a model)")
    train.add_argument("--output", required=True, help="checkpoint URI (.safetensors)")
    train.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    from genstress_ray import __version__

    parser = argparse.ArgumentParser(prog="genstress", description=__doc__)
    parser.add_argument("--version", action="version", version=f"genstress_ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything Ray prints (its progress bars, worker logs and warnings)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_run, _add_scan, add_jobs, _add_inspection, add_label, add_repair, _add_correct,
                _add_train):
        add(sub)
    return parser


def _shutdown_ray() -> None:
    """Stop the local Ray cluster this command started (or leave a remote one), on every exit path."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


class Terminated(KeyboardInterrupt):
    """SIGTERM (genstress stop, Kubernetes, a scheduler's time limit): ends a command as Ctrl-C does."""


def _interrupt(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if argv is None:
        # SIGTERM (genstress stop, a scheduler's timeout) ends a command as Ctrl-C does: Ray shut down,
        # the run's lease released, the resume command printed.
        signal.signal(signal.SIGTERM, _interrupt)
    configure_output(args.verbose)
    stdout = sys.stdout
    if not args.verbose:
        sys.stdout = HideRayNotices(stdout)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StageError as exc:
        if args.verbose:  # the worker's whole traceback, as Ray gives it
            traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        if exc.fault.resumable and getattr(args, "resume", None):
            print(f"nothing of that stage was kept; to resume, run: {args.resume}", file=sys.stderr)
        else:
            print("nothing of that stage was kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        hint = f"; to resume, run: {args.resume}" if getattr(args, "resume", None) else ""
        terminated = isinstance(exc, Terminated)
        print(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}{hint}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        _shutdown_ray()
        sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
