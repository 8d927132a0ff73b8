"""`attune serve`: the chat API (and with --ui the patient web app) on this machine until Ctrl-C or SIGTERM, over
HTTP or, given a certificate and key, HTTPS. Either signal ends it with status 0 after the page, Serve and Ray have
stopped; a second one during that clean-up skips Serve's drain of open requests. Imports nothing heavy until it
runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """Raised in the main thread by SIGINT or SIGTERM."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def _ui_ca_bundle(certfile: str, data_dir: Path) -> str:
    """The public CAs plus the service's certificate, so the page trusts the API whether the certificate is
    self-signed or issued by a CA."""
    import certifi

    bundle = data_dir / "ui-ca-bundle.pem"
    bundle.write_text(Path(certifi.where()).read_text() + "\n" + Path(certfile).read_text())
    return str(bundle)


def _start_ui(api_url: str, api_key: str, host: str, port: int, ca_bundle: str | None = None):
    """`attune ui` as a child process (the key travels in its environment, not on its command line; Ray's token does
    not travel); returns it once the page answers, or None with the reason printed."""
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"} | {"ATTUNE_API_KEY": api_key}
    if ca_bundle:
        env["SSL_CERT_FILE"] = ca_bundle
    child = subprocess.Popen([sys.executable, "-m", "attune.cli", "ui", "--api-url", api_url, "--host", host,
                              "--port", str(port)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/", timeout=5):
                return child
        except OSError:
            time.sleep(1.0)
    print(f"attune serve: the patient UI did not start on {host}:{port} (exit code {child.poll()}); the API keeps "
          "running", file=sys.stderr)
    child.kill()
    child.wait()
    return None


def _wait_ready_tls(url: str, cafile: str, timeout_s: float = 900.0) -> None:
    """GET /healthz over HTTPS, trusting `cafile` (the service's own certificate), until it answers 200."""
    import ssl
    import urllib.request

    context, deadline, last = ssl.create_default_context(cafile=cafile), time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10, context=context) as r:
                if r.status == 200:
                    return
        except OSError as e:
            last = str(e)
        time.sleep(1.0)
    raise TimeoutError(f"{url}/healthz not ready after {timeout_s:.0f} s: {last}")


def serve(config: str | None = None, host: str = "127.0.0.1", port: int = 8000, data_dir: str | None = None,
          ui: bool = False, ui_port: int = 7860, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None) -> int:
    """Start the chat API (Ray Serve: vLLM with the adapters, the reward model, SQLite) on localhost until Ctrl-C;
    with --ui also the patient web app in front of it."""
    from attune.compat import refuse_adapterhub

    try:
        refuse_adapterhub()
    except ImportError as e:
        print(f"attune serve: refused: {e}", file=sys.stderr)
        return 2
    if bool(ssl_certfile) != bool(ssl_keyfile):
        print("attune serve: give both --ssl-certfile and --ssl-keyfile (PEM), or neither", file=sys.stderr)
        return 2
    for path in filter(None, (ssl_certfile, ssl_keyfile)):
        if not Path(path).is_file():
            print(f"attune serve: {path}: no such file", file=sys.stderr)
            return 2
    from serving.config import CONFIG_ENV

    if config:
        os.environ[CONFIG_ENV] = config
    if data_dir:
        os.environ["ATTUNE_DATA_DIR"] = data_dir
    from serving import app
    from serving.auth import OPERATOR_KEY_FILE

    started = time.perf_counter()
    cfg = app.load_config(app.AppArgs())
    api_key, key_file = app.ensure_local_tenant(cfg)
    page = None
    handlers = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        url = app.start_local({"ensure_local_tenant": False}, host=host, port=port,
                              ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
        if ssl_certfile:
            _wait_ready_tls(url, ssl_certfile)
        else:
            app.wait_ready(url)
        print(f"Attune is ready at {url}/v1 (OpenAI-compatible) after {time.perf_counter() - started:.0f} s")
        print(f"  API key: {'$ATTUNE_API_KEY' if key_file is None else key_file}; operator key: "
              f"{cfg.data_dir / OPERATOR_KEY_FILE if not os.environ.get('ATTUNE_OPERATOR_KEY') else '$ATTUNE_OPERATOR_KEY'}")
        print(f"  health: {url}/healthz   metrics: {url}/metrics   Ctrl-C stops the service", flush=True)
        if ui:
            bundle = _ui_ca_bundle(ssl_certfile, cfg.data_dir) if ssl_certfile else None
            page = _start_ui(url, api_key, host, ui_port, bundle)
            if page is not None:
                print(f"Patient UI at http://{host}:{ui_port}/ after {time.perf_counter() - started:.0f} s", flush=True)
        while True:
            time.sleep(3600)
    except (Stopped, KeyboardInterrupt) as e:
        print(f"attune serve: {e or 'SIGINT'}: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        try:  # a second signal here skips the drain of open requests
            _stop_page(page)
            app.stop_local()
        except (Stopped, KeyboardInterrupt):
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
            print("attune serve: second signal: stopping Ray without waiting for open requests", file=sys.stderr)
            _stop_page(page)
            app.stop_local(graceful=False)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)


def _stop_page(page: subprocess.Popen | None) -> None:
    if page is None or page.poll() is not None:
        return
    page.terminate()
    try:
        page.wait(timeout=30)
    except subprocess.TimeoutExpired:
        page.kill()
        page.wait()
