"""One self-contained HTML report per run: every image and plot is inlined, so it opens offline.

Sections: the campaign summary, the fault and region-size plots, the correction (before / baseline /
Defuse table and the lambda trade-off plot), and one section per region with a grid of its samples
(the classifier's prediction and, once labelled, the region's label on each).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # no display on batch machines
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from genstress_ray.labeling.oracle import reviewed_samples  # noqa: E402
from genstress_ray.labeling.table import STAGE as LABELS_STAGE  # noqa: E402
from genstress_ray.storage import RunStore, write_bytes_atomic  # noqa: E402

REPORT_STAGE = "report"
CORRECTION_STAGE = "correction"
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:72rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:.5rem}.cell{text-align:center;font-size:.8rem}
.cell img{width:84px;height:84px;image-rendering:pixelated;border:1px solid #999;display:block}
.failure{color:#b00020;font-weight:600}.plots img{max-width:34rem}
"""


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _bar_plot(labels: list[str], values: list[float], title: str, xlabel: str, ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(values)), labels, rotation=90 if len(labels) > 12 else 0, fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _figure_uri(fig)


def _figure_uri(fig) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return png_uri(buf.getvalue())


def _tradeoff_plot(trials: list[dict], before: dict) -> str:
    """Test accuracy against region accuracy, one point per lambda (the Defuse paper's figure 5)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for method, color in (("defuse", "#c44e52"), ("baseline", "#4c72b0")):
        mine = sorted((t for t in trials if t["method"] == method), key=lambda t: t["lam"])
        if not mine:
            continue
        ax.plot([t["region_test_acc"] for t in mine], [t["test_acc"] for t in mine], "o-", color=color, label=method)
        for t in mine:
            ax.annotate(f"{t['lam']:g}", (t["region_test_acc"], t["test_acc"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.plot([before["region_test_acc"]], [before["test_acc"]], "k*", markersize=12, label="before")
    ax.set(title="lambda trade-off (labels: lambda)", xlabel="region test accuracy", ylabel="test accuracy")
    ax.legend(fontsize=8)
    return _figure_uri(fig)


def _correction_section(store: RunStore) -> str:
    if not store.is_complete(CORRECTION_STAGE):
        return ("<p>Not corrected yet: label the regions (<code>genstress label</code>), then run "
                "<code>genstress correct</code>.</p>")
    results = json.loads(store.fs.cat_file(f"{store.stage_path(CORRECTION_STAGE)}/results.json"))
    head = (f"<p>{results['n_failure_regions']} failure regions of {results['n_regions']} regions "
            f"({results['n_labelled_regions']} labelled); lambda chosen by {html.escape(results['select_by'])} "
            f"validation accuracy.</p>")
    if results.get("message"):
        head += f"<p>{html.escape(results['message'])}</p>"
    rows = []
    for name in ("before", "baseline", "defuse"):
        r = results.get(name)
        if r:
            lam = "" if r.get("lam") is None else f"{r['lam']:g}"
            rows.append(f"<tr><th>{name}</th><td>{r['test_acc']:.4f}</td>"
                        f"<td>{r.get('region_test_acc', float('nan')):.4f}</td><td>{lam}</td></tr>")
    table = ("<table id='before-after'><tr><th></th><th>test accuracy</th><th>region test accuracy</th>"
             f"<th>lambda</th></tr>{''.join(rows)}</table>")
    trials = store.read_table(CORRECTION_STAGE).to_pylist()
    plot = f"<div class='plots'><img src='{_tradeoff_plot(trials, results['before'])}' alt='lambda trade-off'></div>" \
        if trials else ""
    return head + table + plot


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _assessment_section(store: RunStore) -> str:
    """The headline figures of ``genstress assess``, when the run has been assessed."""
    path = f"{store.path}/assessment.json"
    if not store.fs.exists(path):
        return "<p>Not assessed yet: run <code>genstress assess RUN</code>.</p>"
    a = json.loads(store.fs.cat_file(path))
    if "sweep" in a:
        return _sweep_table(a)
    rows = [("faults per candidate / per generator call",
             f"{a['fault_detection']['faults_per_candidate']:.4f} / {a['fault_detection']['faults_per_call']:.4f}"),
            ("valid faults (VAE reconstruction within the real "
             f"{a['validity']['quantile']:.0%} quantile)", f"{a['validity']['faults_valid']:.1%}"),
            ("feature diversity (mean pairwise distance)", f"{a['diversity']['mean_pairwise_feature_distance']:.2f}"),
            ("distinct (intended, predicted) class pairs", a["diversity"]["distinct_class_pairs"]),
            ("Frechet distance to real images", f"{a['frechet_distance']:.1f}")]
    if "ssim_to_seed" in a["validity"]:
        rows.append(("SSIM to the seed image", f"{a['validity']['ssim_to_seed']:.3f}"))
    if "bisection" in a:
        b = a["bisection"]
        rows.append(("bisection steps (mean / max)", f"{b['mean_iterations']:.1f} / {b['max_iterations']}"))
    return _table(rows)


def _sweep_table(a: dict) -> str:
    """KLDB guidance per (alpha, beta): how close to the boundary of C, and how far from real images."""
    head = ["beta", "alpha", "samples", "median KLDB", "median entropy", "top-|C| in C", "on the boundary",
            "Frechet distance to real C"]
    if a.get("judge"):
        head += ["median KLDB (independent)", "top-|C| in C (independent)"]
    body = []
    for r in a["sweep"]:
        cells = [r["beta"], r["alpha"], r["samples"], f"{r['median_kldb']:.3f}", f"{r['median_entropy']:.3f}",
                 f"{r['top_c_rate']:.1%}", f"{r['boundary_rate']:.1%}", f"{r['frechet_distance']:.1f}"]
        if "independent" in r:
            cells += [f"{r['independent']['median_kldb']:.3f}", f"{r['independent']['top_c_rate']:.1%}"]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    caption = html.escape(f"boundary of {', '.join(a['classes'])}; alpha = 0 is the prompt-only baseline")
    return f"<table><caption>{caption}</caption>{header}{''.join(body)}</table>"


def build_report(store: RunStore, per_region: int = 16) -> str:
    """The report's HTML for the run in ``store`` (its stages must have finished)."""
    manifest = store.read_manifest()
    names = manifest.get("class_names") or []
    name = (lambda i: names[i] if 0 <= i < len(names) else str(i))
    counts = manifest.get("row_counts", {})
    rate = counts.get("faults", 0) / counts["candidates"] if counts.get("candidates") else 0.0
    strategy = manifest.get("config", {}).get("strategy", {})
    summary = _table([("campaign", manifest.get("campaign")), ("run", store.uri),
                      ("strategy", ", ".join(f"{k}={v}" for k, v in strategy.items())),
                      ("candidates", counts.get("candidates", 0)), ("faults", f"{counts.get('faults', 0)} ({rate:.1%})"),
                      ("rows kept", counts.get("samples", 0)), ("non-finite dropped", counts.get("nonfinite_dropped", 0)),
                      ("regions", counts.get("regions", 0)),
                      ("stage seconds", ", ".join(f"{k} {v}" for k, v in manifest.get("timings", {}).items()))])

    faults = store.read_table("identify", columns=["source_label", "pred"], filter=pc.field("fault"))
    by_class = Counter(faults["source_label"].to_pylist())
    plotted = ("true class", "kept faults by true class")
    if faults.num_rows and set(by_class) == {-1}:  # KLDB's boundary samples have no intended class
        by_class, plotted = Counter(faults["pred"].to_pylist()), ("predicted class", "boundary samples by predicted class")
    regions = store.read_table("regions").to_pylist()
    plots = [(plotted[1], _bar_plot([name(c) for c in range(len(names))],
                                    [by_class.get(c, 0) for c in range(len(names))], plotted[1], plotted[0], "faults"))]
    if regions:
        plots.append(("region sizes", _bar_plot([str(r["region_id"]) for r in regions], [r["n_members"] for r in regions],
                                                "region sizes", "region", "faults in region")))

    labels = {}
    if store.is_complete(LABELS_STAGE):
        labels = {r["region_id"]: r for r in store.read_table(LABELS_STAGE).to_pylist() if r["region_id"] is not None}
    shown: dict[int, list[dict]] = {}
    samples = store.read_table("region_samples", columns=["region_id", "draw", "image", "pred"])
    for s in reviewed_samples(samples, per_region).to_pylist():
        shown.setdefault(s["region_id"], []).append(s)
    sections = []
    for r in regions:
        rid = r["region_id"]
        label = labels.get(rid)
        verdict = "not labelled yet" if label is None else (
            f"<span class='failure'>failure region, label {html.escape(label['label'])}</span>" if label["is_failure"]
            else "labelled: not a failure")
        cells = "".join(
            f"<div class='cell'><img src='{png_uri(s['image'])}' alt='region {rid} sample {s['draw']}'>"
            f"pred {html.escape(name(s['pred']))}"
            + (f"<br>label {html.escape(label['label'])}" if label else "") + "</div>" for s in shown.get(rid, []))
        sections.append(
            f"<section id='region-{rid}'><h3>Region {rid}</h3>"
            f"<p>weight {r['weight']:.3f}, {r['n_members']} faults; true {html.escape(name(r['dominant_source_label']))} "
            f"({r['dominant_source_share']:.0%}) predicted as {html.escape(name(r['dominant_pred']))} "
            f"({r['dominant_pred_share']:.0%}); {verdict}</p><div class='grid'>{cells}</div></section>")
    if not regions:
        sections.append("<p>No regions: too few faults to cluster.</p>")
    plot_html = "".join(f"<img src='{uri}' alt='{html.escape(title, quote=True)}'>" for title, uri in plots)
    title = html.escape(f"genstress report: {manifest.get('campaign', '')} / {store.run_id}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body><h1>{title}</h1><h2>Summary</h2>{summary}"
            f"<h2>Plots</h2><div class='plots'>{plot_html}</div><h2>Assessment</h2>{_assessment_section(store)}"
            f"<h2>Correction</h2>{_correction_section(store)}<h2>Regions</h2>{''.join(sections)}</body></html>")


def write_report(store: RunStore, per_region: int = 16) -> str:
    """Write ``<run>/report/index.html`` atomically and return its URI."""
    page = build_report(store, per_region)
    store.fs.makedirs(store.stage_path(REPORT_STAGE), exist_ok=True)
    write_bytes_atomic(store.fs, f"{store.stage_path(REPORT_STAGE)}/index.html", page.encode())
    return f"{store.uri}/{REPORT_STAGE}/index.html"
