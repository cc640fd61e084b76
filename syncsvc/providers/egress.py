"""One outbound-HTTP policy for every address a tenant supplies (CalDAV servers, callback
and target URLs).

A tenant's URL must never reach into the operator's network: the policy refuses non-global
addresses (loopback, private, link-local, unique-local, unspecified, multicast, reserved,
shared, documentation, and IPv4-mapped forms of them) unless ``SYNCSVC_EGRESS_ALLOW`` names the
host or a network holding the address. The check runs twice: on the URL when it is stored
(:meth:`EgressPolicy.check_url`) and on every *resolved* address when a connection is opened
(:class:`GuardedConnector`), so DNS rebinding and redirects are covered too.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from syncsvc.errors import Permanent

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

EGRESS_ALLOW_ENV = "SYNCSVC_EGRESS_ALLOW"
#: The most of an answer's body read into memory (8 MiB); more is refused, not buffered.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
#: What a tenant is told; the address and the rule go to the operator's log only.
REFUSED_FOR_TENANT = "the address is not allowed by this service's egress policy"
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")


class EgressRefused(aiohttp.ClientConnectionError):
    """A connection the policy does not allow (raised inside aiohttp's connect, so callers
    that handle connection errors see it; :func:`is_refusal` tells it apart)."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"egress to {host} refused: {reason}")
        self.host = host
        self.reason = reason


class AnswerTooLarge(Permanent):
    """The server answered with more than we are willing to read."""

    code = "answer_too_large"


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if inner is not None:
            return inner
    return address


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Which hosts and networks tenant URLs may reach beyond the public internet.

    ``allow_hosts`` and ``allow_networks`` are the operator's exceptions (an on-premises CalDAV
    server, or 127.0.0.1 in tests); for them plain ``http`` is accepted too.
    """

    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> EgressPolicy:
        """``"caldav.corp.example, 10.20.0.0/16 127.0.0.1"``: host names and CIDRs, comma or
        space separated. Raises ``ValueError`` naming an entry that is neither."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (spec or "").replace(",", " ").split():
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not name or "/" in name or ":" in name:
                raise ValueError(f"{EGRESS_ALLOW_ENV}: {entry!r} is neither a host nor a CIDR")
            hosts.add(name)
        return cls(frozenset(hosts), tuple(networks))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> EgressPolicy:
        return cls.parse(environ.get(EGRESS_ALLOW_ENV))

    def host_allowed(self, host: str) -> bool:
        """The operator named this host (or the literal address's network)."""
        name = host.lower().rstrip(".").strip("[]")
        if name in self.allow_hosts:
            return True
        address = _literal(name)
        return address is not None and self._network_allowed(address)

    def _network_allowed(self, address: IPAddress) -> bool:
        candidates = {address, _unmapped(address)}
        return any(a in net for a in candidates for net in self.allow_networks)

    def address_refusal(self, host: str, address: IPAddress) -> str | None:
        """Why connecting to ``address`` (resolved from ``host``) is refused, or None."""
        if host.lower().rstrip(".") in self.allow_hosts or self._network_allowed(address):
            return None
        inner = _unmapped(address)
        if inner.is_multicast or inner.is_reserved or inner.is_unspecified or not inner.is_global:
            return f"{address} is not a public address"
        return None

    def check_url(self, value: str) -> str:
        """A URL a tenant wants us to call: refused with ``ValueError`` (a 422 at the edge)
        unless it is https (http only for allowed hosts), has a host, carries no user:password,
        and names no address or local name outside the policy. Returns it unchanged."""
        try:
            url = URL(value)
        except (TypeError, ValueError) as exc:
            raise ValueError("must be an http(s) URL with a host") from exc
        host = url.raw_host
        if url.scheme not in ("http", "https") or not host:
            raise ValueError("must be an http(s) URL with a host")
        if url.raw_user is not None or url.raw_password is not None:
            raise ValueError("must not carry a user name or password; give them as fields")
        allowed = self.host_allowed(host)
        if url.scheme == "http" and not allowed:
            raise ValueError("must be https (plain http only for hosts the operator allows)")
        if allowed:
            return value
        name = host.lower().rstrip(".")
        if name == "localhost" or name.endswith((".localhost", ".local", ".internal")):
            raise ValueError(REFUSED_FOR_TENANT)
        address = _literal(name)
        if address is None and _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
            # 2130706433, 0x7f.1, 127.1: legacy spellings of addresses; no TLD is numeric.
            raise ValueError("must name a host, or an address in its usual form")
        if address is not None and self.address_refusal(name, address) is not None:
            raise ValueError(REFUSED_FOR_TENANT)
        return value


_installed: EgressPolicy | None = None


def install(policy: EgressPolicy) -> None:
    """Makes ``policy`` the one the API's URL validators use (set from the settings at start)."""
    global _installed
    _installed = policy


def current() -> EgressPolicy:
    """The installed policy, else the one ``SYNCSVC_EGRESS_ALLOW`` describes."""
    return _installed if _installed is not None else EgressPolicy.from_env(os.environ)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class GuardedConnector(aiohttp.TCPConnector):
    """A connector that checks every resolved address against the policy before connecting.

    aiohttp resolves (or takes a literal address) in ``_resolve_host`` for each new connection,
    redirects included, so filtering its answer is the one place every connection passes.
    """

    def __init__(self, policy: EgressPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policy = policy

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Any] | None = None
    ) -> list[Any]:
        results = await super()._resolve_host(host, port, traces)
        allowed, reasons = [], []
        for result in results:
            address = ipaddress.ip_address(result["host"])
            reason = self.policy.address_refusal(host, address)
            if reason is None:
                allowed.append(result)
            else:
                reasons.append(reason)
        if not allowed:
            raise EgressRefused(host, "; ".join(reasons) or "no address")
        return allowed


def is_refusal(exc: BaseException) -> bool:
    """The policy refused the connection (aiohttp may wrap the original error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, EgressRefused):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


async def read_bounded(
    response: aiohttp.ClientResponse, max_bytes: int = MAX_ANSWER_BYTES
) -> bytes:
    """The body, refusing more than ``max_bytes`` (early on a large ``Content-Length``, else
    as soon as the stream passes the cap) so a hostile server cannot fill our memory."""
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        response.close()
        raise AnswerTooLarge(f"answer of {declared} bytes is over the {max_bytes}-byte cap")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            response.close()
            raise AnswerTooLarge(f"answer is over the {max_bytes}-byte cap")
        chunks.append(chunk)
    return b"".join(chunks)
