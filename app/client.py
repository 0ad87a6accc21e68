"""The CLI's HTTP client for Baton's API: where it is, which key to send, and its errors in one line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from sseclient import Event, SSEClient

from app.config import Config
from app.errors import BatonError

DEFAULT_URL = "http://127.0.0.1:8000"
# Connect quickly; an API under load may take a while to answer a page of runs.
TIMEOUT_S = (5.0, 60.0)


class ClientError(Exception):
    """The API could not be asked (unreachable, no key, not Baton): a one-line message."""


class ApiError(BatonError):
    """The API answered with its error envelope; ``code`` and ``status`` are the answer's own."""

    def __init__(self, code: str, message: str, status: int, envelope: dict[str, Any]) -> None:
        super().__init__(message, details=(envelope.get("error") or {}).get("details"))
        self.code = code
        self.status = status
        self.envelope = envelope


@dataclass(frozen=True)
class Endpoint:
    """The API's base URL and the key to send, with where each came from."""

    url: str
    api_key: str | None


def read_profile(path: Path) -> dict[str, Any]:
    """The profile `baton login` wrote, or nothing when there is none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot read the profile {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def write_profile(path: Path, url: str, api_key: str) -> None:
    """Write the profile readable by its owner only (it holds an API key)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as handle:
        json.dump({"url": url, "apiKey": api_key}, handle, indent=2)
        handle.write("\n")


def endpoint(config: Config) -> Endpoint:
    """BATON_URL and BATON_API_KEY, each overriding the profile; the local API by default."""
    needs_profile = config.api_url is None or config.api_key is None
    profile = read_profile(config.cli_profile_path) if needs_profile else {}
    url = config.api_url or profile.get("url") or DEFAULT_URL
    return Endpoint(url=str(url).rstrip("/"), api_key=config.api_key or profile.get("apiKey"))


def _reason(exc: requests.RequestException) -> str:
    """A short cause for a failed connection (requests' own text nests several exceptions)."""
    text = str(exc)
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if "Connection refused" in text:
        return "connection refused"
    if any(s in text for s in ("Name or service not known", "NameResolution", "nodename nor servname")):
        return "host not found"
    if "Temporary failure in name resolution" in text:
        return "host not found"
    return type(exc).__name__


class ApiClient:
    """Calls ``/api/v1`` with the key; answers are the API's envelope, errors :class:`ApiError`."""

    def __init__(self, where: Endpoint, *, require_key: bool = True) -> None:
        if require_key and not where.api_key:
            raise ClientError("no API key: set BATON_API_KEY or run `baton login`")
        self.url = where.url
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "baton-cli"
        if where.api_key:
            self.session.headers["x-api-key"] = where.api_key

    def unreachable(self, exc: requests.RequestException) -> ClientError:
        """A failed connection as one line naming BATON_URL."""
        return ClientError(f"cannot reach the Baton API at {self.url} (BATON_URL): {_reason(exc)}")

    def send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """One request; an unreachable API or a bad BATON_URL is a :class:`ClientError`."""
        try:
            return self.session.request(
                method, self.url + path, params=params, json=body, headers=headers, timeout=TIMEOUT_S
            )
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
            raise ClientError(f"BATON_URL {self.url!r} is not a valid URL: {exc}") from None
        except requests.RequestException as exc:
            raise self.unreachable(exc) from None

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The API's envelope on success; its error as :class:`ApiError` otherwise."""
        return self.envelope(self.send(method, path, **kwargs))

    def envelope(self, response: requests.Response) -> dict[str, Any]:
        """The answer's envelope when it succeeded; :class:`ApiError` when it is the error envelope."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "success" not in body:
            raise ClientError(
                f"{self.url} answered {response.status_code} without Baton's JSON envelope "
                "(is BATON_URL right?)"
            )
        if not body["success"]:
            error = body.get("error") or {}
            code = str(error.get("code") or "ERROR")
            raise ApiError(code, str(error.get("message") or response.reason), response.status_code, body)
        return body

    def events(self, path: str, last_event_id: str | None, read_timeout_s: float) -> Iterator[Event] | None:
        """The Server-Sent Events at ``path``, or None when the API has no such stream (404)."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        try:
            response = self.session.get(
                self.url + path, headers=headers, stream=True, timeout=(TIMEOUT_S[0], read_timeout_s)
            )
        except requests.RequestException as exc:
            raise self.unreachable(exc) from None
        content_type = response.headers.get("Content-Type", "")
        if response.status_code == 404 and not content_type.startswith("text/event-stream"):
            response.close()
            return None
        if response.status_code != 200 or not content_type.startswith("text/event-stream"):
            with response:
                self.envelope(response)  # raises the API's error
            raise ClientError(f"{self.url}{path} answered {response.status_code} without an event stream")
        return _stream(response, self)


def _stream(response: requests.Response, client: ApiClient) -> Iterator[Event]:
    """Events as they arrive; the connection closes when the caller stops reading."""
    with response:
        try:
            yield from SSEClient(response.iter_content(chunk_size=None)).events()
        except requests.RequestException as exc:
            raise client.unreachable(exc) from None
