"""Failure regions across model versions, without Ray: which regions are the same region, and what
became of each (new, persisting, fixed, fixed on generated samples only, regressed).

Two regions are one region when their labels are compatible (the same, or each among the classes of
the other's faults: ``compatible``) and the faults of one lie within the reach of the other: the **containment** of ``regions.containment`` (the larger of the share of one region's
faults within the other's extent, the farthest of its own faults, and the other way round) is at
least ``match_containment``. The
earlier rule, the Bhattacharyya overlap of the two fitted Gaussians, never matched: a Gaussian fitted
to a few dozen faults in ten dimensions comes out another shape each time (the same faults refitted
with another seed overlapped 0.22 at the median), while where the faults lie does not change.
Regions of different generators live in different latent spaces and are never matched.

A tracked region's status at a scan rests on held-out evidence:

- it **fails** when a failure region of the scan matches it (the search found it again), or the
  version gets less than ``fixed_accuracy`` of its generated test draws (draws no correction trained
  on) right: it is then new, persisting or, when it was fixed at the previous scan, regressed;
- otherwise it is **fixed** when its real subgroup members (held-out test images of its label inside
  it, at least ``MIN_REAL_MEMBERS`` of them) pass too, and **fixed on generated samples only** when
  they do not, or are too few to say.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genstress_ray.regions import Footprint, containments

FIXED, FIXED_GENERATED = "fixed", "fixed on generated samples only"
STATUSES = ("new", "persisting", FIXED, FIXED_GENERATED, "regressed")
FIXED_STATUSES = (FIXED, FIXED_GENERATED)
MIN_REAL_MEMBERS = 10  # real subgroup members a verdict on real images needs
# A region's extent for matching: the distance of its farthest own fault (regions.footprints' quantile).
MATCH_QUANTILE = 1.0


def compatible(label: int, here: Footprint, other_label: int, there: Footprint) -> bool:
    """Whether two regions' labels can name one flaw: the same label, or each label among the classes
    the other region's faults come from or were taken for (an oracle may name a region on the 3/5
    boundary "3" one night and "5" the next). Flaws whose faults share no class never are."""
    return label == other_label or (label in there.classes and other_label in here.classes)


def match_regions(current: dict[int, tuple[int, Footprint]], tracked: list[tuple[str, int, Footprint]],
                  threshold: float) -> tuple[dict[int, tuple[str, float]], dict[int, tuple[str, float]]]:
    """Each current failure region (``{region_id: (label index, footprint)}``) with the tracked region
    of a compatible label (``compatible``) it shares most with, ``{region_id: (tracked id,
    containment)}`` when that containment is at least ``threshold``; and, for every current region,
    the nearest such tracked region whatever its score (how far from a match it was). ``tracked``
    holds (id, label index, footprint) triples. Of two tracked regions with equal containment (a
    small one within a large one), the one that also lies more within the current region wins, then
    one of the same label."""
    matched, nearest = {}, {}
    for rid, (label, here) in current.items():
        scored = [(max(both), min(both), label == their_label, tid) for tid, their_label, there in tracked
                  if compatible(label, here, their_label, there) for both in [containments(here, there)]]
        if not scored:
            continue
        score, _, _, tid = max(scored)
        nearest[rid] = (tid, score)
        if score >= threshold:
            matched[rid] = (tid, score)
    return matched, nearest


@dataclass
class Evidence:
    """What a version does on a tracked region's held-out evidence at one scan: accuracy on its
    generated test draws, on its real subgroup members (own label = the region's label) and on its
    real collateral members (other labels), each with its n; and whether a failure region of the
    scan matches it."""

    generated: float | None
    generated_n: int
    real_subgroup: float | None
    real_subgroup_n: int
    real_collateral: float | None = None
    real_collateral_n: int = 0
    matched: bool = False

    def passes_generated(self, fixed_accuracy: float) -> bool:
        return self.generated is not None and self.generated >= fixed_accuracy

    def passes_real(self, fixed_accuracy: float) -> bool:
        return (self.real_subgroup is not None and self.real_subgroup_n >= MIN_REAL_MEMBERS
                and self.real_subgroup >= fixed_accuracy)


def next_status(previous: str | None, evidence: Evidence, fixed_accuracy: float) -> str:
    """The status of a tracked region at this scan, given its status at the previous one.

    >>> ok, bad = Evidence(0.95, 256, 0.9, 20), Evidence(0.95, 256, 0.3, 20)
    >>> [next_status(None, ok, 0.9), next_status("new", ok, 0.9), next_status("new", bad, 0.9),
    ...  next_status("fixed", Evidence(0.2, 256, 0.1, 20), 0.9), next_status("new", Evidence(0.95, 256, None, 0), 0.9)]
    ['new', 'fixed', 'fixed on generated samples only', 'regressed', 'fixed on generated samples only']
    """
    if previous is None:
        return "new"
    if not evidence.matched and evidence.passes_generated(fixed_accuracy):
        return FIXED if evidence.passes_real(fixed_accuracy) else FIXED_GENERATED
    # A region fixed only on generated samples whose real members fail all the same is no fix lost;
    # one whose generated draws fail again, or that is re-found, regressed.
    return "regressed" if previous in FIXED_STATUSES else "persisting"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def trend_text(history: list[dict]) -> str:
    """``generated 20% -> 35%, real subgroup 40% -> 42% (n 23)``: the last two scans' accuracies."""
    last = history[-2:]
    parts = []
    for key, n_key, name in (("accuracy", "n", "generated"), ("real_subgroup", "real_subgroup_n", "real subgroup")):
        values = " -> ".join(_percent(h.get(key)) for h in last)
        parts.append(f"{name} {values}" + (f" (n {last[-1].get(n_key, 0)})" if key != "accuracy" else ""))
    return ", ".join(parts)


def alerts(regions: list[dict], regressed: bool, new_region_faults: int | None,
           accuracy_drop: float | None) -> list[str]:
    """Why a scan should alert, one line per crossed threshold (empty: all is well).

    ``regions`` are the scan's tracked regions: ``id``, ``status``, ``faults``, ``history`` (each entry
    with ``accuracy`` and ``real_subgroup``; the last entry is this scan's).
    """
    out = []
    for r in regions:
        if regressed and r["status"] == "regressed":
            out.append(f"region {r['id']} regressed: fixed at the previous scan, failing again "
                       f"({trend_text(r['history'])})")
        if new_region_faults and r["status"] == "new" and r.get("faults", 0) >= new_region_faults:
            out.append(f"new failure region {r['id']} with {r['faults']} faults (threshold {new_region_faults})")
        for key, name in (("accuracy", "generated"), ("real_subgroup", "real subgroup")):
            values = [h.get(key) for h in r["history"][-2:]]
            if accuracy_drop and len(values) == 2 and None not in values and values[0] - values[1] > accuracy_drop:
                out.append(f"region {r['id']}: {name} accuracy fell {values[0]:.1%} -> {values[1]:.1%} "
                           f"(more than {accuracy_drop:.0%})")
    return out


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> tuple[float | None, int]:
    """Share right and n; None for no images."""
    return (float((predictions == labels).mean()) if len(labels) else None), int(len(labels))
