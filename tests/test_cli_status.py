"""`attune status`: the admin status payload rendered for an operator (through httpx.MockTransport), and the command
against a small fake HTTP server: the key from the data dir's operator_key file, a refused key and an unreachable
service each end with a clear message and a non-zero exit."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from attune import cli

OPERATOR_KEY = "att-" + "o" * 40
PAYLOAD = {
    "object": "attune.status",
    "engine": {
        "deployments": {"attune": {
            "AttuneIngress": {"status": "HEALTHY", "replicas": {"RUNNING": 1}},
            "LLMServer": {"status": "UPSCALING", "replicas": {"RUNNING": 2, "STARTING": 1}},
            "RewardScorer": {"status": "HEALTHY", "replicas": {"RUNNING": 1}},
        }},
        "llm": {"replica": "r1", "loaded_adapters": ["modpo-safety", "dpo-empathy"]},
        "llm_replicas": {"r1": {"loaded_adapters": ["modpo-safety", "dpo-empathy"], "live": True},
                         "r2": {"loaded_adapters": [], "live": False}},
    },
    "adapters": ["dpo-empathy", "modpo-safety", "sft"],
    "gate": {"safety_threshold": 2.875, "threshold_source": "calibrated", "calibration": {"split": "val"},
             "crisis_threshold": 0.5, "max_regenerations": 2, "decisions": {"pass": 7, "crisis": 2}},
    "crisis_sessions": 2,
    "merges_built": 0,
}


def test_status_is_fetched_with_the_operator_key_and_formatted():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers["authorization"]))
        return httpx.Response(200, json=PAYLOAD)

    payload = cli.fetch_status("http://attune.test/", OPERATOR_KEY, transport=httpx.MockTransport(handler))
    assert seen == [("/v1/admin/status", f"Bearer {OPERATOR_KEY}")]
    lines = cli.format_status(payload).splitlines()
    assert lines[0] == "application attune:"
    llm = next(line for line in lines if line.strip().startswith("LLMServer"))
    assert "UPSCALING" in llm and "2 running" in llm and "1 starting" in llm
    assert "  r1 (now): modpo-safety, dpo-empathy" in lines
    assert "  r2 (after its last request): none" in lines
    assert "gate decisions: pass=7  regenerated=0  fallback=0  truncated=0  crisis=2" in lines
    assert "gate: safety threshold 2.875 (calibrated), crisis threshold 0.500, max regenerations 2" in lines
    assert lines[-1] == "store: 3 adapters; crisis sessions: 2; merges built: 0"


def test_an_engine_error_is_shown_not_hidden():
    text = cli.format_status({**PAYLOAD, "engine": {"error": "TimeoutError: "}})
    assert "engine status unavailable: TimeoutError" in text and "gate decisions: pass=7" in text


@pytest.mark.parametrize("status, body, message", [
    (401, {"error": {"message": "invalid API key; check the key"}}, "refused the key (HTTP 401: invalid API key"),
    (403, {"error": {"message": "operator key required"}}, "refused the key (HTTP 403"),
    (503, {"error": {"message": "scorer not ready"}}, "HTTP 503: scorer not ready"),
])
def test_refusals_raise_with_the_servers_reason(status, body, message):
    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=body))
    with pytest.raises(cli.StatusError, match=message.replace("(", r"\(")):
        cli.fetch_status("http://attune.test", "att-wrong-key-wrong-key-wrong", transport=transport)


@pytest.fixture
def fake_service():
    """A local HTTP server that answers /v1/admin/status like the ingress: 200 for OPERATOR_KEY, 401 otherwise."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/v1/admin/status" and self.headers.get("Authorization") == f"Bearer {OPERATOR_KEY}"
            body = json.dumps(PAYLOAD if ok else {"error": {"message": "invalid API key"}}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """No key in the environment; the data dir holds the operator_key file that `attune serve` writes."""
    for var in ("ATTUNE_OPERATOR_KEY", "ATTUNE_API_KEY", "ATTUNE_URL", "ATTUNE_SERVE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ATTUNE_DATA_DIR", str(tmp_path))
    (tmp_path / "operator_key").write_text(OPERATOR_KEY + "\n")
    return tmp_path


def test_command_reads_the_key_file_and_prints_the_status(fake_service, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("ATTUNE_URL", fake_service)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Attune at {fake_service}\n") and "r1 (now): modpo-safety, dpo-empathy" in out


def test_command_with_a_wrong_key_fails_clearly(fake_service, data_dir, capsys):
    code = cli.main(["status", "--url", fake_service, "--operator-key", "att-not-the-operator-key-at-all"])
    err = capsys.readouterr().err
    assert code == 1 and "refused the key (HTTP 401: invalid API key)" in err and "--operator-key" in err


def test_command_against_nothing_listening_fails_clearly(data_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = cli.main(["status", "--url", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach" in err and "attune serve" in err


def test_command_without_any_key_is_a_usage_error(data_dir, capsys):
    (data_dir / "operator_key").unlink()
    assert cli.main(["status"]) == 2
    assert "no operator key" in capsys.readouterr().err
