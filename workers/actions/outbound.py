"""The outbound guard: where a step may connect, and a request that keeps to it.

Every hop (the first URL and each redirect) is resolved once, every resolved address is checked,
and the connection goes to a checked address (no second resolution, so DNS rebinding cannot swap
it) while the Host header, SNI and certificate checks keep the URL's hostname.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from app.actions import StepError
from app.config import Config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SCHEMES = frozenset({"http", "https"})
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CREDENTIAL_HEADERS = ("Authorization", "Cookie", "Proxy-Authorization")
_BODY_HEADERS = ("Content-Type", "Content-Length", "Transfer-Encoding")

# Refused whatever the allow list says: link-local (cloud metadata lives there) and the metadata
# endpoints that sit elsewhere (AWS over IPv6, Alibaba, Azure's platform endpoint).
ALWAYS_REFUSED: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",
        "fe80::/10",
        "fd00:ec2::254/128",
        "100.100.100.200/32",
        "168.63.129.16/32",
    )
)
# IPv6 prefixes that carry an IPv4 address a gateway would reach (NAT64, 6to4).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def forms(ip: IPAddress) -> list[IPAddress]:
    """The addresses a connection to ``ip`` may reach: IPv4-mapped and -compatible IPv6 are their
    IPv4 address; NAT64 and 6to4 are checked as themselves and as the IPv4 address they carry."""
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    value = int(ip)
    if value >> 32 == 0 and value > 1:  # ::a.b.c.d (deprecated IPv4-compatible); :: and ::1 are themselves
        return [ipaddress.IPv4Address(value)]
    if ip in _NAT64:
        return [ip, ipaddress.IPv4Address(value & 0xFFFFFFFF)]
    if ip.sixtofour is not None:
        return [ip, ip.sixtofour]
    return [ip]


def always_refused(ip: IPAddress) -> bool:
    """Link-local or a metadata address, in any spelling: never reachable."""
    return any(f.is_link_local or any(f in n for n in ALWAYS_REFUSED) for f in forms(ip))


def non_public(ip: IPAddress) -> bool:
    """Loopback, private, CGNAT, unique-local, unspecified, multicast, reserved or otherwise not global."""
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_link_local
        or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    )


@dataclass(frozen=True)
class Policy:
    """Which non-public networks may be reached, and how large a response body may be."""

    allow: tuple[IPNetwork, ...] = ()
    max_response_bytes: int = 1024 * 1024

    @classmethod
    def from_config(cls, config: Config | None) -> Policy:
        config = config or Config()
        return cls(_networks(config.http_allow_networks), config.http_max_response_bytes)

    def permits(self, ip: IPAddress) -> bool:
        """True when every address ``ip`` reaches is public or inside an allowed network."""
        if always_refused(ip):
            return False
        return all(not non_public(f) or self._allowed(f) for f in forms(ip))

    def _allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.allow)


@functools.lru_cache(maxsize=32)
def _networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    # Parsed once per distinct allow list, not once per request.
    return tuple(ipaddress.ip_network(n, strict=False) for n in cidrs)


class _PinnedAdapter(HTTPAdapter):
    """Connects to ``address`` (set before each send) instead of resolving the URL's host again."""

    def __init__(self) -> None:
        super().__init__(max_retries=0)
        self.address: str | None = None

    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ) -> Any:
        if self.address is None:
            raise RuntimeError("no checked address to connect to")
        host_params, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        if host_params["scheme"] == "https":
            # SNI and the certificate check are against the URL's hostname, not the pinned address.
            hostname = host_params["host"].strip("[]")
            pool_kwargs = {**pool_kwargs, "server_hostname": hostname, "assert_hostname": hostname}
        return self.poolmanager.connection_from_host(
            host=self.address, port=host_params["port"], scheme=host_params["scheme"], pool_kwargs=pool_kwargs
        )


_local = threading.local()


def _adapter() -> _PinnedAdapter:
    # One adapter per worker thread: keep-alive pools (keyed by address) without sharing across
    # threads, and no cookie jar carried from one tenant's step to another's.
    adapter = getattr(_local, "adapter", None)
    if adapter is None:
        adapter = _local.adapter = _PinnedAdapter()
    return adapter


def refused(host: str) -> StepError:
    """The same message whatever listens there (or not): the guard never connects to find out."""
    return StepError(
        "HTTP_DESTINATION_REFUSED",
        f"Outbound request to host {host!r} blocked: not an allowed destination",
        retriable=False,
    )


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the OS resolves ``host`` to (numeric spellings normalised as the OS does)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise StepError("NETWORK_ERROR", f"Could not resolve host {host!r}", retriable=True) from exc
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def fetch(
    method: str,
    url: str,
    policy: Policy,
    timeout_s: float,
    **request: Any,
) -> requests.Response:
    """Send ``method url`` within the policy, following up to 5 redirects; the body is read (capped).

    ``request``: ``headers``, ``params``, ``json``, ``data`` as for ``requests.Request``.
    Raises ``StepError`` for a refused destination, bad input or a too large body, and
    ``requests.RequestException`` for network errors to allowed addresses.
    """
    if method not in METHODS:
        raise StepError("INVALID_INPUT", f"Unsupported HTTP method {method!r}", retriable=False)
    if urlsplit(url).scheme.lower() not in SCHEMES:
        raise StepError("INVALID_INPUT", "http.request supports only http and https URLs", retriable=False)
    deadline = time.monotonic() + timeout_s
    try:
        prepared = requests.Request(method, url, **request).prepare()
    except (requests.RequestException, ValueError) as exc:
        raise StepError("INVALID_INPUT", f"Invalid request: {exc}", retriable=False) from exc
    for _ in range(MAX_REDIRECTS + 1):
        response = _send(prepared, policy, deadline)
        location = response.headers.get("location")
        if response.status_code not in _REDIRECTS or not location:
            _read_capped(response, policy.max_response_bytes)
            return response
        response.close()
        prepared = _redirected(prepared, response.status_code, urljoin(prepared.url or "", location))
    raise StepError("TOO_MANY_REDIRECTS", f"More than {MAX_REDIRECTS} redirects", retriable=False)


def _send(prepared: requests.PreparedRequest, policy: Policy, deadline: float) -> requests.Response:
    """Check every address of the request's host, then send to the first one that accepts."""
    parts = urlsplit(prepared.url or "")
    host = parts.hostname
    if parts.scheme not in SCHEMES or not host:
        raise refused(host or parts.netloc)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise StepError("INVALID_INPUT", f"Invalid port in URL for host {host!r}", retriable=False) from exc
    addresses = resolve(host, port)
    if not addresses or not all(policy.permits(ip) for ip in addresses):
        raise refused(host)
    # The URL's host, not the address: virtual hosts and TLS still see the name that was asked for.
    name = f"[{host}]" if ":" in host else host
    prepared.headers["Host"] = f"{name}:{parts.port}" if parts.port else name
    *others, last = addresses
    for ip in others:
        try:
            return _send_to(ip, prepared, deadline)
        except requests.ConnectionError as exc:
            if not _not_connected(exc):
                raise
    return _send_to(last, prepared, deadline)


def _send_to(ip: IPAddress, prepared: requests.PreparedRequest, deadline: float) -> requests.Response:
    adapter = _adapter()
    adapter.address = str(ip)
    try:
        remaining = max(0.001, deadline - time.monotonic())
        return adapter.send(prepared, stream=True, timeout=remaining, verify=True)
    finally:
        adapter.address = None


def _not_connected(exc: requests.ConnectionError) -> bool:
    # Only a failure to connect moves on to the next address: nothing was sent yet.
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))


def _redirected(prepared: requests.PreparedRequest, status: int, url: str) -> requests.PreparedRequest:
    """The next hop's request, as browsers and requests build it (303 and POST 301/302 become GET)."""
    old, new = urlsplit(prepared.url or ""), urlsplit(url)
    if new.scheme.lower() not in SCHEMES:
        raise refused(new.hostname or new.netloc)
    following = prepared.copy()
    following.prepare_url(url, None)
    to_get = (status == 303 and prepared.method != "HEAD") or (
        status in (301, 302) and prepared.method == "POST"
    )
    if to_get:
        following.method, following.body = "GET", None
        _drop(following.headers, _BODY_HEADERS)
    if (old.scheme, old.hostname, old.port) != (new.scheme, new.hostname, new.port):
        _drop(following.headers, _CREDENTIAL_HEADERS)
    return following


def _drop(headers: Any, names: Iterable[str]) -> None:
    for name in names:
        headers.pop(name, None)


def _read_capped(response: requests.Response, limit: int) -> None:
    """Read the body into the response, stopping as soon as it exceeds ``limit`` bytes."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        response.close()
        raise _too_large(limit)
    chunks, size = [], 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if size > limit:
            response.close()
            raise _too_large(limit)
        chunks.append(chunk)
    response._content = b"".join(chunks)
    response._content_consumed = True
    response.close()  # the body is read: the connection goes back to the pool


def _too_large(limit: int) -> StepError:
    return StepError(
        "RESPONSE_TOO_LARGE", f"Response body exceeds the limit of {limit} bytes", retriable=False
    )
