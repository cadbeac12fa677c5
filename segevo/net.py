"""Network reachability: fail in seconds with a message that says what to do, instead of retrying into a dead
network for minutes (the Hub client and urllib both do, by default)."""

from __future__ import annotations

import socket
import urllib.request
from urllib.parse import urlparse

from segevo.errors import DownloadError


def _endpoint(url: str) -> tuple[str, int]:
    """The host and port a request for ``url`` connects to first: the proxy, when one applies."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return proxied.hostname or "", proxied.port or (443 if proxied.scheme == "https" else 80)
    return host, parsed.port or (443 if parsed.scheme == "https" else 80)


def check_reachable(url: str, hint: str, timeout: float = 5.0) -> None:
    """Open (and close) one TCP connection to ``url``'s host, or its proxy; ``hint`` ends the error message."""
    host, port = _endpoint(url)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise DownloadError(f"cannot reach {url} ({reason}): this machine looks offline; {hint}") from None
