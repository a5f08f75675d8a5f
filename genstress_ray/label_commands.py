"""The commands that label a run and repair its data: ``genstress label`` and ``genstress repair``."""

from __future__ import annotations

import argparse

from genstress_ray.labeling import LabelError
from genstress_ray.labeling.table import removed_decisions

RUN_HELP = "the run URI: <output>/<campaign>/<run_id>"
CONFIG_HELP = ("the campaign's own config file; needed when the run's config names code to import (a "
               "'factory'), which is never taken from the run folder")


def _label(args) -> int:
    from genstress_ray import labeling
    from genstress_ray.storage import RunStore

    store = RunStore.from_uri(args.run)
    manifest = store.read_manifest()
    if "class_names" not in manifest:
        raise LabelError(f"run {store.uri} was made by an older genstress_ray (no class_names in its manifest); "
                         "rerun it with the same run id to record them")
    class_names = manifest["class_names"]
    if manifest.get("config", {}).get("classifier", {}).get("task") == "segmentation":
        raise LabelError(f"run {store.uri} tests a segmentation model (classifier.task: segmentation): its faults "
                         "are judged against the sources' masks by mIoU drop, and region labels (one class per "
                         "image) and the correction they feed are for classifiers; see the report and "
                         "`genstress assess` for its per-class IoU drop")
    method = next((name for name in labeling.LABELLERS if getattr(args, name)), None)
    if method not in ("file", "import_label_studio") and not store.is_complete("region_samples"):
        raise LabelError(f"run {store.uri} has no finished region_samples stage to label")
    if args.export_label_studio:
        return _export_label_studio(store, class_names, args)
    if method is None:
        return _serve_review_page(store, args)
    options = {"rho": args.rho, "per_region": args.per_region, "fault_labels": args.fault_labels, "config": args.config}
    table = labeling.LABELLERS.get(method).label(store, getattr(args, method), options)
    if table.num_rows == 0:
        raise LabelError(f"no labels came from {method.replace('_', ' ')}: nothing written, the run's labels kept")
    labeling.validate_labels(table, labeling.region_ids(store), class_names)  # what is wrong with them first
    removed = removed_decisions(store, table)
    if removed and not args.replace:
        raise LabelError(f"these labels would remove {len(removed)} of the run's labels ({', '.join(removed[:5])}"
                         f"{', ...' if len(removed) > 5 else ''}): nothing written; to replace the run's labels with "
                         "these, add --replace")
    labeling.write_labels(store, table, class_names)
    info = store.marker("labels")
    faults = info["labels"] - info["regions"]
    print(f"labels: {info['regions']} regions labelled, {info['failure_regions']} failure regions"
          + (f", {faults} faults labelled one by one" if faults else "") + f" -> {store.uri}/labels")
    print_flags(info.get("flagged", {}), store.uri)
    return 0


def _share(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1")
    return value


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return int(text)


def print_flags(flagged: dict[str, str], run_uri: str) -> None:
    """The failure labels their regions do not support (``labeling.support``), and what to do."""
    for rid, why in sorted(flagged.items(), key=lambda kv: int(kv[0])):
        print(f"  FLAGGED region {rid}: {why}")
    if flagged:
        print(f"  correction leaves flagged regions out; look at them in the report, relabel them, or confirm them: "
              f"genstress correct {run_uri} --confirm-flagged {' '.join(sorted(flagged, key=int))}")



def _export_label_studio(store, class_names: list[str], args) -> int:
    import json

    from genstress_ray import labeling
    from genstress_ray.storage import filesystem_for, write_bytes_atomic

    tasks = labeling.export_tasks(store.read_table("region_samples"), class_names, store.uri, args.per_region)
    fs, path = filesystem_for(args.export_label_studio)
    write_bytes_atomic(fs, path, json.dumps(tasks).encode())
    config_path = path.rsplit(".", 1)[0] + ".xml"
    write_bytes_atomic(fs, config_path, labeling.labeling_config(class_names).encode())
    print(f"wrote {len(tasks)} Label Studio tasks to {args.export_label_studio} "
          f"and the labeling config to {config_path}")
    return 0



def _serve_review_page(store, args) -> int:
    from genstress_ray.labeling.review import ReviewServer

    server = ReviewServer(store, args.port, per_region=args.per_region)
    print(f"review page for {store.uri} (labels are saved as you click; Ctrl-C stops):\n  {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0



def _repair(args) -> int:
    from genstress_ray import repair
    from genstress_ray.context import RunContext

    if (args.grid or args.exceptions) and not args.oracle:
        raise repair.RepairError("--grid and --exceptions say how the oracle decides: add --oracle [CHECKPOINT]")
    if args.exceptions and not args.grid:
        raise repair.RepairError("--exceptions are images decided one by one after each region is decided "
                                 "whole: add --grid N")
    quantile = {"correction": {"member_quantile": args.quantile}} if args.quantile is not None else None
    ctx = RunContext.open(args.run, args.config, overrides=quantile)  # a bad quantile is named here
    store = ctx.store
    method = next((name for name in repair.DECIDERS if getattr(args, name)), None)
    made = store.marker("proposals").get("retrieval", "radius") if store.is_complete("proposals") else None
    if args.again or quantile or made is None or args.retrieval not in (None, made):
        retrieval = args.retrieval or made or "kind"
        repair.write_proposals(store, *repair.propose(ctx, ctx.cfg.correction.member_quantile, retrieval),
                               ctx.class_names)
    info = store.marker("proposals")
    print(f"repair: {info['proposals']} of {info['train_images']} training images proposed for relabelling by "
          f"{len(info['failure_regions'])} failure regions (retrieval: {info.get('retrieval', 'radius')}) -> "
          f"{store.stage_uri('proposals')} (proposals.csv; label_studio_tasks.json with label_studio_config.xml)")
    if method is not None:
        decide = repair.DECIDERS.get(method)
        # Added to the run's decisions: an image decided again takes its new decision, none is lost.
        repair.add_relabels(store, decide.label(store, getattr(args, method), {
            "config": args.config, "grid": args.grid, "exceptions": args.exceptions}),
                            ctx.class_names)
        done = store.marker("relabels")
        print(f"relabels: {done['accepted']} of {done['decisions']} decided proposals accepted -> "
              f"{store.stage_uri('relabels')}; apply them with: genstress correct {store.uri} --relabel")
    return 0



def _method_options(parser, methods):
    """One option per registered method (``Labeller``), mutually exclusive; returns the group."""
    how = parser.add_mutually_exclusive_group()
    for method in methods.values():
        how.add_argument(method.option, metavar=method.metavar, help=method.help,
                         **({"nargs": "?", "const": method.default} if method.default else {}))
    return how


def add_label(sub) -> None:
    from genstress_ray.labeling import LABELLERS

    label = sub.add_parser("label", help="label a run's regions, one label per region: with no option, serve the "
                                         "review page on 127.0.0.1")
    label.add_argument("run", help=RUN_HELP)
    how = _method_options(label, LABELLERS)
    how.add_argument("--export-label-studio", metavar="TASKS_JSON", help="write Label Studio tasks (+ config .xml)")
    label.add_argument("--config", help=CONFIG_HELP)
    label.add_argument("--rho", type=_share, default=0.5, help="oracle: failure when more than rho disagree (0-1)")
    label.add_argument("--per-region", type=_positive, default=10, help="samples reviewed (or shown) per region")
    label.add_argument("--replace", action="store_true",
                       help="let these labels remove labels the run has (by default that is refused)")
    label.add_argument("--port", type=int, default=0, help="review page: port on 127.0.0.1 (default: any free one)")
    label.add_argument("--fault-labels", type=int, default=5000, metavar="N",
                       help="oracle: also label N random faults one by one, for the correction baseline (0: none)")
    label.set_defaults(func=_label)


def add_repair(sub) -> None:
    from genstress_ray.repair import DECIDERS
    from genstress_ray.repair.retrieval import RETRIEVALS

    repair = sub.add_parser("repair", help="propose relabelling the training images inside failure regions whose "
                                           "dataset label differs from the region's, and decide the proposals")
    repair.add_argument("run", help=RUN_HELP)
    _method_options(repair, DECIDERS)
    repair.add_argument("--retrieval", choices=RETRIEVALS.names(),
                        help="how a region finds its training images: " + "; ".join(
                            f"{r.name}: {r.help}" for r in RETRIEVALS.values()) + " (default: kind, or what made the run's proposals)")
    repair.add_argument("--quantile", type=float, help="retrieval radius: this quantile of a region's own faults' "
                                                         "distances (default: correction.member_quantile)")
    repair.add_argument("--grid", type=_count, default=0, metavar="N",
                        help="oracle: decide each region as a whole from its N most likely proposals, as a person "
                             "looking at the region's grid would (default 0: decide each image)")
    repair.add_argument("--exceptions", type=_count, default=0, metavar="N",
                        help="oracle with --grid: then decide N images one by one, the least likely proposals of "
                             "accepted regions first")
    repair.add_argument("--again", action="store_true", help="make the proposals again (after relabelling regions, "
                                                             "or with another --retrieval)")
    repair.add_argument("--config", help=CONFIG_HELP)
    repair.set_defaults(func=_repair)
