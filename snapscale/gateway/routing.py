"""Which deployment a request is for, and the headers that cross the gateway each way.

Pure: strings and header mappings in, a route or headers out; no I/O. A request names its
deployment by a path prefix (`/<deployment>/...`, stripped before it goes upstream) or, when the
gateway has a domain, by its Host header (`<deployment>.<domain>`, the path kept as it is).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")  # a deployment name (shared/bus/subjects.py check_token)

# RFC 9110 7.6.1: meant for one connection, never forwarded (plus what a header `Connection` names)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# also not forwarded upstream: the gateway answers `Expect: 100-continue` itself, and it sets these
_NOT_UPSTREAM = HOP_BY_HOP | {"expect", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix"}


class NoRoute(Exception):
    """The request names no deployment; `reason` is the one line the client gets with the 404."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Route:
    deployment: str
    path: str  # path and query to request from the replica, raw (as the client encoded it)
    prefix: str  # the `/<deployment>` taken off the path; "" when the Host header routed it


def route(host: str | None, raw_path: str, domain: str) -> Route:
    """The deployment a request is for: `<deployment>.<domain>` in Host first, then the path."""
    if domain and host:
        name = _hostname(host)
        if name.endswith("." + domain):
            dep = name[: -len(domain) - 1]
            if _TOKEN.match(dep):
                return Route(dep, raw_path if raw_path.startswith("/") else "/" + raw_path, "")
    if not raw_path.startswith("/"):
        raise NoRoute(f"request target {raw_path[:80]!r} is not a path (/<deployment>/...)")
    rest = raw_path[1:]
    cut = len(rest)
    for sep in ("/", "?"):
        i = rest.find(sep)
        if i != -1 and i < cut:
            cut = i
    dep = rest[:cut]
    if not dep:
        where = f" or the Host header (<deployment>.{domain})" if domain else ""
        raise NoRoute(f"no deployment named in the path (/<deployment>/...){where}")
    if not _TOKEN.match(dep):
        raise NoRoute(f"{dep[:80]!r} is not a deployment name ([A-Za-z0-9_-]+)")
    tail = rest[cut:]
    return Route(dep, tail if tail.startswith("/") else "/" + tail, "/" + dep)


def _hostname(host: str) -> str:
    """The Host header without its port, lower case, without a trailing dot."""
    h = host.strip().lower()
    h = h.split("]", 1)[0] + "]" if h.startswith("[") else h.rsplit(":", 1)[0]  # [v6]:port or name:port
    return h.rstrip(".")


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    out: set[str] = set()
    for v in headers.getall("Connection", ()):
        out.update(t.strip().lower() for t in v.split(",") if t.strip())
    return out


def _via(version: tuple[int, int], pseudonym: str) -> str:
    return f"{version[0]}.{version[1]} {pseudonym}"


def upstream_headers(
    incoming: CIMultiDictProxy[str],
    *,
    client_ip: str,
    scheme: str,
    version: tuple[int, int],
    prefix: str,
    via: str,
) -> CIMultiDict[str]:
    """The request's headers as the replica gets them: hop-by-hop ones dropped, the Host kept, the
    client appended to X-Forwarded-For, X-Forwarded-Proto/-Host/-Prefix set by what this hop saw
    (never trusted from the client), this hop appended to Via."""
    drop = _NOT_UPSTREAM | _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in incoming.items():
        if k.lower() not in drop:
            out.add(k, v)
    prior = ", ".join(out.popall("X-Forwarded-For", ()))
    out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    out["X-Forwarded-Proto"] = scheme
    host = incoming.get("Host")
    if host:
        out["X-Forwarded-Host"] = host
    if prefix:
        out["X-Forwarded-Prefix"] = prefix
    prior_via = ", ".join(out.popall("Via", ()))
    out["Via"] = f"{prior_via}, {_via(version, via)}" if prior_via else _via(version, via)
    return out


def downstream_headers(
    upstream: CIMultiDictProxy[str], *, version: tuple[int, int], via: str
) -> CIMultiDict[str]:
    """The replica's response headers as the client gets them: hop-by-hop ones dropped (the
    gateway frames the body itself), this hop appended to Via."""
    drop = HOP_BY_HOP | _connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in upstream.items():
        if k.lower() not in drop:
            out.add(k, v)
    prior_via = ", ".join(out.popall("Via", ()))
    out["Via"] = f"{prior_via}, {_via(version, via)}" if prior_via else _via(version, via)
    return out
