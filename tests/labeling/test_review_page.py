"""The review page in a real headless chromium: click labels, check the table, restart, check again."""

import json
import urllib.error
import urllib.request

import pytest

from genstress_ray.labeling import NOT_A_FAILURE
from genstress_ray.labeling.review import MAX_BODY, ReviewServer
from genstress_ray.pipeline import run_campaign
from genstress_ray.storage import RunStore

from browser import needs_browser

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def served_run(tiny_config):
    result = run_campaign(tiny_config)
    assert result.counts["regions"] >= 2
    server = ReviewServer(RunStore.from_uri(result.run_uri), per_region=3)
    server.start()
    yield server
    server.shutdown()


def _labels(server) -> dict:
    table = server.review.store.read_table("labels")  # as stored (read_labels refuses a tampered table)
    return {r["region_id"]: r for r in table.to_pylist()}


@needs_browser
def test_clicks_are_saved_and_survive_a_restart(served_run, page):
    server = served_run
    page.goto(server.url)
    sections = page.locator("section")
    n = sections.count()
    assert n == len(server.review.region_ids)
    assert page.locator("#region-0 img").count() == 3
    page.locator("#region-0 button[data-label='7']").click()
    page.wait_for_selector("#status-0:text('saved: 7')")
    page.locator("#region-1 button[data-label='not a failure']").click()
    page.wait_for_selector("#status-1:text('saved: not a failure')")
    # Changing one's mind replaces the region's row.
    page.locator("#region-0 button[data-label='3']").click()
    page.wait_for_selector("#status-0:text('saved: 3')")
    labels = _labels(server)
    assert set(labels) == {0, 1}
    assert labels[0]["label"] == "3" and labels[0]["is_failure"] and labels[0]["source"] == "human"
    assert labels[1]["label"] == NOT_A_FAILURE and not labels[1]["is_failure"]
    assert page.console_errors == []

    store = server.review.store
    server.shutdown()
    again = ReviewServer(store, per_region=3)
    again.start()
    try:
        page.goto(again.url)
        assert page.locator("#status-0").inner_text() == "saved: 3"
        assert page.locator("#region-0 button.chosen").inner_text() == "3"
        assert page.locator("#status-1").inner_text() == "saved: not a failure"
    finally:
        again.shutdown()


def _request(url, data=None, host=None):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read()) if "json" in r.headers["Content-Type"] else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_page_refuses_a_missing_token_another_host_and_bad_labels(served_run):
    server = served_run
    base = f"http://127.0.0.1:{server.port}"
    status, body = _request(base + "/")
    assert status == 403 and "token" in body["error"]
    status, body = _request(server.url, host="evil.example:80")
    assert status == 403 and "only this machine" in body["error"]
    post = f"{base}/api/label?token={server.token}"
    status, body = _request(post, json.dumps({"region_id": 0, "label": "banana"}).encode())
    assert status == 400 and "banana" in body["error"]
    status, body = _request(post, json.dumps({"region_id": 999, "label": "3"}).encode())
    assert status == 400 and "999" in body["error"]
    assert not server.review.store.is_complete("labels")  # nothing half-written
    status, body = _request(post, json.dumps({"region_id": 0, "label": "3"}).encode())
    assert status == 200 and _labels(server)[0]["label"] == "3"


def test_the_page_caps_request_bodies_and_type_checks_fields(served_run):
    """A 300 MB POST was read whole (RSS +600 MB) and region_id 1.9 was taken as region 1."""
    server = served_run
    post = f"http://127.0.0.1:{server.port}/api/label?token={server.token}"
    status, body = _request(post, b"x" * (MAX_BODY + 1))
    assert status == 413 and "at most" in body["error"]
    for bad in ({"region_id": 1.9, "label": "3"}, {"region_id": True, "label": "3"}, {"region_id": "1", "label": "3"},
                {"region_id": 1, "label": 3}, [1, 2], {"region_id": 10**23, "label": "3"},
                {"region_id": -1, "label": "3"}):
        status, body = _request(post, json.dumps(bad).encode())
        assert status == 400, (bad, body)
    status, body = _request(post, b"[" * 5000 + b"]" * 5000)  # deeper than the JSON parser goes
    assert status == 400 and "nested too deeply" in body["error"]
    # A negative length read the body to the end of the stream, past the cap.
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", f"/api/label?token={server.token}")
    connection.putheader("Content-Length", "-1")
    connection.endheaders()
    connection.send(b"x" * (MAX_BODY * 4))
    answer = connection.getresponse()
    assert answer.status == 400 and "negative" in json.loads(answer.read())["error"]
    connection.close()
    assert not server.review.store.is_complete("labels")


def test_a_click_while_another_driver_writes_the_run_is_refused_not_lost_silently(served_run):
    from genstress_ray.lease import RunLease

    server = served_run
    post = f"http://127.0.0.1:{server.port}/api/label?token={server.token}"
    with RunLease.for_store(server.review.store):
        status, body = _request(post, json.dumps({"region_id": 0, "label": "3"}).encode())
    assert status == 409 and "is being written by" in body["error"]
    status, _ = _request(post, json.dumps({"region_id": 0, "label": "3"}).encode())
    assert status == 200 and _labels(server)[0]["label"] == "3"


# A script that, run by the page, labels region 1 "not a failure" as the reviewer would.
PAYLOAD = ("<img src=x onerror=\"fetch('/api/label?token='+TOKEN,{method:'POST',headers:{'Content-Type':"
           "'application/json'},body:JSON.stringify({region_id:1,label:'not a failure'})})\">")


@needs_browser
def test_values_from_the_run_folder_are_shown_as_text_never_run(served_run, page):
    """Stored XSS: whoever can write to the bucket rewrote tables of the run with markup that posts
    labels. Shown as text, under a Content-Security-Policy that runs only the page's own script."""
    import pyarrow as pa

    from genstress_ray.labeling import labels_table
    from genstress_ray.storage import REGIONS_SCHEMA

    server, store = served_run, served_run.review.store
    store.begin_stage("labels")
    store.write_table("labels", labels_table([{"region_id": 0, "label": PAYLOAD, "is_failure": True,
                                               "source": "human", "annotator": "x"}]))
    store.complete_stage("labels", {})
    response = page.goto(server.url)
    csp = response.headers["content-security-policy"]
    nonce = csp.split("'nonce-", 1)[1].split("'", 1)[0]
    assert "script-src 'nonce-" in csp and "default-src 'none'" in csp
    body = response.text()  # (browsers hide a nonce from the DOM)
    assert body.count(f"<script nonce='{nonce}'>") == 1 and body.count("<script") == 1 and "onclick" not in body
    assert PAYLOAD in page.locator("#status-0").inner_text()  # the markup, as text
    page.wait_for_timeout(1000)
    assert set(_labels(server)) == {0}  # nothing posted a label for region 1
    # A number column rewritten as text: the page refuses the run, naming the file, and labels nothing.
    regions = store.read_table("regions")
    members = pa.array([PAYLOAD] * regions.num_rows)
    tampered = regions.set_column(regions.schema.get_field_index("n_members"), "n_members", members)
    assert not tampered.schema.equals(REGIONS_SCHEMA)
    store.write_table("regions", tampered)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(server.url)
    text = refused.value.read().decode()
    assert refused.value.code == 500 and "column 'n_members' is string, not int64" in text and ".parquet" in text
    assert "onerror" not in text  # the message never quotes what the file holds
    assert refused.value.headers["Content-Type"].startswith("text/plain")
    assert set(_labels(server)) == {0}


def test_two_review_pages_on_one_run_never_overwrite_each_others_answers(served_run):
    """Two `genstress label` servers on one run: a decision answered 200 was later overwritten by the
    other page's write, made from labels it had read before."""
    import threading

    from genstress_ray.labeling.review import ReviewStore

    store = served_run.review.store
    pages = [ReviewStore(store, annotator="a"), ReviewStore(store, annotator="b")]
    errors = []

    def click(page, region):
        try:
            for label in ["1", "2", "3", "4", "5", "6", "7", "8"]:
                page.save(region, label)
        except Exception as exc:  # pragma: no cover - what must not happen
            errors.append(exc)

    threads = [threading.Thread(target=click, args=(page, region)) for page, region in zip(pages, (0, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    labels = _labels(served_run)
    assert labels[0]["label"] == "8" and labels[0]["annotator"] == "a"
    assert labels[1]["label"] == "8" and labels[1]["annotator"] == "b"
