"""Relabelling proposals: the real training images of a failure region's kind (``retrieval``) whose
dataset label differs from the region's label.

A flaw that comes from mislabelled training data (a visual subgroup of one class labelled as another)
is taught again by every pass over D, and fine-tuning on generated samples of the region does not undo
it. The proposals name those rows so that a person (or an oracle) can correct D itself.

``genstress repair RUN`` writes them to ``repair/proposals`` (a table), ``repair/proposals/proposals.csv``
and Label Studio tasks with their labeling config. Within a region they are ranked, most likely first,
so a reviewer's budget goes to the likeliest rows. Each region is decided as a whole, its images'
own decisions being exceptions: the CSV opens each region with a row of its own (no ``sample_id``),
the Label Studio tasks with a task showing its contact sheet.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow as pa

from genstress_ray.context import RunContext, load_split
from genstress_ray.data import decode_images, png_bytes, png_uri
from genstress_ray.labeling import LabelError, read_labels
from genstress_ray.lease import RunLease
from genstress_ray.real_regions import FailureRegions, RegionMembers, failure_region_labels
from genstress_ray.repair.retrieval import RETRIEVALS
from genstress_ray.storage import PROPOSALS_SCHEMA, RunStore

STAGE = "proposals"
PROPOSALS_CSV = "proposals.csv"
LABEL_STUDIO_TASKS = "label_studio_tasks.json"
LABEL_STUDIO_CONFIG = "label_studio_config.xml"
# The Label Studio choice (and review-page button) that rejects a proposal.
KEEP = "keep the dataset label"


class RepairError(LabelError):
    """Repair cannot go on (no failure regions, no encoder, bad decisions). Nothing is written."""


def propose(ctx: RunContext, quantile: float, retrieval: str = "kind") -> tuple[pa.Table, dict]:
    """The proposals table of a labelled run, and what says how they were found.

    ``retrieval`` names how a region finds its training images (``RETRIEVALS``); ``quantile`` sets each
    region's membership radius for ``radius`` (``regions.assign_real``), as in correction's real-image
    figures (``correction.member_quantile``).
    """
    find = RETRIEVALS.get(retrieval)
    failure_labels, _ = failure_region_labels(read_labels(ctx.store), ctx.class_names)
    if not failure_labels:
        raise RepairError(f"run {ctx.store.uri} has no labelled failure regions: nothing to repair "
                          "(label the run first: genstress label RUN ...)")
    regions = FailureRegions.open(ctx, failure_labels, quantile)
    if isinstance(regions, str):
        raise RepairError(f"cannot propose relabels: {regions.replace('not measured: ', '')}")
    members = find.find(regions, load_split(ctx.cfg.data.train_spec(), "data.train"))
    table = proposal_table(members, ctx.class_names)
    info = {"proposals": table.num_rows, "train_images": len(members.split), "members": int(members.inside.sum()),
            "failure_regions": sorted(failure_labels), "failure_labels": _named(failure_labels, ctx.class_names),
            "retrieval": retrieval, "retrieval_help": find.help,
            "quantile": quantile, "criterion": regions.criterion}
    return table, info


def _named(failure_labels: dict[int, int], class_names: list[str]) -> dict[str, str]:
    return {str(r): class_names[c] for r, c in sorted(failure_labels.items())}


def check_current(store: RunStore, class_names: list[str]) -> None:
    """Refuse decisions on proposals made from failure-region labels the run no longer has."""
    made = store.marker(STAGE).get("failure_labels")
    if made is None:  # proposals of an older version: nothing to compare
        return
    now = _named(failure_region_labels(read_labels(store), class_names)[0], class_names)
    changed = [f"region {r}: {made.get(r, 'not a failure')} -> {now.get(r, 'not a failure')}"
               for r in sorted(set(made) | set(now), key=int) if made.get(r) != now.get(r)]
    if changed:
        raise RepairError(f"the run's regions were labelled again since its proposals were made ({'; '.join(changed)}); "
                          f"nothing decided. Make the proposals again: genstress repair {store.uri} --again")


def proposal_table(members: RegionMembers, class_names: list[str]) -> pa.Table:
    """One proposal per image a failure region takes in (``members``) whose dataset label is not the region's."""
    split = members.split
    rows = np.flatnonzero(members.inside & (members.target != split.labels))
    return pa.Table.from_pylist([
        {"sample_id": split.source_ids[i], "row": int(i), "region_id": int(members.region[i]),
         "dataset_label": class_names[split.labels[i]], "proposed_label": class_names[members.target[i]],
         "image": png_bytes(split.images[i]), "score": float(members.score[i])} for i in rows],
        schema=PROPOSALS_SCHEMA)


def ranked(proposals: pa.Table) -> list[dict]:
    """The proposals by region, most typical of their region first (``score``, then sample id)."""
    return sorted(proposals.to_pylist(), key=lambda r: (r["region_id"], -(r["score"] or 0.0), r["sample_id"]))


def proposals_csv(proposals: pa.Table) -> str:
    """The reviewer's sheet: per region, one row deciding it whole (no sample_id), then its images, ranked."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["sample_id", "region_id", "dataset_label", "proposed_label", "accept"])
    for region, mine in itertools.groupby(ranked(proposals), key=lambda r: r["region_id"]):
        mine = list(mine)
        writer.writerow(["", region, f"{len(mine)} images", mine[0]["proposed_label"], ""])
        for r in mine:
            writer.writerow([r["sample_id"], region, r["dataset_label"], r["proposed_label"], ""])
    return buf.getvalue()


def write_proposals(store: RunStore, table: pa.Table, info: dict, class_names: list[str]) -> None:
    """Replace the run's proposals (table, CSV, Label Studio tasks and labeling config) under the run's lease."""
    with RunLease.for_store(store):
        store.begin_stage(STAGE)
        store.write_table(STAGE, table)
        store.fs.pipe_file(f"{store.stage_path(STAGE)}/{PROPOSALS_CSV}", proposals_csv(table).encode())
        tasks = label_studio_tasks(table, store.uri)
        store.fs.pipe_file(f"{store.stage_path(STAGE)}/{LABEL_STUDIO_TASKS}", json.dumps(tasks).encode())
        store.fs.pipe_file(f"{store.stage_path(STAGE)}/{LABEL_STUDIO_CONFIG}", labeling_config(class_names).encode())
        store.complete_stage(STAGE, info)


def read_proposals(store: RunStore) -> pa.Table:
    if not store.is_complete(STAGE):
        raise RepairError(f"run {store.uri} has no relabelling proposals yet: run genstress repair {store.uri}")
    return store.read_table(STAGE)


# Proposals shown on a region's contact sheet (its Label Studio task): the most likely first.
SHEET_IMAGES = 16


def contact_sheet(images: list[bytes], columns: int = 4) -> bytes:
    """One PNG tiling encoded images (their first ``SHEET_IMAGES``), ``columns`` a row, 2 px apart: a
    region's grid as one image, which any labelling tool displays."""
    tiles = decode_images(images[:SHEET_IMAGES], [f"proposal {i}" for i in range(len(images))], None)
    n, c, h, w = tiles.shape
    rows = -(-n // columns)
    sheet = np.full((c, rows * (h + 2) - 2, min(n, columns) * (w + 2) - 2), 255, np.uint8)
    for i, tile in enumerate(tiles):
        y, x = divmod(i, columns)
        sheet[:, y * (h + 2): y * (h + 2) + h, x * (w + 2): x * (w + 2) + w] = tile
    return png_bytes(sheet)


def label_studio_tasks(proposals: pa.Table, run_uri: str) -> list[dict]:
    """Image-classification tasks: per region, one task deciding it whole (its contact sheet; no
    ``sample_id``), then one per proposal, ranked, whose annotation is an exception to it. The choices
    are the classes and ``KEEP`` (``labeling_config``)."""
    tasks = []
    for region, mine in itertools.groupby(ranked(proposals), key=lambda r: r["region_id"]):
        mine = list(mine)
        given = ", ".join(sorted({r["dataset_label"] for r in mine}))
        tasks.append({"data": {
            "image": png_uri(contact_sheet([r["image"] for r in mine])),
            "question": f"failure region {region}: {len(mine)} training images labelled {given} (the "
                        f"{min(len(mine), SHEET_IMAGES)} most likely shown) look like {mine[0]['proposed_label']}. "
                        f"Relabel them all as {mine[0]['proposed_label']}, or keep the dataset labels? The "
                        "images' own tasks below are exceptions.",
            "sample_id": "", "region_id": region, "images": len(mine), "genstress_run": run_uri}})
        tasks += [{"data": {"image": png_uri(r["image"]),
                            "question": f"the dataset says {r['dataset_label']}; its failure region says "
                                        f"{r['proposed_label']}. What is this image?",
                            "sample_id": r["sample_id"], "region_id": region, "genstress_run": run_uri}}
                  for r in mine]
    return tasks


def labeling_config(class_names: list[str]) -> str:
    """Label Studio's labeling config for the proposals' tasks: the classes and ``KEEP``."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in [*class_names, KEEP])
    return (f'<View>\n  <Image name="image" value="$image"/>\n  <Text name="question" value="$question"/>\n'
            f'  <Choices name="label" toName="image" choice="single" showInline="true">\n{choices}\n  </Choices>\n</View>\n')
