"""One self-contained HTML report per run: every image and plot is inlined, so it opens offline.

Sections: the failure regions (a table linking to their sections), the correction (before / baseline
/ Defuse table and the lambda trade-off plot), the campaign summary, the fault and region-size plots,
the assessment, and one section per region, failure regions first: its faults next to the images
they were made from, and samples drawn from the region.
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
import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from PIL import Image  # noqa: E402

from genstress_ray.counterfactuals.control import palette  # noqa: E402
from genstress_ray.data import IGNORE, class_name, png_bytes, png_uri  # noqa: E402
from genstress_ray.guardrails import fidelity_line  # noqa: E402
from genstress_ray.labeling.oracle import reviewed_samples  # noqa: E402
from genstress_ray.regions import region_log_density, region_pairs  # noqa: E402
from genstress_ray.registry import resolve  # noqa: E402
from genstress_ray.strategies import STRATEGIES  # noqa: E402
from genstress_ray.storage import CORRECTION_RESULTS, REPORT_PAGE, RunStore, write_bytes_atomic  # noqa: E402

TILE = 112  # pixels: the smallest side of an image tile
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:72rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:.5rem}.cell{text-align:center;font-size:.8rem}
.cell img,.pair img{width:112px;height:112px;image-rendering:pixelated;border:1px solid #999;display:block}
.pair{display:flex;gap:.2rem;align-items:flex-end;font-size:.8rem;border:1px solid #ddd;padding:.2rem}
.pair span{max-width:7rem}caption{text-align:left;font-weight:600;padding:.3rem 0}
.failure{color:#b00020;font-weight:600}.plots img{max-width:34rem;vertical-align:top}
"""


def _bar_plot(labels: list[str], values: list[float], title: str, xlabel: str, most: int = 25) -> str:
    """Horizontal bars, largest first: names stay readable at 43 classes or 100 regions. Past ``most``
    bars the rest are summed into one."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    shown = [(labels[i], values[i]) for i in order[:most]]
    if len(order) > most:
        shown.append((f"{len(order) - most} others", sum(values[i] for i in order[most:])))
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.24 * len(shown)), dpi=100)
    ax.barh(range(len(shown)), [v for _, v in shown], color="#4c72b0")
    ax.set_yticks(range(len(shown)), [lab for lab, _ in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set(title=title, xlabel=xlabel)
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
    if not store.is_complete("correction"):
        return ("<p>Not corrected yet: label the regions (<code>genstress label</code>), then run "
                "<code>genstress correct</code>.</p>")
    results = store.read_json("correction", CORRECTION_RESULTS)
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
    table = ("<table id='before-after'><tr><th></th><th>test accuracy (real, held out)</th>"
             f"<th>region test accuracy (generated samples)</th><th>lambda</th></tr>{''.join(rows)}</table>")
    table += _real_members_table(results.get("real_members", {}))
    if results.get("left_out"):
        table += ("<p class='failure'>Left out of the correction, their label is flagged (confirm with "
                  "<code>genstress correct --confirm-flagged</code>): " + "; ".join(
                      f"region {html.escape(str(k))}: {html.escape(v)}" for k, v in results["left_out"].items()) + "</p>")
    trials = store.read_table("correction").to_pylist()
    plot = f"<div class='plots'><img src='{_tradeoff_plot(trials, results['before'])}' alt='lambda trade-off'></div>" \
        if trials else ""
    return head + table + plot + _relabels_list(results.get("relabels"))


def _rate_cells(group: dict, methods: tuple[str, ...]) -> str:
    if "message" in group:
        return f"<td>{group['n']}</td><td colspan='{len(methods)}'>{html.escape(group['message'])}</td>"
    return f"<td>{group['n']}</td>" + "".join(f"<td>{group[m]:.1%}</td>" if m in group else "<td>-</td>"
                                              for m in methods)


def _real_members_table(real: dict) -> str:
    """The verdict on real images: the held-out test images inside each failure region, against their
    own labels, split into the region's subgroup and its collateral (``correction.real``)."""
    if not real.get("overall"):
        return f"<p>Real held-out members {html.escape(real['message'])}.</p>" if real.get("message") else ""
    methods = tuple(m for m in ("before", "baseline", "defuse") if m in real["overall"]["all"]) or ("before",)
    head = "".join(f"<th>{m}</th>" for m in methods)
    rows = []
    for rid, r in [("all", {"label": "", **real["overall"]}), *real["per_region"].items()]:
        for group in ("subgroup", "collateral"):
            rows.append(f"<tr><td>{html.escape(str(rid))}</td><td>{html.escape(r['label'])}</td><td>{group}</td>"
                        f"{_rate_cells(r[group], methods)}</tr>")
    return (f"<table id='real-members'><caption>Real held-out test images inside the failure regions, each "
            f"against its own label: the subgroup (its label is the region's) must improve, the collateral "
            f"(other labels) must not get worse</caption><tr><th>region</th><th>label</th><th>group</th>"
            f"<th>n</th>{head}</tr>{''.join(rows)}</table><p><small>{html.escape(real['criterion'])}</small></p>")


def _relabels_list(relabels: dict | None) -> str:
    """The training labels data repair changed before fine-tuning (``genstress correct --relabel``)."""
    if relabels is None:
        return ""
    rows = "".join(f"<tr><td>{html.escape(c['sample_id'])}</td><td>{html.escape(c['from'])}</td>"
                   f"<td>{html.escape(c['to'])}</td></tr>" for c in relabels["changes"])
    return (f"<h3>Relabelled training images</h3><p>{relabels['applied']} training labels changed by data repair "
            f"before fine-tuning.</p><table id='relabels'><tr><th>image</th><th>dataset label</th><th>relabelled as"
            f"</th></tr>{rows}</table>")


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _assessment_section(store: RunStore) -> str:
    """The headline figures of ``genstress assess``, when the run has been assessed."""
    if not store.fs.exists(store.stage_path("assessment")):
        return "<p>Not assessed yet: run <code>genstress assess RUN</code>.</p>"
    a = store.read_json("assessment")
    return resolve(STRATEGIES.get(a.get("strategy", "defuse")).report)(a)


def search_table(a: dict) -> str:
    """A search's assessment: fault detection, validity, diversity (and SSIM and bisection for mixing)."""
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


def counterfactual_table(a: dict) -> str:
    """An LLM-counterfactual run's assessment: ``search_table`` and what the method adds."""
    c = a["counterfactual"]
    rows = [("source images / counterfactual texts / language-model calls", f"{c['sources']} / {c['texts']} / "
             f"{c['llm_calls']}"),
            ("source images skipped: the classifier already gets them wrong", c.get("sources_misclassified", 0)),
            ("faults per language-model call", _ratio(a["fault_detection"].get("faults_per_llm_call"))),
            ("captions without a valid rewrite", c["rewrites_invalid"]),
            ("prediction moved off the one on the source image", _ratio(c["flip_rate"], "{:.1%}")),
            ("layout kept by faults: edge agreement / SSIM to the source",
             f"{_ratio(c['fault_edge_agreement'])} / {_ratio(c['fault_ssim_to_source'])}"),
            ("diversity of fault texts: distinct bigrams / mean Jaccard distance",
             f"{_ratio(c['fault_text_diversity']['distinct_2'])} / {_ratio(c['fault_text_diversity']['jaccard'])}")]
    if "oracle_keeps_label" in a["validity"]:
        rows.append(("faults the oracle still gives the source label", f"{a['validity']['oracle_keeps_label']:.1%}"))
    invalid = "".join(f"<li>{html.escape(e)}</li>" for e in c["rewrites_invalid_first"])
    return (search_table(a) + _table(rows) + (f"<p>First invalid rewrites:</p><ul>{invalid}</ul>" if invalid else "")
            + (_segmentation_table(a["segmentation"]) if "segmentation" in a else ""))


def _segmentation_table(seg: dict) -> str:
    """A segmentation model's faults: mIoU before and after, and the IoU drop per class, worst first."""
    rows = _table([("fault: mIoU drop from the source image above", f"{seg['miou_drop_threshold']:.3f}"),
                   ("faults' mIoU on the source image / on the fault",
                    f"{_ratio(seg['fault_miou_source'])} / {_ratio(seg['fault_miou'])}"),
                   ("faults' mIoU drop: mean / median",
                    f"{_ratio(seg['fault_miou_drop'])} / {_ratio(seg['fault_miou_drop_median'])}")])
    body = "".join(f"<tr><td>{html.escape(name)}</td><td>{v['mean_iou_drop']:.3f}</td><td>{v['faults']}</td></tr>"
                   for name, v in seg["iou_drop_by_class"].items())
    return (rows + "<table id='iou-by-class'><caption>IoU drop per class over the faults, worst first</caption>"
            "<tr><th>class</th><th>mean IoU drop</th><th>faults with the class</th></tr>" + body + "</table>")


def _ratio(value, fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None or value != value else fmt.format(value)


def sweep_table(a: dict) -> str:
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


def _tile(data: bytes, side: int = TILE) -> str:
    """A small image scaled up by a whole factor with nearest-neighbour pixels (crisp, not blurred),
    so that 8x8 or 28x28 images are large enough to see in any viewer."""
    image = Image.open(io.BytesIO(data))
    factor = max(1, -(-side // max(image.size)))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return png_uri(buf.getvalue())


def _overlay(image: bytes, label_map: np.ndarray, side: int = TILE) -> str:
    """A tile of ``image`` (PNG bytes) with a label map over it, half transparent, in the colours of
    the segmentation control images (``counterfactuals.control.palette``); unlabelled pixels as they are."""
    rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), np.float32)
    if label_map.shape != rgb.shape[:2]:
        label_map = np.asarray(Image.fromarray(label_map).resize(rgb.shape[1::-1], Image.NEAREST))
    labelled = label_map != IGNORE
    rgb[labelled] = 0.5 * rgb[labelled] + 0.5 * palette(IGNORE)[label_map[labelled]]
    return _tile(png_bytes(rgb.round().astype(np.uint8).transpose(2, 0, 1)), side)


def _legend(names: list[str]) -> str:
    """The overlays' colours, by class."""
    return "<p>Mask colours: " + ", ".join(
        f"<span style='background:rgb({r},{g},{b});padding:0 .6rem'></span> {html.escape(n)}"
        for n, (r, g, b) in zip(names, palette(len(names)).tolist())) + "</p>"


def _mask_pair(e: dict) -> str:
    """A segmentation fault's overlays: the source's mask on the source image, the model's map on the
    fault, and the mIoU drop."""
    p = json.loads(e["params"] or "{}")
    if e.get("source_mask") is None or "pred_mask" not in p:
        return ""
    predicted = np.asarray(Image.open(io.BytesIO(base64.b64decode(p["pred_mask"]))))
    return (f"<img src='{_overlay(e['source_image'], e['source_mask'])}' alt='mask of {html.escape(e['source_id'])}'>"
            f"<img src='{_overlay(e['image'], predicted)}' alt='segmented {html.escape(e['sample_id'])}'>"
            f"<span>mask, then segmented: mIoU {p['miou_source']:.2f} -> {p['miou']:.2f}</span>")


def _region_examples(store: RunStore, manifest: dict, regions, per_region: int) -> dict[int, list[dict]]:
    """For each region, its most typical faults (highest density under the region) with the source
    image each was made from: what the image was, what it became, what the classifier said."""
    faults = store.read_table("identify", columns=["sample_id", "source_id", "latent"], filter=pc.field("fault"))
    if faults.num_rows == 0 or regions.num_rows == 0:
        return {}
    latents = faults["latent"].combine_chunks().flatten().to_numpy().reshape(faults.num_rows, -1)
    density = region_log_density(regions, latents)
    member = density.argmax(1)
    chosen: dict[str, int] = {}
    for j, rid in enumerate(regions["region_id"].to_pylist()):
        idx = np.flatnonzero(member == j)
        for i in idx[np.argsort(-density[idx, j])][:per_region]:
            chosen[faults["sample_id"][int(i)].as_py()] = rid
    rows = store.read_table("identify", columns=["sample_id", "source_id", "source_label", "pred", "image", "params"],
                            filter=pc.field("sample_id").isin(list(chosen))).to_pylist()
    sources = _source_images(manifest, {r["source_id"] for r in rows})
    out: dict[int, list[dict]] = {}
    for r in rows:
        image, mask = sources.get(r["source_id"], (None, None))
        out.setdefault(chosen[r["sample_id"]], []).append({**r, "source_image": image, "source_mask": mask})
    return out


def _source_images(manifest: dict, ids: set[str]) -> dict[str, tuple[bytes, np.ndarray | None]]:
    """PNG bytes of the search images with these source ids, and their masks where the data has
    them (none for seeds of a generator)."""
    if not ids or all(i.startswith("seed:") for i in ids):
        return {}
    from genstress_ray.config import load_config
    from genstress_ray.data import get_source

    spec = load_config(manifest["config"]).data.search  # data only: nothing is imported or built
    try:
        search = get_source(spec.kind, **spec.source_params()).load()
    except Exception:  # the data moved or is unreadable here: the report shows the faults alone
        return {}
    index = {sid: i for i, sid in enumerate(search.source_ids) if sid in ids}
    return {sid: (png_bytes(search.images[i]), None if search.masks is None else search.masks[i])
            for sid, i in index.items()}


def _failure_table(regions: list[dict], labels: dict, per_region: dict, class_names: list[str],
                   real: dict | None = None) -> str:
    """The report's opening table: failure regions (all regions while none is labelled), largest first,
    with their accuracy on generated samples and on their real held-out subgroup (``real``: the
    correction's ``real_members.per_region``)."""
    failures = [r for r in regions if labels.get(r["region_id"], {}).get("is_failure")]
    labelled = bool(labels)
    listed = sorted(failures if labelled else regions, key=lambda r: -r["n_members"])
    if not listed:
        return ("<p id='failure-regions'>No failure regions: " + ("every labelled region was judged not a failure."
                if labelled else "the search found no regions.") + "</p>")
    methods = [m for m in ("defuse", "baseline") if any(m in v for v in per_region.values())]
    real = real or {}
    head = ["region", "faults", "true -> predicted", "label", "generated samples: accuracy before"] + \
        [f"after {m}" for m in methods] + ["real subgroup (held out): n, before"] + [f"after {m}" for m in methods]
    body = []
    for r in listed:
        rid = r["region_id"]
        label = labels.get(rid, {}).get("label") or "not labelled yet"
        if labels.get(rid, {}).get("flag"):
            label += f" (flagged: {labels[rid]['flag']})"
        acc = per_region.get(str(rid), {})
        sub = real.get(str(rid), {}).get("subgroup", {})
        cells = [f"<a href='#region-{rid}'>{rid}</a>", r["n_members"], html.escape(region_pairs(r, class_names)),
                 html.escape(label)] + [f"{acc[k]:.1%}" if k in acc else "-" for k in ["before", *methods]] + \
            [f"{sub['n']}, {sub['before']:.1%}" if "before" in sub else (f"{sub['n']}, too few" if sub else "-")] + \
            [f"{sub[k]:.1%}" if k in sub else "-" for k in methods]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    title = "Failure regions" if labelled else "Regions (not labelled yet; label them to find the failures)"
    return (f"<table id='failure-regions'><caption>{title}, largest first</caption><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(body) + "</table>")


def _summary(store: RunStore, manifest: dict) -> str:
    counts = manifest.get("row_counts", {})
    rate = counts.get("faults", 0) / counts["candidates"] if counts.get("candidates") else 0.0
    strategy = manifest.get("config", {}).get("strategy", {})
    return _table([("campaign", manifest.get("campaign")), ("run", store.uri),
                   ("strategy", ", ".join(f"{k}={v}" for k, v in strategy.items())),
                   ("generator fidelity", fidelity_line(manifest.get("fidelity")).split(": ", 1)[1]),
                   ("candidates", counts.get("candidates", 0)), ("faults", f"{counts.get('faults', 0)} ({rate:.1%})"),
                   ("rows kept", counts.get("samples", 0)), ("non-finite dropped", counts.get("nonfinite_dropped", 0)),
                   ("regions", counts.get("regions", 0)),
                   ("stage seconds", ", ".join(f"{k} {v}" for k, v in manifest.get("timings", {}).items()))])


def _plots(store: RunStore, names: list[str], regions: list[dict]) -> str:
    """Kept faults by class, and region sizes."""
    faults = store.read_table("identify", columns=["source_label", "pred"], filter=pc.field("fault"))
    by_class = Counter(faults["source_label"].to_pylist())
    plotted = ("true class", "kept faults by true class")
    if faults.num_rows and set(by_class) == {-1}:  # KLDB's boundary samples have no intended class
        by_class, plotted = Counter(faults["pred"].to_pylist()), ("predicted class", "boundary samples by predicted class")
    plots = [(plotted[1], _bar_plot([class_name(names, c) for c in range(len(names))],
                                    [by_class.get(c, 0) for c in range(len(names))], plotted[1], "faults"))]
    if regions:
        plots.append(("region sizes", _bar_plot([f"region {r['region_id']}" for r in regions],
                                                [r["n_members"] for r in regions], "region sizes", "faults in region")))
    return "".join(f"<img src='{uri}' alt='{html.escape(title, quote=True)}'>" for title, uri in plots)


def _asked_for(params: str) -> str:
    """What a counterfactual fault was regenerated from (its text), for the caption under it."""
    text = json.loads(params or "{}").get("text")
    return f"; made from &ldquo;{html.escape(text)}&rdquo;" if text else ""


def _region_section(r: dict, label: dict | None, accuracy: dict, examples: list[dict], shown: list[dict],
                    names: list[str]) -> str:
    """One region: its figures and verdict, faults next to their source images, samples drawn from it."""
    rid = r["region_id"]
    name = (lambda i: class_name(names, i))
    failure = bool(label and label["is_failure"])
    verdict = "not labelled yet" if label is None else (
        f"<span class='failure'>failure region, label {html.escape(label['label'])}</span>" if failure
        else "labelled: not a failure")
    pairs = "".join(
        "<div class='pair'>" + (f"<img src='{_tile(e['source_image'])}' alt='source {html.escape(e['source_id'])}'>"
                                if e["source_image"] else "")
        + f"<img src='{_tile(e['image'])}' alt='fault {html.escape(e['sample_id'])}'>"
        f"<span>{'source, then fault: ' if e['source_image'] else ''}true {html.escape(name(e['source_label']))}"
        f", predicted {html.escape(name(e['pred']))}{_asked_for(e['params'])}</span>{_mask_pair(e)}</div>"
        for e in examples)
    cells = "".join(
        f"<div class='cell'><img src='{_tile(s['image'])}' alt='region {rid} sample {s['draw']}'>"
        f"predicted {html.escape(name(s['pred']))}</div>" for s in shown)
    acc = ("; region accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items() if k != "n")) if accuracy else ""
    return (f"<section id='region-{rid}'><h3>Region {rid}</h3>"
            f"<p>weight {r['weight']:.3f}, {r['n_members']} faults; {html.escape(region_pairs(r, names, 3))}; "
            f"{verdict}{acc}</p>"
            + (f"<h4>Faults found, next to the image each was made from</h4>"
               f"{_legend(names) if any(e['source_mask'] is not None for e in examples) else ''}"
               f"<div class='grid'>{pairs}</div>"
               if pairs else "")
            + (f"<h4>Samples drawn from the region{' (label ' + html.escape(label['label']) + ')' if failure else ''}"
               f"</h4><div class='grid'>{cells}</div>" if cells else "") + "</section>")


def build_report(store: RunStore, per_region: int = 16) -> str:
    """The report's HTML for the run in ``store`` (its stages must have finished).

    It opens with the failure regions (size, true -> predicted, label, region accuracy before and
    after correction) linking to their sections; each section shows source images next to the faults
    made from them, and samples drawn from the region.
    """
    manifest = store.read_manifest()
    names = manifest.get("class_names") or []
    region_table = store.read_table("regions")
    regions = region_table.to_pylist()
    labels = {}
    if store.is_complete("labels"):
        labels = {r["region_id"]: r for r in store.read_table("labels").to_pylist() if r["region_id"] is not None}
    per_region_acc, real = {}, {}
    if store.is_complete("correction"):
        results = store.read_json("correction", CORRECTION_RESULTS)
        per_region_acc, real = results.get("per_region", {}), results.get("real_members", {}).get("per_region", {})
    shown: dict[int, list[dict]] = {}
    samples = store.read_table("region_samples", columns=["region_id", "draw", "image", "pred"])
    for s in reviewed_samples(samples, per_region).to_pylist():
        shown.setdefault(s["region_id"], []).append(s)
    examples = _region_examples(store, manifest, region_table, max(1, per_region // 2))
    # Failure regions first, then the rest; larger first within each.
    ordered = sorted(regions, key=lambda r: (not labels.get(r["region_id"], {}).get("is_failure"), -r["n_members"]))
    sections = [_region_section(r, labels.get(r["region_id"]), per_region_acc.get(str(r["region_id"]), {}),
                                examples.get(r["region_id"], []), shown.get(r["region_id"], []), names)
                for r in ordered] or ["<p>No regions: too few faults to cluster.</p>"]
    title = html.escape(f"genstress report: {manifest.get('campaign', '')} / {store.run_id}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
            f"{_failure_table(regions, labels, per_region_acc, names, real)}"
            f"<h2>Correction</h2>{_correction_section(store)}<h2>Summary</h2>{_summary(store, manifest)}"
            f"<h2>Plots</h2><div class='plots'>{_plots(store, names, regions)}</div>"
            f"<h2>Assessment</h2>{_assessment_section(store)}<h2>Regions</h2>{''.join(sections)}</body></html>")


def write_report(store: RunStore, per_region: int = 16) -> str:
    """Write ``<run>/report/index.html`` atomically and return its URI."""
    page = build_report(store, per_region)
    store.fs.makedirs(store.stage_path("report"), exist_ok=True)
    write_bytes_atomic(store.fs, f"{store.stage_path('report')}/{REPORT_PAGE}", page.encode())
    return store.stage_uri("report", REPORT_PAGE)
