"""Counterfactual writers: the offline lexicons, and a language model behind a real chat-completions
HTTP server on loopback that answers from a script (malformed and schema-violating answers included)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from genstress_ray.counterfactuals import WRITERS, ChatEndpoint, ChatWriter, EndpointError, LexiconWriter, substitute


class ScriptedChat(ThreadingHTTPServer):
    """Speaks ``POST /v1/chat/completions``: each request gets the next scripted reply (or, with a
    function, its reply to the request body), and is recorded."""

    def __init__(self, replies):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies = replies if callable(replies) else list(replies)
        self.requests, self.headers_seen = [], []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        server: ScriptedChat = self.server
        assert self.path == "/v1/chat/completions"
        server.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        server.headers_seen.append(dict(self.headers))
        reply = server.replies(server.requests[-1]) if callable(server.replies) else server.replies.pop(0)
        status, body = (reply if isinstance(reply, tuple) else
                        (200, json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def chat():
    servers = []

    def start(replies):
        servers.append(ScriptedChat(replies))
        return servers[-1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


CAPTION = "a red stop sign on a sunny street"


def test_lexicon_writer_swaps_attributes_and_never_the_class():
    writer = LexiconWriter()
    a = writer.write("a red fire truck on a sunny street", "fire truck", synonyms=["engine"], seed=3)
    assert a.valid and a.calls == 0 and a.words == ["red", "sunny", "street"]
    assert len(a.captions) == 2 and all("fire truck" in c for c in a.captions)
    for text, edits in zip(a.captions, a.edits):
        assert 1 <= len(edits) <= 3 and text == substitute(a.caption, edits) and text != a.caption
        assert all(alt in writer.lexicons[writer.category[word]] for word, alt in edits)
    assert writer.write("a red fire truck on a sunny street", "fire truck", seed=3).captions == a.captions
    # A class name that is a lexicon word stays: a "red" class keeps its red.
    assert "red" not in LexiconWriter().write("a red square", "red").words
    # No lexicon word: an attribute phrase is added instead.
    plain = writer.write("a digit three", "3", seed=0)
    assert plain.valid
    assert all(c.startswith("a digit three ") and e[0][0] == "" for c, e in zip(plain.captions, plain.edits))


def test_chat_writer_retries_bad_answers_with_the_error_and_filters_the_class(chat):
    server = chat([
        "The words are red and sunny.",                                     # no JSON: asked again
        '```json\n{"words": ["stop", "red", "sunny", "moon"]}\n```',        # class word and a word not in it dropped
        '{"alternatives": ["blue", "rainy"]}',                              # schema violated: asked again
        '{"alternatives": {"red": ["blue", "stop"], "sunny": ["rainy"]}}',
        '{"captions": ["a blue stop sign on a rainy street", "a blue stop sign on a wet, rainy street"]}',
    ])
    writer = WRITERS.get("chat")(base_url=server.url, model="scripted", attempts=2)
    r = writer.write(CAPTION, "stop sign", task="traffic sign classification", seed=0)
    assert r.valid and r.calls == 5 and r.words == ["red", "sunny"]
    assert r.alternatives == {"red": ["blue"], "sunny": ["rainy"]}  # "stop" is never an alternative either
    assert r.captions[0] == "a blue stop sign on a rainy street" and len(r.edits) == 2
    assert all(word in ("red", "sunny") for word, _ in r.edits[0])
    retry = server.requests[1]["messages"]
    assert retry[-2] == {"role": "assistant", "content": "The words are red and sunny."}
    assert "invalid: the answer holds no JSON object" in retry[-1]["content"]
    assert "does not match the schema" in server.requests[3]["messages"][-1]["content"]
    assert server.requests[0]["response_format"]["json_schema"]["schema"]["required"] == ["words"]
    assert server.requests[0]["model"] == "scripted" and "stop sign" in server.requests[0]["messages"][1]["content"]


def test_a_model_that_never_answers_validly_is_recorded_invalid_not_raised(chat):
    server = chat(["no", '{"words": "red"}', '{"words": ["red"]'])
    r = ChatWriter(ChatEndpoint(server.url, "scripted"), attempts=3).write(CAPTION, "stop sign")
    assert not r.valid and r.calls == 3 and r.captions == []
    assert "step words: no valid answer in 3 attempts" in r.error and "not valid JSON" in r.error
    assert r.answer == '{"words": ["red"]'
    only_class = chat(['{"words": ["stop", "sign"]}'])
    r = ChatWriter(ChatEndpoint(only_class.url, "scripted")).write(CAPTION, "stop sign")
    assert not r.valid and "no modifiable word" in r.error and r.calls == 1


def test_an_endpoint_that_is_down_or_off_protocol_is_named(chat, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(EndpointError, match=f"chat endpoint {closed}/chat/completions cannot be reached"):
        ChatWriter(ChatEndpoint(closed, "m", timeout=5)).write(CAPTION, "stop sign")
    server = chat([(200, "hello"), (500, "overloaded")])
    with pytest.raises(EndpointError, match="did not answer in the chat-completions protocol: 'hello'"):
        ChatWriter(ChatEndpoint(server.url, "m")).write(CAPTION, "stop sign")
    with pytest.raises(EndpointError, match="answered HTTP 500: overloaded"):
        ChatWriter(ChatEndpoint(server.url, "m")).write(CAPTION, "stop sign")
    monkeypatch.delenv("GENSTRESS_TEST_KEY", raising=False)
    with pytest.raises(EndpointError, match="GENSTRESS_TEST_KEY is not set"):
        ChatWriter(ChatEndpoint(server.url, "m", api_key_env="GENSTRESS_TEST_KEY")).write(CAPTION, "stop sign")
    monkeypatch.setenv("GENSTRESS_TEST_KEY", "sk-local")
    keyed = chat(['{"words": []}'])
    ChatWriter(ChatEndpoint(keyed.url, "m", api_key_env="GENSTRESS_TEST_KEY")).write(CAPTION, "stop sign")
    assert keyed.headers_seen[0]["Authorization"] == "Bearer sk-local"


def test_an_endpoint_captioner_sends_the_image_and_joins_its_samples(chat):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from genstress_ray.counterfactuals import CAPTIONERS

    server = chat(["A red sign on a pole.", "A red sign on a pole.", "A grey digit", "a digit on black"])
    captioner = CAPTIONERS.get("chat")(base_url=server.url, model="vision")
    images = np.zeros((2, 1, 8, 8), np.uint8)
    images[1, 0, 2:6, 2:6] = 255
    assert captioner.caption(images) == ["A red sign on a pole", "A grey digit. a digit on black"]
    content = server.requests[2]["messages"][0]["content"]
    png = base64.b64decode(content[1]["image_url"]["url"].removeprefix("data:image/png;base64,"))
    assert (np.asarray(Image.open(io.BytesIO(png))) == images[1, 0]).all() and content[0]["type"] == "text"
