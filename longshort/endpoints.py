"""Remote services (an MLflow tracking server, an S3 endpoint): bounded retries, then one clear error.

A service that does not answer is tried ``attempts`` times, waiting ``backoff_s``,
then twice that, and so on (at most ``max_backoff_s``) in between; then
ServiceUnavailable names the service, its URL, the attempts and the last reason,
instead of a traceback from inside a client library. With the defaults (3 attempts,
waits of 1 s and 2 s, 5 s per probe) a refused connection fails in about 3 s and an
unanswered one in about 18 s. The environment changes the policy:

* ``LONGSHORT_RETRIES``: attempts, >= 1 (default 3);
* ``LONGSHORT_RETRY_BACKOFF_S``: the first wait, >= 0 (default 1.0);
* ``LONGSHORT_RETRY_TIMEOUT_S``: the timeout of one probe, > 0 (default 5.0).

We probe before handing the URL to the client because MLflow's HTTP client, left to
itself, retries a refused connection for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
with exponential backoff) before it raises.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from longshort.config import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRIES_ENV, BACKOFF_ENV, TIMEOUT_ENV = "LONGSHORT_RETRIES", "LONGSHORT_RETRY_BACKOFF_S", "LONGSHORT_RETRY_TIMEOUT_S"


class ServiceUnavailable(ConnectionError):
    """A remote service that did not answer within the retry policy; the message names it and its URL."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 10.0
    timeout_s: float = 5.0  # one probe

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"invalid retry policy {self}: attempts >= 1, waits >= 0 and timeout_s > 0 required")

    def waits_s(self) -> list[float]:
        """The waits between attempts: ``backoff_s · 2^i``, capped at ``max_backoff_s``."""
        return [min(self.backoff_s * 2**i, self.max_backoff_s) for i in range(self.attempts - 1)]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RetryPolicy:
        """The defaults, with ``LONGSHORT_RETRIES``, ``LONGSHORT_RETRY_BACKOFF_S`` and ``LONGSHORT_RETRY_TIMEOUT_S``;
        a value that is not a number, or out of range, is a ``ConfigError`` naming the variable."""
        values: dict[str, float] = {}
        for name, field, kind in ((RETRIES_ENV, "attempts", int), (BACKOFF_ENV, "backoff_s", float),
                                  (TIMEOUT_ENV, "timeout_s", float)):  # fmt: skip
            raw = environ.get(name, "").strip()
            if raw:
                try:
                    values[field] = kind(raw)
                except ValueError:
                    raise ConfigError(f"{name}={raw!r} is not a{'n integer' if kind is int else ' number'}") from None
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"{exc} (from {RETRIES_ENV}, {BACKOFF_ENV}, {TIMEOUT_ENV})") from None


def display_url(url: str) -> str:
    """The URL without user or password, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)  # urllib wraps the socket error
    return getattr(reason, "strerror", None) or str(reason) or type(exc).__name__


def retry(
    call: Callable[[], T],
    *,
    service: str,
    url: str,
    policy: RetryPolicy | None = None,
    transient: tuple[type[BaseException], ...] = (OSError,),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, tried again after each ``transient`` error as ``policy`` says; ServiceUnavailable at the end."""
    policy = policy or RetryPolicy.from_env()
    waits = policy.waits_s()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except transient as exc:
            log.info("%s at %s: attempt %d of %d failed: %s",
                        service, display_url(url), attempt, policy.attempts, _reason(exc))  # fmt: skip
            if attempt == policy.attempts:
                raise ServiceUnavailable(
                    f"{service} at {display_url(url)} is not reachable after {policy.attempts} "
                    f"attempt{'s' if policy.attempts > 1 else ''}: {_reason(exc)}"
                ) from exc
            sleep(waits[attempt - 1])
    raise AssertionError("unreachable")


def probe_http(url: str, timeout_s: float) -> None:
    """Return when the server answers at all (any status, 404 and 403 included); raise OSError when it does not."""
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()  # noqa: S310 - http(s) only, checked by the caller
    except urllib.error.HTTPError:
        return


def require_reachable(url: str, service: str, *, path: str = "", policy: RetryPolicy | None = None) -> None:
    """Probe an http(s) URL (plus ``path``, e.g. ``/health``) until it answers, or raise ServiceUnavailable.

    Other schemes (``sqlite:``, ``file:``, ``s3:``) have nothing to probe and pass.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        return
    policy = policy or RetryPolicy.from_env()
    target = display_url(url).rstrip("/") + path  # urllib takes no user:password@; the probe needs no login
    retry(lambda: probe_http(target, policy.timeout_s), service=service, url=url, policy=policy)
