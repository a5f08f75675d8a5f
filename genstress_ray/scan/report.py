"""The scan report: one self-contained HTML page per scan date (plots and images inlined).

Sections: alerts; the trend across scans (failing and fixed regions, mean accuracy on the regions'
generated test draws and on their real held-out subgroups, per version); the strategies side by side;
every tracked region with its history and generated test images as the scanned version classifies them.
"""

from __future__ import annotations

import html
import io

import matplotlib.pyplot as plt
import numpy as np

from genstress_ray.data import png_uri
from genstress_ray.report.html import STYLE, _tile
from genstress_ray.scan.tracking import FIXED_GENERATED, STATUSES, trend_text

COLOURS = {"new": "#dd8452", "persisting": "#c44e52", "fixed": "#55a868", FIXED_GENERATED: "#a6d5a0",
           "regressed": "#8172b3"}
FAILING = ("new", "persisting", "regressed")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def trend(history: list[dict]) -> dict[str, list]:
    """Per scan (oldest first): its label (date and version), regions per status, and the scanned
    version's mean accuracy over every tracked region on their generated test draws (``accuracy``)
    and on their real held-out subgroup members (``real_subgroup``)."""
    out = {"scan": [f"{r['date']}\n{r['version']['version']}" for r in history], **{s: [] for s in STATUSES},
           "accuracy": [], "real_subgroup": []}
    for r in history:
        statuses = [t["status"] for t in r["regions"]]
        for s in STATUSES:
            out[s].append(statuses.count(s))
        for key in ("accuracy", "real_subgroup"):
            out[key].append(_mean([t["history"][-1].get(key) for t in r["regions"]]))
    return out


def trend_png(history: list[dict]) -> bytes:
    """The trend plot as PNG bytes: tracked regions per status (bars) and mean region accuracy (line)."""
    t = trend(history)
    x = np.arange(len(t["scan"]))
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    bottom = np.zeros(len(x))
    for s in STATUSES:
        ax.bar(x, t[s], bottom=bottom, color=COLOURS[s], label=s, width=0.6)
        bottom += np.asarray(t[s])
    ax.set_xticks(x, t["scan"], fontsize=8)
    ax.set(ylabel="tracked regions", title="tracked failure regions per scanned version")
    acc = ax.twinx()
    for key, style, name in (("accuracy", "ko--", "generated test draws"), ("real_subgroup", "bo-",
                                                                           "real held-out subgroup")):
        shown = [(i, a) for i, a in enumerate(t[key]) if a is not None]
        if shown:
            acc.plot([i for i, _ in shown], [a for _, a in shown], style, label=f"mean accuracy: {name}")
    acc.set(ylim=(0, 1.02), ylabel="mean accuracy over tracked regions")
    handles = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _strategies(record: dict) -> str:
    head = ("campaign", "strategy", "candidates", "faults", "faults per call", "regions", "failure regions",
            *STATUSES, "wall time")
    rows = []
    for name, s in record["strategies"].items():
        cells = (name, s["strategy"], s["candidates"], s["faults"], f"{s['faults_per_call']:.2%}", s["regions"],
                 s["failure_regions"], *(s[k] for k in STATUSES), f"{s['seconds']:.0f} s")
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table><caption>strategies side by side (faults per call: faults per classifier call)</caption><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def _history_cell(region: dict) -> str:
    lines = [f"{h['date']} {html.escape(h['version'])}: <span style='color:{COLOURS[h['status']]}'>{h['status']}"
             f"</span> generated {_percent(h['accuracy'])}, real subgroup {_percent(h.get('real_subgroup'))}"
             for h in region["history"]]
    if region["history"][-1].get("closest"):  # a new region: how near the nearest tracked one came
        tid, score = region["history"][-1]["closest"]
        lines.append(f"<small>nearest tracked region of its label: {html.escape(tid)} (containment {score:.2f})</small>")
    return "<br>".join(lines)


def _examples(examples: list[dict]) -> str:
    return "<div class='grid'>" + "".join(
        f"<div class='cell'><img src='{_tile(e['image'], 56)}' style='width:56px;height:56px;"
        f"border-color:{'#55a868' if e['correct'] else '#c44e52'}'>{html.escape(e['pred'])}</div>"
        for e in examples) + "</div>"


def _regions(record: dict, examples: dict[str, list[dict]]) -> str:
    head = ("region", "label (oracle)", "found as", "status", "generated test draws: acc", "real subgroup (held out)",
            "real collateral (held out)", "history", "generated test images, as this version classifies them")
    order = sorted(record["regions"], key=lambda r: (r["status"] not in FAILING, r["id"]))
    rows = []
    for r in order:
        now = r["history"][-1]
        real = [f"{_percent(now.get(k))} of {now.get(k + '_n', 0)}" if now.get(k + "_n") else "no members"
                for k in ("real_subgroup", "real_collateral")]
        status = f"<b style='color:{COLOURS[r['status']]}'>{r['status']}</b>"
        if r["status"] in ("persisting", "regressed") and len(r["history"]) > 1:
            status += f"<br><small>{html.escape(trend_text(r['history']))}</small>"
        label = html.escape(r["label"]) + (f"<br><small class='failure'>flagged: {html.escape(r['flag'])}</small>"
                                           if r.get("flag") else "")
        cells = (html.escape(r["id"]), label, html.escape(r["pairs"]), status, f"{_percent(now['accuracy'])} of "
                 f"{now['n']}", *real, _history_cell(r), _examples(examples.get(r["id"], [])))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table><caption>tracked failure regions (failing first)</caption><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def scan_report(record: dict, history: list[dict], examples: dict[str, list[dict]]) -> str:
    """The scan's HTML page. ``history``: every scan so far, this one last; ``examples``: per tracked
    region, a few region test images with the version's prediction."""
    v = record["version"]
    alerts = ("<ul class='failure'>" + "".join(f"<li>{html.escape(a)}</li>" for a in record["alerts"]) + "</ul>"
              if record["alerts"] else "<p>no alert: no threshold crossed</p>")
    t = record["thresholds"]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>scan {html.escape(record['scan'])} "
            f"{record['date']}</title><style>{STYLE}</style></head><body>"
            f"<h1>scan {html.escape(record['scan'])}, {record['date']}</h1>"
            f"<p>version <b>{html.escape(v['version'])}</b> ({html.escape(v['uri'])}) of {html.escape(record['registry'])}; "
            f"previous scan: {record['previous'] or 'none'}. A region is <b>fixed</b> when no failure region of "
            f"this scan matches it (same label, containment at least {t['match_containment']}) and the version gets "
            f"at least {t['fixed_accuracy']:.0%} right of its generated test draws (never trained on) and of its real "
            f"held-out subgroup (test images of its label inside it, at least 10); <b>{FIXED_GENERATED}</b> when only "
            f"the generated draws pass or the real members are too few.</p>"
            f"<h2>alerts</h2>{alerts}<h2>trend</h2>"
            f"<div class='plots'><img src='{png_uri(trend_png(history))}'></div>"
            f"<h2>strategies</h2>{_strategies(record)}<h2>regions</h2>{_regions(record, examples)}</body></html>")
