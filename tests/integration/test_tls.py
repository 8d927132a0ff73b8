"""`attune serve --ssl-certfile --ssl-keyfile` serves the API over HTTPS through Ray Serve's own proxy (HTTPOptions
ssl_certfile/ssl_keyfile): with a self-signed certificate made here, the official openai client that trusts it gets
a reply, a client that does not trust it is refused by its own verification, plain HTTP gets no answer, and the
patient UI (--ui) gets the https URL and a CA bundle that lets its client reach the API."""
from __future__ import annotations

import datetime
import ipaddress
import signal
import ssl
from pathlib import Path

import httpx
import pytest

from tests.integration.serve_process import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, valid for a day, and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attune-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def test_serve_over_https(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from openai import OpenAI

    cert, key = self_signed(tmp_path)
    served = ServeProcess(tmp_path, ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ui"]).start()
    try:
        served.wait_for("Patient UI at http://")
        base = f"https://127.0.0.1:{served.port}"
        assert f"Attune is ready at {base}/v1" in served.output()
        api_key = (served.data_dir / "api_key").read_text().strip()
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=300) as http:
            assert http.get(f"{base}/healthz").status_code == 200
            client = OpenAI(base_url=f"{base}/v1", api_key=api_key, http_client=http, max_retries=0)
            reply = client.chat.completions.create(
                model="attune", max_tokens=8, messages=[{"role": "user", "content": "Hello, how are you today?"}])
            assert reply.choices[0].message.content and reply.model_extra["attune"]["session_id"]
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{base}/healthz", timeout=30)  # the public CAs do not vouch for it: real TLS, checked
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{served.port}/healthz", timeout=30)  # no plain HTTP beside it
        assert httpx.get(f"http://127.0.0.1:{served.ui_port}/", timeout=60).status_code == 200
        (ui_pid,) = [pid for pid, cmd in served.marker.pids().items() if "attune.cli ui" in cmd]
        ui_env = dict(v.split("=", 1) for v in Path(f"/proc/{ui_pid}/environ").read_text().split("\0") if "=" in v)
        assert "RAY_AUTH_TOKEN" not in ui_env, "Ray's token stays with Ray"
        assert cert.read_text() in Path(ui_env["SSL_CERT_FILE"]).read_text()
        monkeypatch.setenv("SSL_CERT_FILE", ui_env["SSL_CERT_FILE"])
        from ui.client import AttuneClient

        page_client = AttuneClient(base, api_key)  # the page's own client, with the page's environment
        try:
            assert page_client.http.get("/healthz").status_code == 200
        finally:
            page_client.close()
        status, seconds, left = served.stop(signal.SIGTERM, group=False)
        print(f"\nHTTPS service: SIGTERM -> exit status {status}, every process gone after {seconds:.1f} s")
        assert status == 0 and not left, (left, served.output()[-3000:])
    finally:
        served.kill()
