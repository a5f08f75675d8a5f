"""The HTML report of a real (tiny) run: self-contained, one section per region, images that decode."""

import base64
import io
from html.parser import HTMLParser

import pytest
from PIL import Image

from genstress_ray.cli import main
from genstress_ray.labeling import labels_table, write_labels
from genstress_ray.pipeline import run_campaign
from genstress_ray.report import build_report
from genstress_ray.storage import RunStore

pytestmark = pytest.mark.usefixtures("ray_cluster")


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.alts, self.sections, self.external, self.links = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
            self.alts.append(attrs.get("alt", ""))
        if tag == "a":
            self.links.append(attrs.get("href"))
        if tag == "section":
            self.sections.append(attrs.get("id"))
        for key in ("src", "href"):
            if attrs.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(attrs[key])


def test_report_is_self_contained_with_a_section_and_grid_per_region(tiny_config, tmp_path, capsys):
    result = run_campaign(tiny_config)
    store = RunStore.from_uri(result.run_uri)
    n_regions = result.counts["regions"]
    assert n_regions >= 1
    labels = labels_table([{"region_id": 0, "label": "3", "is_failure": True, "source": "human"}])
    write_labels(store, labels, [str(i) for i in range(10)])
    assert main(["report", result.run_uri, "--per-region", "3"]) == 0
    path = tmp_path / "runs" / "test" / "r1" / "report" / "index.html"
    assert str(path) in capsys.readouterr().out
    page = _Page()
    text = path.read_text()
    page.feed(text)
    assert page.external == []
    # The failure region comes first, in the opening table (linking to its section) and in the sections.
    assert text.index("id='failure-regions'") < text.index("<h2>Correction")
    assert page.links[0] == "#region-0" and page.sections[0] == "region-0"
    assert sorted(page.sections) == sorted(f"region-{i}" for i in range(n_regions))
    # one plot of faults by class, one of region sizes, 3 samples (of 4) per region, and per region its
    # most typical fault next to the digit it was made from
    samples = [a for a in page.alts if " sample " in a]
    faults = [a for a in page.alts if a.startswith("fault ")]
    sources = [a for a in page.alts if a.startswith("source digits:test:")]
    assert len(samples) == 3 * n_regions and len(faults) == len(sources) == n_regions
    assert len(page.images) == 2 + len(samples) + len(faults) + len(sources)
    for src, alt in zip(page.images, page.alts):
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        if alt.startswith(("fault", "source")) or " sample " in alt:  # 8x8 digits, scaled up crisply
            assert min(image.size) >= 112 and len(set(image.getdata())) <= 64  # nearest-neighbour: no new values
    assert "failure region, label 3" in text and "Samples drawn from the region (label 3)" in text
    assert "label not a failure" not in text


def test_report_of_a_run_with_no_regions_says_so(tiny_config):
    tiny_config["strategy"]["max_faults_per_image"] = 1
    tiny_config["data"]["search"]["limit"] = 1
    tiny_config["strategy"]["draws"] = 1
    result = run_campaign(tiny_config)
    assert result.counts["regions"] == 0
    html = build_report(RunStore.from_uri(result.run_uri))
    assert "No regions: too few faults to cluster." in html


def test_plots_stay_readable_with_many_classes():
    """At 43 classes (GTSRB) every class was a crammed, rotated tick: now horizontal bars, largest
    first, at most 25 and the rest summed."""
    from genstress_ray.report.html import _bar_plot

    values = list(range(43))
    uri = _bar_plot([f"class {i}" for i in range(43)], values, "faults by class", "faults")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.size[1] >= 100 * (1.2 + 0.24 * 26) - 5  # a bar row of 24 px for each of 26 bars


def test_a_report_of_a_tampered_regions_table_is_refused_naming_the_file(tiny_config, capsys):
    """`n_members` rewritten as markup text: `genstress report` names the file and column, quotes
    nothing of it and writes no page (before: a traceback)."""
    import pyarrow as pa

    result = run_campaign(tiny_config)
    store = RunStore.from_uri(result.run_uri)
    regions = store.read_table("regions")
    markup = pa.array(["<img src=x onerror=alert(1)>"] * regions.num_rows)
    store.write_table("regions", regions.set_column(regions.schema.get_field_index("n_members"), "n_members",
                                                    markup))
    assert main(["report", result.run_uri]) == 2
    err = capsys.readouterr().err
    assert "column 'n_members' is string, not int64" in err and ".parquet" in err
    assert "onerror" not in err and "Traceback" not in err
    assert not store.fs.exists(f"{store.path}/report/index.html")
