"""Which URLs the downloader may fetch, and which addresses it may connect to.

A URL list is untrusted input, and the downloader runs inside a cluster that sits next to a cloud
metadata service and private services: a list (or a redirect it leads to) must not reach them. So:
  - only http(s) URLs; a host that is no valid name or address is malformed;
  - before any connection the host is *resolved* (getaddrinfo) and every address it resolves to is
    checked: loopback, private, link-local, shared (CGNAT), reserved, multicast and unspecified ranges
    are refused, IPv4 in every spelling the resolver accepts (127.1, 2130706433, 0x7f000001,
    0177.0.0.1, 0) and IPv6 with the IPv4 addresses it can embed (mapped, 6to4, Teredo, NAT64);
    IPv6 forms that reach an IPv4 address or a site's own network through a tunnel or translator and
    that no host on the web has (IPv4-compatible ::a.b.c.d, SIIT ::ffff:0:a.b.c.d, local-use NAT64
    64:ff9b:1::/48, site-local fec0::/10) are refused whatever they carry;
  - the connection then goes to the address that was checked (fetch.py pins it): a second lookup could
    answer differently (DNS rebinding).
`allow_private_hosts` names exceptions: host names (any address they resolve to is allowed), or
addresses and networks ("127.0.0.2", "10.0.0.0/8"; whatever name resolves to them).

`refusal()` is the cheap check done when a list is planned (no DNS: syntax, scheme, local names and
literal addresses in any spelling); `HostPolicy.pin()` is the check done for every connection.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from typing import Callable, Iterable
from urllib.parse import urlsplit

LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Refused whatever address they embed: deprecated or site-local forms no web host has, each of which a
# tunnel or translator may carry into the cluster's own network (Python's is_global passes them all).
FORBIDDEN_V6 = tuple(ipaddress.ip_network(net) for net in (
    "::/96",            # IPv4-compatible (RFC 4291, deprecated): a sit tunnel sends ::a.b.c.d to a.b.c.d
    "::ffff:0:0:0/96",  # SIIT's IPv4-translated (RFC 2765): ::ffff:0:a.b.c.d
    "64:ff9b:1::/48",   # local-use NAT64 (RFC 8215): a site's own translator, to its own IPv4 network
    "fec0::/10",        # site-local (RFC 3879, deprecated): a site's own network
))
# What the resolver accepts as an IPv4 literal (inet_aton's forms: 1 to 4 parts, decimal, octal or hex).
_NUMERIC_V4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$")

Resolver = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(Exception):
    """A URL or an address the policy refuses; `reason` is the counted drop reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA), as the system's resolver answers."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def literal_address(host: str) -> IPAddress | None:
    """The address `host` denotes without DNS (in any spelling the resolver takes), or None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone id (%eth0) names no other address
    except ValueError:
        pass
    if _NUMERIC_V4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            return None
    return None


def _embedded_v4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (and reaches, through a gateway that honours them)."""
    if address.version == 4:
        return []
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found += list(address.teredo)
    if address in NAT64:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def is_public(address: IPAddress) -> bool:
    """A global unicast address, in no FORBIDDEN_V6 range, whose embedded IPv4 addresses (if any) are
    global unicast too."""
    if not address.is_global or address.is_multicast or address.is_unspecified:
        return False
    if address.version == 6 and any(address in net for net in FORBIDDEN_V6):
        return False
    return all(is_public(v4) for v4 in _embedded_v4(address))


class HostPolicy:
    """The refusal rules, with the exceptions named in `allow_private_hosts`."""

    def __init__(self, allowed: Iterable[str] = ()):
        names, networks = set(), []
        for entry in allowed:
            entry = entry.strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.add(entry)
        self.names, self.networks = frozenset(names), tuple(networks)

    def address_allowed(self, host: str, address: IPAddress) -> bool:
        if host in self.names or any(address in net for net in self.networks if net.version == address.version):
            return True
        return is_public(address)

    def refusal(self, url: str | None) -> str | None:
        """None if `url` may be tried, else the drop reason (no DNS: see the module docstring)."""
        try:
            _split(url, redirect=False)
            host = _host(url)
        except Refused as err:
            return err.reason
        if host in self.names:
            return None
        if host in LOCAL_NAMES or host.endswith(LOCAL_SUFFIXES):
            return "url_private_address"
        address = literal_address(host)
        if address is not None and not self.address_allowed(host, address):
            return "url_private_address"
        return None

    def pin(self, url: str, resolver: Resolver = system_resolver, redirect: bool = False) -> tuple[str, int, str]:
        """(host, port, the address to connect to) for `url`, after resolving and checking every address;
        raises Refused. `redirect`: the URL is a redirect's target (its refusals are counted apart)."""
        parts = _split(url, redirect)
        host, port = _host(url), parts.port or (443 if parts.scheme == "https" else 80)
        private = "redirect_private_address" if redirect else "url_private_address"
        if host not in self.names and (host in LOCAL_NAMES or host.endswith(LOCAL_SUFFIXES)):
            raise Refused(private, f"{host} is a local name")
        literal = literal_address(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(host, port)]
            except (OSError, UnicodeError) as err:
                raise Refused("dns_error", f"cannot resolve {host}: {err}") from None
            if not addresses:
                raise Refused("dns_error", f"{host} resolves to no address")
        bad = [str(a) for a in addresses if not self.address_allowed(host, a)]
        if bad:  # one refused address refuses the host: its owner controls which one a client gets
            raise Refused(private, f"{host} resolves to {', '.join(bad)}, a non-public address")
        return host, port, str(addresses[0])


def _split(url: str | None, redirect: bool):
    if url is None or not url.strip():
        raise Refused("url_missing", "no URL")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (raises ValueError on a malformed port)
    except ValueError as err:
        raise Refused("url_malformed", str(err)) from None
    if parts.scheme not in ("http", "https"):
        raise Refused("redirect_scheme_refused" if redirect else "url_scheme_refused",
                      f"scheme {parts.scheme!r} is not http(s)")
    return parts


def _host(url: str) -> str:
    """The URL's host, lower case, IDNA-encoded, without a trailing dot; raises Refused if malformed."""
    host = (urlsplit(url.strip()).hostname or "").rstrip(".")
    if not host or any(c in host for c in " \t\r\n/\\@"):
        raise Refused("url_malformed", f"no valid host in {url!r}")
    if host.isascii():
        return host.lower()
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise Refused("url_malformed", f"host {host!r} is not a valid name") from None


def refusal(url: str | None, allowed_hosts: Iterable[str] = ()) -> str | None:
    """None if `url` may be tried, else the drop reason (the plan-time check, no DNS)."""
    return HostPolicy(allowed_hosts).refusal(url)
