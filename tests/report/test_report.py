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
        self.images, self.sections, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
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
    page.feed(path.read_text())
    assert page.external == []
    assert page.sections == [f"region-{i}" for i in range(n_regions)]
    # one plot of faults by class, one of region sizes, and 3 samples (of 4) per region
    assert len(page.images) == 2 + 3 * n_regions
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.size[0] > 0 and image.size[1] > 0
    text = path.read_text()
    assert "failure region, label 3" in text and text.count("label 3") >= 3


def test_report_of_a_run_with_no_regions_says_so(tiny_config):
    tiny_config["strategy"]["max_faults_per_image"] = 1
    tiny_config["data"]["search"]["limit"] = 1
    tiny_config["strategy"]["draws"] = 1
    result = run_campaign(tiny_config)
    assert result.counts["regions"] == 0
    html = build_report(RunStore.from_uri(result.run_uri))
    assert "No regions: too few faults to cluster." in html
