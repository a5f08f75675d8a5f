"""The review page: ``genstress label RUN_URI`` serves each region as a grid of its samples, with a
button per class and "not a failure"; every click is saved into the run's ``labels`` table at once.
After ``genstress repair``, each relabelling proposal is a card too (relabel, or keep the dataset
label), saved into the ``relabels`` table.

Only this machine can reach it: the server listens on 127.0.0.1, answers only requests whose Host
header names the loopback (so a web page elsewhere cannot reach it through DNS rebinding), and
every request must carry the random access token printed with the URL. Labels live in the run, so
they survive a restart of the server.
"""

from __future__ import annotations

import getpass
import html
import itertools
import json
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa

from genstress_ray.data import class_name, png_uri
from genstress_ray.labeling.oracle import reviewed_samples
from genstress_ray.labeling.table import NOT_A_FAILURE, STAGE, labels_table, region_ids, update_labels, validate_labels
from genstress_ray.repair import ranked, read_proposals, read_relabels, relabels_table, update_relabels
from genstress_ray.storage import RunStore, StorageError

LOOPBACK = "127.0.0.1"
MAX_BODY = 16 * 1024  # a label is a few dozen bytes
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:72rem;color:#222}
section{border-top:1px solid #ccc;padding:.5rem 0}.grid{display:flex;flex-wrap:wrap;gap:.4rem}
.cell{text-align:center;font-size:.75rem}.cell img{width:72px;height:72px;image-rendering:pixelated;border:1px solid #999;display:block}
button{margin:.15rem;padding:.3rem .6rem}button.chosen{background:#1b5e20;color:#fff}
.status{font-weight:600;margin-left:.5rem}
"""
SCRIPT = """
// POST one decision; the server's answer, or null after showing why it was not saved.
async function save(statusId, endpoint, body) {
  const status = document.getElementById(statusId);
  status.textContent = 'saving...';
  const response = await fetch(endpoint + '?token=' + encodeURIComponent(TOKEN), {
    method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
  const answer = await response.json();
  if (response.ok) return answer;
  status.textContent = 'not saved: ' + answer.error;
  return null;
}
async function label(region, value) {
  const answer = await save('status-' + region, '/api/label', {region_id: region, label: value});
  if (!answer) return;
  document.getElementById('status-' + region).textContent = 'saved: ' + answer.label;
  document.querySelectorAll('#region-' + region + ' button').forEach(
    b => b.classList.toggle('chosen', b.dataset.label === answer.label));
}
async function relabel(card, sampleId, accept) {
  const answer = await save('status-' + card, '/api/relabel', {sample_id: sampleId, accept: accept});
  if (!answer) return;
  document.getElementById('status-' + card).textContent = answer.accepted ? 'saved: relabel' : 'saved: keep';
  document.querySelectorAll('#' + card + ' button').forEach(
    b => b.classList.toggle('chosen', (b.dataset.accept === 'true') === answer.accepted));
}
async function relabelRegion(region, accept) {
  // Every card of the region without a decision of its own changed: show the page again.
  if (await save('status-repair-' + region, '/api/relabel', {region_id: region, accept: accept})) location.reload();
}
// No inline handlers: the page's Content-Security-Policy runs only this script (its nonce).
document.addEventListener('click', event => {
  const b = event.target.closest('button');
  if (!b) return;
  if (b.dataset.region !== undefined) label(Number(b.dataset.region), b.dataset.label);
  else if (b.dataset.repair !== undefined) relabelRegion(Number(b.dataset.repair), b.dataset.accept === 'true');
  else if (b.dataset.card !== undefined) relabel(b.dataset.card, b.dataset.sample, b.dataset.accept === 'true');
});
"""


def _text(value) -> str:
    """Any value read from the run, as HTML text: tables in the run folder are as writable as the bucket."""
    return html.escape(str(value), quote=True)


def content_security_policy(nonce: str) -> str:
    """Only the page's own script and style (by nonce) run; images are inline data; requests go to the page's origin."""
    return (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ReviewStore:
    """Reads what the page shows and writes one region's label at a time (whole-table atomic writes)."""

    def __init__(self, store: RunStore, per_region: int = 16, annotator: str | None = None):
        self.store = store
        manifest = store.read_manifest()
        self.class_names: list[str] = manifest["class_names"]
        self.region_ids = region_ids(store)
        self.per_region = per_region
        self.annotator = annotator or getpass.getuser()

    def labels(self) -> pa.Table:
        return self.store.read_table(STAGE) if self.store.is_complete(STAGE) else labels_table([])

    def current(self) -> dict[int, str]:
        return {r["region_id"]: r["label"] for r in self.labels().to_pylist() if r["region_id"] is not None}

    def save(self, region_id: int, label: str) -> None:
        """Replace the region's label (whatever labelled it before) with this reviewer's."""
        row = labels_table([{"region_id": region_id, "label": label, "is_failure": label != NOT_A_FAILURE,
                             "source": "human", "annotator": self.annotator}])
        validate_labels(row, self.region_ids, self.class_names)
        update_labels(self.store, lambda rows: [*(r for r in rows if r["region_id"] != region_id), *row.to_pylist()],
                      self.class_names)

    def relabels(self) -> pa.Table:
        return read_relabels(self.store) if self.store.is_complete("relabels") else relabels_table([])

    def save_relabel(self, sample_id: str, accept: bool) -> None:
        """Record this reviewer's decision on one proposal (replacing any earlier one): an exception to
        its region's decision."""
        proposals = read_proposals(self.store)
        proposed = dict(zip(proposals["sample_id"].to_pylist(), proposals["proposed_label"].to_pylist()))
        if sample_id not in proposed:
            raise ValueError(f"{sample_id!r} is not a relabelling proposal of this run")
        row = {"sample_id": sample_id, "label": proposed[sample_id] if accept else None, "accepted": accept,
               "source": "human", "annotator": self.annotator, "by_region": False}
        update_relabels(self.store, lambda rows: [*(r for r in rows if r["sample_id"] != sample_id), row],
                        self.class_names)

    def save_region_relabel(self, region_id: int, accept: bool) -> int:
        """Decide every proposal of a region that has no decision of its own (those stay: exceptions);
        returns how many were decided."""
        mine = [p for p in read_proposals(self.store).to_pylist() if p["region_id"] == region_id]
        if not mine:
            raise ValueError(f"region {region_id} has no relabelling proposals")
        decided = {}

        def change(rows):
            own = {r["sample_id"] for r in rows if not r.get("by_region")}
            decided.update({p["sample_id"]: {"sample_id": p["sample_id"], "label": p["proposed_label"],
                                             "accepted": accept, "source": "human", "annotator": self.annotator,
                                             "by_region": True} for p in mine if p["sample_id"] not in own})
            return [*(r for r in rows if r["sample_id"] not in decided), *decided.values()]

        update_relabels(self.store, change, self.class_names)
        return len(decided)

    def _proposal_cards(self) -> str:
        """The third kind of card: per region, its relabelling decision as a whole, then one card per
        proposal of ``genstress repair`` (most likely first), each an exception to it."""
        if not self.store.is_complete("proposals"):
            return ""
        table = self.relabels()
        decided = dict(zip(table["sample_id"].to_pylist(), table["accepted"].to_pylist()))
        own = {s for s, whole in zip(table["sample_id"].to_pylist(), table["by_region"].to_pylist()) if not whole}
        sections, i = [], 0
        for region, mine in itertools.groupby(ranked(read_proposals(self.store)), key=lambda p: p["region_id"]):
            mine, cards = list(mine), []
            target, rid = _text(mine[0]["proposed_label"]), _text(region)
            for p in mine:
                card, sid = f"proposal-{i}", _text(p["sample_id"])
                i += 1
                choice = decided.get(p["sample_id"])
                buttons = "".join(
                    f"<button type='button' data-card='{card}' data-sample='{sid}' data-accept='{str(accept).lower()}'"
                    f"{' class=chosen' if choice is accept else ''}>{_text(text)}</button>"
                    for accept, text in ((True, f"relabel as {p['proposed_label']}"),
                                         (False, f"keep {p['dataset_label']}")))
                status = "not decided" if choice is None else (
                    f"saved: {'relabel' if choice else 'keep'}{'' if p['sample_id'] in own else ' (region)'}")
                cards.append(f"<div class='cell proposal' id='{card}'><img src='{png_uri(p['image'])}' alt='{sid}'>"
                             f"{sid}<br>dataset: {_text(p['dataset_label'])}<br>{buttons}<span class='status' "
                             f"id='status-{card}'>{status}</span></div>")
            whole = "".join(f"<button type='button' data-repair='{rid}' data-accept='{str(a).lower()}'>{t}</button>"
                            for a, t in ((True, f"relabel all {len(mine)} as {target}"), (False, "keep them all")))
            given = _text(", ".join(sorted({p["dataset_label"] for p in mine})))
            sections.append(f"<div class='repair-region' id='repair-{rid}'><h3>Region {rid}: {len(mine)} training "
                            f"images labelled {given} that look like {target}</h3><p>{whole}<span class='status' "
                            f"id='status-repair-{rid}'></span></p><div class='grid'>{''.join(cards)}</div></div>")
        return (f"<section id='proposals'><h2>Relabelling proposals</h2><p>Per failure region, the training images "
                f"it proposes to relabel ({i}), most likely first. Decide the region as a whole; a click on one "
                f"image is an exception to it, which a later region decision leaves as it is.</p>"
                f"{''.join(sections)}</section>")

    def page(self, token: str, nonce: str) -> str:
        """The page's HTML; its script and style carry ``nonce`` (``content_security_policy``)."""
        regions = {r["region_id"]: r for r in self.store.read_table("regions").to_pylist()}
        samples: dict[int, list[dict]] = {}
        table = self.store.read_table("region_samples", columns=["region_id", "draw", "image", "pred"])
        for s in reviewed_samples(table, self.per_region).to_pylist():
            samples.setdefault(s["region_id"], []).append(s)
        current = self.current()
        names = self.class_names
        sections = []
        for rid in self.region_ids:
            r = regions[rid]
            cells = "".join(f"<div class='cell'><img src='{png_uri(s['image'])}' alt='region {rid} sample "
                            f"{_text(s['draw'])}'>pred {_text(class_name(names, s['pred']))}</div>"
                            for s in samples.get(rid, []))
            buttons = "".join(
                f"<button type='button' data-region='{rid}' data-label='{_text(c)}'"
                f"{' class=chosen' if current.get(rid) == c else ''}>{_text(c)}</button>" for c in [*names, NOT_A_FAILURE])
            status = f"saved: {_text(current[rid])}" if rid in current else "not labelled"
            sections.append(
                f"<section id='region-{rid}'><h3>Region {rid}</h3><p>{_text(r['n_members'])} faults: true "
                f"{_text(class_name(names, r['dominant_source_label']))} predicted as "
                f"{_text(class_name(names, r['dominant_pred']))}. What are these images?</p><div class='grid'>{cells}"
                f"</div><div>{buttons}<span class='status' id='status-{rid}'>{status}</span></div></section>")
        title = html.escape(f"label regions: {self.store.campaign} / {self.store.run_id}")
        # The empty icon keeps the browser from asking for /favicon.ico, which has no token.
        return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
                f"<link rel='icon' href='data:,'><style nonce='{nonce}'>{STYLE}</style></head><body><h1>{title}</h1><p>One label per region: the class these "
                f"images show, or &quot;{NOT_A_FAILURE}&quot; when the classifier's predictions are right. "
                f"Each click is saved.</p>{''.join(sections)}{self._proposal_cards()}"
                f"<script nonce='{nonce}'>const TOKEN = {json.dumps(token)};{SCRIPT}</script></body></html>")


class ReviewServer:
    """The review page on 127.0.0.1.

    Example:
        >>> server = ReviewServer(RunStore.from_uri("genstress-runs/demo/r1"))  # doctest: +SKIP
        >>> print(server.url); server.serve_forever()  # doctest: +SKIP
    """

    def __init__(self, store: RunStore, port: int = 0, token: str | None = None, per_region: int = 16):
        self.review = ReviewStore(store, per_region)
        self.token = token or secrets.token_urlsafe(24)
        self.httpd = ThreadingHTTPServer((LOOPBACK, port), _ReviewHandler)
        self.httpd.review_server = self
        self.port = self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/?token={self.token}"

    def allowed(self, handler: BaseHTTPRequestHandler, query: dict) -> str | None:
        """Why a request is refused, or None."""
        host = (handler.headers.get("Host") or "").rsplit(":", 1)[0]
        if handler.client_address[0] != LOOPBACK or host not in (LOOPBACK, "localhost"):
            return "only this machine may use the review page"
        if not secrets.compare_digest(query.get("token", [""])[0], self.token):
            return "missing or wrong access token: use the URL genstress printed"
        return None

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    def start(self) -> threading.Thread:
        """Serve from a background thread (tests, notebooks); ``shutdown()`` stops it."""
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _label_request(body: bytes) -> tuple[int, str]:
    """The (region id, label) of a POST to /api/label; a ValueError (or KeyError) says what is wrong."""
    data = json.loads(body or b"{}")
    region, label = data["region_id"], data["label"]
    if isinstance(region, bool) or not isinstance(region, int) or not 0 <= region < 2**63:
        raise ValueError(f"region_id must be a region's number, got {str(region)[:40]!r}")
    if not isinstance(label, str):
        raise ValueError(f"label must be a string, got {label!r}")
    return region, label


def _relabel_request(body: bytes) -> tuple[str | int, bool]:
    """The (sample id, or region id for a region's decision, accepted) of a POST to /api/relabel."""
    data = json.loads(body or b"{}")
    accept = data["accept"]
    if not isinstance(accept, bool):
        raise ValueError(f"accept must be true or false, got {accept!r}")
    if "region_id" in data:
        if isinstance(data["region_id"], bool) or not isinstance(data["region_id"], int):
            raise ValueError(f"region_id must be a region's number, got {str(data['region_id'])[:40]!r}")
        return data["region_id"], accept
    sample_id = data["sample_id"]
    if not isinstance(sample_id, str):
        raise ValueError(f"sample_id must be a string, got {sample_id!r}")
    return sample_id, accept


class _ReviewHandler(BaseHTTPRequestHandler):
    """The review page's HTTP endpoints (``owner``: the ``ReviewServer`` they serve)."""

    @property
    def owner(self) -> ReviewServer:
        return self.server.review_server

    def log_message(self, fmt, *args):  # keep the terminal for the URL and errors
        pass

    def _send(self, status: int, body: str, content_type: str, nonce: str | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Security-Policy", content_security_policy(nonce or secrets.token_urlsafe(16)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload), "application/json")

    def _check(self) -> tuple[str, bool]:
        url = urlsplit(self.path)
        why = self.owner.allowed(self, parse_qs(url.query))
        if why:
            self._json(HTTPStatus.FORBIDDEN, {"error": why})
        return url.path, why is None

    def do_GET(self):
        path, ok = self._check()
        if not ok:
            return
        if path == "/":
            nonce = secrets.token_urlsafe(16)  # a new one per page: a script injected into it cannot know it
            try:
                page = self.owner.review.page(self.owner.token, nonce)
            except StorageError as exc:  # a table of the run that does not fit its schema, named
                return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot show the run: {exc}", "text/plain")
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8", nonce)
        elif path == "/api/labels":
            self._json(HTTPStatus.OK, {str(k): v for k, v in self.owner.review.current().items()})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {path}"})

    def do_POST(self):
        path, ok = self._check()
        if not ok:
            return
        if path not in ("/api/label", "/api/relabel"):
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path}"})
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "Content-Length is not a number"})
        if length < 0:  # read(-1) would read to the end of the stream, past any limit
            self.close_connection = True
            return self._json(HTTPStatus.BAD_REQUEST, {"error": f"Content-Length {length} is negative"})
        if length > MAX_BODY:  # never read a body of any size into memory
            self.close_connection = True
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              {"error": f"request body of {length} bytes; at most {MAX_BODY}"})
        try:
            body = self.rfile.read(length)
            if path == "/api/relabel":
                which, accept = _relabel_request(body)
                if isinstance(which, int):
                    answer = {"region_id": which, "accepted": accept,
                              "decided": self.owner.review.save_region_relabel(which, accept)}
                else:
                    self.owner.review.save_relabel(which, accept)
                    answer = {"sample_id": which, "accepted": accept}
            else:
                region, label = _label_request(body)
                self.owner.review.save(region, label)
                answer = {"region_id": region, "label": label}
        except RecursionError:  # JSON nested deeper than the parser goes
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "the request body is nested too deeply"})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # LabelError is a ValueError
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)[:500]})
        except StorageError as exc:  # e.g. a campaign or correction holds the run's lease
            return self._json(HTTPStatus.CONFLICT, {"error": str(exc)})
        self._json(HTTPStatus.OK, answer)
