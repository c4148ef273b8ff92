"""The LLM backend of `sigvlp findings` against a real HTTP server on 127.0.0.1 answering in the
chat-completions format: good answers, malformed JSON, unknown organs, dropped sentences,
timeouts, 429s; the cache; the command end to end."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sigvlp.data.findings import segment, sentence_organs, split_report
from sigvlp.data.findings_llm import LLMConfig, LLMSplitter, llm_entries, parse_answer, read_cache

REPORTS = {
    "train_1_a_1.nii.gz": ("Cardiomegaly is observed. No pleural effusion was detected. Comparison was not possible.",
                           "Cardiomegaly."),
    "train_2_a_1.nii.gz": ("Hepatosteatosis is observed. Trachea is open.", ""),
}


class Server:
    """A chat-completions server whose behaviour per request comes from `script` (a list of
    modes, used in order, the last repeated): good, badjson, unknown, drop, 429, slow, 500."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                    mode = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                outer.answer(self, mode, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, handler, mode, body):
        if mode in ("429", "500"):
            handler.send_response(int(mode))
            handler.send_header("Retry-After", "0")
            handler.end_headers()
            return
        if mode == "slow":
            time.sleep(1.0)
        sentences = re.findall(r"^(\d+)\. (.*)$", body["messages"][1]["content"], re.MULTILINE)
        items = [{"i": int(i), "organs": sentence_organs(s)} for i, s in sentences]
        if mode == "unknown":
            items[0]["organs"] = ["pleura"]
        if mode == "drop":
            items = items[1:]
        content = "{not json" if mode == "badjson" else "```json\n" + json.dumps({"sentences": items}) + "\n```"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out first
            pass

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server(request):
    srv = Server(request.param)
    yield srv
    srv.close()


def _config(url, **kw):
    return LLMConfig(url=url, model="m", concurrency=2, timeout=0.5, max_retries=2, backoff=0.01, **kw)


def test_parse_answer_validates_against_our_organs():
    assert parse_answer('{"sentences": [{"i": 1, "organs": ["heart", "lung"]}, {"i": 0, "organs": []}]}', 2) == [
        [], ["lung", "heart"]]
    for bad, message in (("nope", "not JSON"), ('{"x": 1}', "no \"sentences\""),
                         ('{"sentences": [{"i": 0, "organs": ["pleura"]}]}', "unknown organ"),
                         ('{"sentences": [{"i": 0, "organs": []}]}', r"\[1\] are missing"),
                         ('{"sentences": [{"i": 0, "organs": []}, {"i": 0, "organs": []}]}', "given once")):
        with pytest.raises(ValueError, match=message):
            parse_answer(bad, 2)


@pytest.mark.parametrize("server", [["good"]], indirect=True)
def test_good_answers_are_filed_and_cached(server, tmp_path):
    cache = tmp_path / ".llm-cache" / "train.jsonl"
    entries, stats = llm_entries(REPORTS, _config(server.url, api_key="secret"), cache)
    for name, (findings, impression) in REPORTS.items():
        assert entries[name] == split_report(findings, impression)  # the fake model answers like the rules
    assert stats.answered == 2 and not stats.fallback and stats.cached == 0
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["model"] == "m" and req["auth"] == "Bearer secret"
    assert "lung, heart, aorta" in req["messages"][0]["content"]
    assert set(read_cache(cache, "m")) == set(REPORTS) and read_cache(cache, "other") == {}
    # a rerun asks only for what is missing or changed
    changed = dict(REPORTS, **{"train_3_a_1.nii.gz": ("Splenomegaly.", "")})
    entries, stats = llm_entries(changed, _config(server.url), cache)
    assert stats.cached == 2 and stats.answered == 1 and len(server.requests) == 3
    assert entries["train_3_a_1.nii.gz"]["organs"] == {"spleen": ["Splenomegaly."]}
    edited = {"train_1_a_1.nii.gz": ("Cardiomegaly is observed.", "")}
    _, stats = llm_entries(edited, _config(server.url), cache)
    assert stats.cached == 0 and stats.answered == 1


@pytest.mark.parametrize("server", [["badjson", "good"], ["unknown", "good"], ["drop", "good"]], indirect=True)
def test_a_bad_answer_is_asked_again_once(server, tmp_path):
    one = {"train_1_a_1.nii.gz": REPORTS["train_1_a_1.nii.gz"]}
    entries, stats = llm_entries(one, _config(server.url), tmp_path / "c.jsonl")
    assert stats.answered == 1 and stats.retried == 1 and not stats.fallback and len(server.requests) == 2
    assert "invalid" in server.requests[1]["messages"][-1]["content"]
    assert entries["train_1_a_1.nii.gz"] == split_report(*one["train_1_a_1.nii.gz"])


@pytest.mark.parametrize("server", [["badjson"], ["unknown"], ["drop"]], indirect=True)
def test_two_bad_answers_fall_back_to_the_rules_and_are_not_cached(server, tmp_path):
    cache = tmp_path / "c.jsonl"
    entries, stats = llm_entries(REPORTS, _config(server.url), cache)
    assert stats.answered == 0 and len(stats.fallback) == 2 and len(server.requests) == 4
    assert all(entries[n] == split_report(*REPORTS[n]) for n in REPORTS)
    assert read_cache(cache, "m") == {} and "split by the rules" in stats.summary()


@pytest.mark.parametrize("server", [["429", "500", "good"]], indirect=True)
def test_429_and_5xx_are_retried_with_backoff(server, tmp_path):
    t0 = time.monotonic()
    organs, requests = LLMSplitter(_config(server.url)).classify(segment(REPORTS["train_2_a_1.nii.gz"][0]))
    assert organs == [["liver"], ["trachea"]] and requests == 1 and len(server.requests) == 3
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("server", [["429"], ["slow"]], indirect=True)
def test_retries_are_bounded_then_the_report_falls_back(server, tmp_path):
    t0 = time.monotonic()
    one = {"train_2_a_1.nii.gz": REPORTS["train_2_a_1.nii.gz"]}
    entries, stats = llm_entries(one, _config(server.url), tmp_path / "c.jsonl")
    assert len(server.requests) == 3  # 1 + max_retries
    assert len(stats.fallback) == 1 and "after 3 tries" in stats.fallback[0][1]
    assert entries["train_2_a_1.nii.gz"] == split_report(*one["train_2_a_1.nii.gz"])
    assert time.monotonic() - t0 < 10


def test_rate_limit_spaces_requests(tmp_path):
    srv = Server(["good"])
    try:
        reports = {f"train_{i}_a_1.nii.gz": ("Cardiomegaly.", "") for i in range(1, 5)}
        t0 = time.monotonic()
        _, stats = llm_entries(reports, _config(srv.url, rate=10.0), tmp_path / "c.jsonl")
        assert stats.answered == 4 and time.monotonic() - t0 >= 0.3  # 4 requests at 10/s: >= 3 gaps
    finally:
        srv.close()


def test_config_checks_its_values():
    for kw, message in (({"url": "localhost:8000"}, "http"), ({"model": ""}, "model"),
                        ({"concurrency": 0}, "concurrency"), ({"rate": -1.0}, "rate"), ({"timeout": 0}, "timeout")):
        with pytest.raises(ValueError, match=message):
            LLMConfig(**{"url": "http://x/v1", "model": "m", **kw})
    assert LLMConfig("http://x", "m").endpoint == "http://x/v1/chat/completions"
    assert LLMConfig("http://x/v1/", "m").endpoint == "http://x/v1/chat/completions"
    assert LLMConfig("https://x/api/chat/completions", "m").endpoint == "https://x/api/chat/completions"


def test_cli_with_an_llm_endpoint(tmp_path_factory, tmp_path, capsys, monkeypatch):
    import shutil

    from _data_helpers import tiny_dataset
    from sigvlp.cli import main as cli_main
    from sigvlp.data.chunks import load_findings_bank

    data = shutil.copytree(tiny_dataset(tmp_path_factory), tmp_path / "data")
    srv = Server(["good"])
    monkeypatch.setenv("SIGVLP_TEST_KEY", "k1")
    try:
        argv = ["findings", str(data), "--split", "valid", "--llm-url", srv.url, "--llm-model", "m",
                "--llm-key-env", "SIGVLP_TEST_KEY", "--llm-concurrency", "2", "--llm-timeout", "5", "--overwrite"]
        assert cli_main(argv) == 0
        assert srv.requests and all(r["auth"] == "Bearer k1" for r in srv.requests)
        bank = load_findings_bank(data / "findings" / "valid_findings.jsonl")
        cache = data / "findings" / ".llm-cache" / "valid.jsonl"
        assert set(read_cache(cache, "m")) == set(bank)
        asked = len(srv.requests)
        assert cli_main(argv) == 0 and len(srv.requests) == asked  # all from the cache
        assert f"{len(bank)} from the cache" in capsys.readouterr().out
    finally:
        srv.close()


def _findings_cli(tmp_path_factory, tmp_path, url, *extra):
    """`sigvlp findings` on a copy of the tiny dataset's valid split with --llm-url url: (exit
    status, the bank path)."""
    import shutil

    from _data_helpers import tiny_dataset
    from sigvlp.cli import main as cli_main

    data = shutil.copytree(tiny_dataset(tmp_path_factory), tmp_path / "data")
    bank = data / "findings" / "valid_findings.jsonl"
    if bank.exists():
        bank.unlink()
    rc = cli_main(["findings", str(data), "--split", "valid", "--llm-url", url, "--llm-model", "m",
                   "--llm-timeout", "5", *extra])
    return rc, bank


def _closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_unreachable_endpoint_is_a_one_line_error_before_any_work(tmp_path_factory, tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    t0 = time.monotonic()
    rc, bank = _findings_cli(tmp_path_factory, tmp_path, url)  # 4 retries with backoff per report if not probed
    out, err = capsys.readouterr()
    assert rc == 2 and time.monotonic() - t0 < 5
    assert err.count("\n") == 1 and err.startswith("sigvlp findings: error: argument --llm-url: cannot reach ")
    assert url in err and "Connection refused" in err, err
    assert out == "" and not bank.exists() and not (bank.parent / ".llm-cache").exists()


def test_cli_endpoint_refusing_the_key_is_a_one_line_error(tmp_path_factory, tmp_path, capsys):
    class Refuse(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        do_POST = do_GET

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        rc, bank = _findings_cli(tmp_path_factory, tmp_path, f"http://127.0.0.1:{httpd.server_address[1]}/v1")
    finally:
        httpd.shutdown()
        httpd.server_close()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "refused the request: HTTP 401" in err and not bank.exists()


@pytest.mark.parametrize("server", [["500"]], indirect=True)
def test_cli_every_request_failing_is_not_a_success(server, tmp_path_factory, tmp_path, capsys):
    rc, bank = _findings_cli(tmp_path_factory, tmp_path, server.url, "--llm-retries", "0")
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert rc == 1 and server.requests and not bank.exists() and "wrote" not in out
    assert last.startswith("sigvlp findings: error: argument --llm-url: all ") and "HTTP 500" in last
    assert "no bank written" in last
