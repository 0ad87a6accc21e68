"""http.request against hostile destinations: with the production default (no allowed networks)
every spelling of loopback, a redirect into loopback and a name resolving to loopback are refused
and the local listener receives nothing; with loopback allowed the same listener is reached (the
control that shows each refusal is the guard's doing)."""

from __future__ import annotations

import dataclasses
import datetime
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.services import Services
from tests import factories
from workers import executor
from workers.middleware import LeaseHeartbeat, StepTimeLimit

MiB = 1024 * 1024
Reply = tuple[int, dict[str, str], bytes]


class Listener:
    """A local HTTP server that counts what reaches it; ``answer(path)`` scripts the reply."""

    def __init__(self, host: str = "127.0.0.1", answer: Callable[[str], Reply] | None = None) -> None:
        self.paths: list[tuple[str, str]] = []
        self.answer = answer or (lambda path: (200, {"content-type": "application/json"}, b'{"ok": true}'))
        listener = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                listener.paths.append((self.command, self.path))
                status, headers, body = listener.answer(self.path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "content-length" not in {k.lower() for k in headers}:
                    self.send_header("connection", "close")  # the body ends when the connection does
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

            def log_message(self, *args: Any) -> None:
                pass

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        self.server = server_class((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listeners() -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(host: str = "127.0.0.1", answer: Callable[[str], Reply] | None = None) -> Listener:
        started.append(Listener(host, answer))
        return started[-1]

    yield start
    for listener in started:
        listener.close()


@pytest.fixture
def run_step(services: Services, make_workflow, client, headers) -> Callable[..., dict[str, Any]]:
    """Run a one-step http.request workflow in this thread, in a worker whose config allows
    ``allow`` (the production default: nothing); the step's record as the API shows it."""
    time_limit = StepTimeLimit()

    def run(step_input: dict[str, Any], allow: tuple[str, ...] = (), **config: Any) -> dict[str, Any]:
        wid = make_workflow(
            [{"id": "call", "action": "http.request", "input": step_input, "timeoutMs": 10_000}]
        )
        worker_services = dataclasses.replace(
            services, config=services.config.with_overrides(http_allow_networks=allow, **config)
        )
        assert worker_services.config.http_allow_networks == allow
        with services.db.session() as session:
            row = factories.run(session, wid, "pending")
            session.commit()
            run_id = row.id
        executor.execute_step(worker_services, LeaseHeartbeat(worker_services), time_limit, run_id, "call", 1)
        data = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]
        assert data["status"] in ("completed", "failed"), data
        return data["stepResults"][0]

    return run


LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "localhost",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "[::ffff:127.0.0.1]",
]
LOOPBACK = ("127.0.0.0/8", "::1/128")


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_spellings_are_refused_and_the_listener_receives_nothing(run_step, listeners, host):
    victim = listeners()
    url = f"http://{host}:{victim.port}/admin"
    step = run_step({"method": "POST", "url": url, "json": {"x": 1}})
    assert step["status"] == "error" and step["attempt"] == 1, step
    assert step["error"]["code"] == "HTTP_DESTINATION_REFUSED", step
    assert repr(host.strip("[]")) in step["error"]["message"]
    assert victim.paths == []
    # The control: with loopback allowed, the very same URL reaches the listener.
    allowed = run_step({"method": "POST", "url": url, "json": {"x": 1}}, allow=LOOPBACK)
    assert allowed["status"] == "success", allowed
    assert victim.paths == [("POST", "/admin")]


def test_ipv6_loopback_is_refused_and_the_listener_receives_nothing(run_step, listeners):
    victim = listeners("::1")
    step = run_step({"url": f"{victim.url}/admin"})
    assert step["error"]["code"] == "HTTP_DESTINATION_REFUSED", step
    assert victim.paths == []
    assert run_step({"url": f"{victim.url}/admin"}, allow=LOOPBACK)["status"] == "success"
    assert victim.paths == [("GET", "/admin")]


@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_into_loopback_is_refused_at_the_hop(run_step, listeners, status):
    victim = listeners("127.0.0.1")
    bouncer = listeners(
        "127.0.0.2", lambda path: (status, {"location": f"{victim.url}/secret", "content-length": "0"}, b"")
    )
    step = run_step({"method": "POST", "url": f"{bouncer.url}/go", "json": {}}, allow=("127.0.0.2/32",))
    assert step["error"]["code"] == "HTTP_DESTINATION_REFUSED", step
    assert "'127.0.0.1'" in step["error"]["message"]
    assert bouncer.paths == [("POST", "/go")] and victim.paths == []
    # The control: with the victim's address allowed the redirect is followed (307 keeps the method).
    followed = run_step({"method": "POST", "url": f"{bouncer.url}/go", "json": {}}, allow=LOOPBACK)
    assert followed["status"] == "success", followed
    assert victim.paths == [("GET" if status == 302 else "POST", "/secret")]


def test_relative_redirects_are_followed_and_capped_at_five(run_step, listeners):
    hops = listeners(
        "127.0.0.2",
        lambda path: (
            (302, {"location": f"/hop{int(path[4:] or 0) + 1}", "content-length": "0"}, b"")
            if path.startswith("/hop") and int(path[4:] or 0) < 9
            else (200, {"content-type": "application/json", "content-length": "2"}, b"{}")
        ),
    )
    step = run_step({"url": f"{hops.url}/hop4"}, allow=("127.0.0.2/32",))
    assert step["status"] == "success", step
    assert [p for _, p in hops.paths] == ["/hop4", "/hop5", "/hop6", "/hop7", "/hop8", "/hop9"]
    hops.paths.clear()
    step = run_step({"url": f"{hops.url}/hop0"}, allow=("127.0.0.2/32",))
    assert step["error"]["code"] == "TOO_MANY_REDIRECTS", step
    assert len(hops.paths) == 6, "the first request and five redirects, no more"


def test_the_refusal_says_the_same_whether_or_not_anything_listens(run_step, listeners):
    victim = listeners()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: nothing answers on this port
    try:
        answering = run_step({"url": f"http://127.0.0.1:{victim.port}/"})["error"]
        silent = run_step({"url": f"http://127.0.0.1:{closed.getsockname()[1]}/"})["error"]
    finally:
        closed.close()
    assert answering == silent and answering["code"] == "HTTP_DESTINATION_REFUSED"
    assert victim.paths == []


def test_metadata_is_refused_even_when_everything_is_allowed(run_step):
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://[fe80::1]/"):
        step = run_step({"url": url, "timeoutMs": 1000}, allow=("0.0.0.0/0", "::/0"))
        assert step["error"]["code"] == "HTTP_DESTINATION_REFUSED", (url, step)


def test_a_non_standard_method_is_refused_before_any_connection(run_step, listeners):
    redis_like = listeners()
    step = run_step({"method": "SET", "url": f"{redis_like.url}/key"}, allow=LOOPBACK)
    assert step["status"] == "error" and step["attempt"] == 1
    assert step["error"]["code"] == "INVALID_INPUT" and "SET" in step["error"]["message"]
    assert redis_like.paths == []


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_a_response_past_the_cap_is_response_too_large(run_step, listeners, declared):
    body = b"x" * (2 * MiB)
    big = listeners(answer=lambda path: (200, {"content-length": str(len(body))} if declared else {}, body))
    step = run_step({"url": f"{big.url}/big"}, allow=LOOPBACK)
    assert step["status"] == "error" and step["error"]["code"] == "RESPONSE_TOO_LARGE", step
    assert step["output"] is None
    # The limit is configuration: a small cap refuses a small body, a large one admits it.
    assert (
        run_step({"url": f"{big.url}/big"}, allow=LOOPBACK, http_max_response_bytes=3 * MiB)["status"]
        == "success"
    )


def test_an_allowed_loopback_target_still_works(worker, target, make_workflow, trigger, wait_run):
    target.reply(201, {"id": 42}, {"X-Trace": "abc"})
    wid = make_workflow(
        [
            {
                "id": "call",
                "action": "http.request",
                "input": {"method": "PUT", "url": f"{target.url}/item?q=1", "json": {"a": 1}},
            }
        ]
    )
    done = wait_run(trigger(wid)["id"])
    assert done["status"] == "completed", done
    output = done["stepResults"][0]["output"]
    assert output["status"] == 201 and output["body"] == {"id": 42}
    assert output["headers"]["X-Trace"] == "abc"
    (request,) = target.requests
    assert request["method"] == "PUT" and request["path"] == "/item?q=1" and request["json"] == {"a": 1}
    assert request["headers"]["Host"] == target.url.split("//", 1)[1], "the Host header names the URL's host"


def _self_signed(tmp_path: Any, name: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


def test_https_to_a_pinned_address_keeps_the_hostname_for_sni_and_the_certificate_check(
    run_step, listeners, tmp_path
):
    tls = listeners("127.0.0.1")
    server_names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*_self_signed(tmp_path, "localhost"))
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    tls.server.socket = context.wrap_socket(tls.server.socket, server_side=True)
    step = run_step({"url": f"https://localhost:{tls.port}/"}, allow=LOOPBACK)
    # Connected to the checked 127.0.0.1, introduced as "localhost"; a self-signed certificate is
    # still refused (verification stays on), so no request is sent.
    assert server_names == ["localhost"]
    assert (
        step["error"]["code"] == "NETWORK_ERROR" and "CERTIFICATE_VERIFY_FAILED" in step["error"]["message"]
    )
    assert tls.paths == []
