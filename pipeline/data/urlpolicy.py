"""Which URLs the downloader may fetch.

Only http(s), and no loopback / private / link-local / reserved addresses unless the config names the
host: a URL list is untrusted input, and fetching internal addresses from a cluster is how a list
reaches services it must not. Host names are checked as written; a public name that resolves to a
private address (DNS rebinding) is not caught here, by design: resolving every URL twice costs more
than the downloader's own request.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain")


def refusal(url: str | None, allowed_hosts: frozenset[str] = frozenset()) -> str | None:
    """None if `url` may be fetched, else the drop reason."""
    if url is None or not url.strip():
        return "url_missing"
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 (raises ValueError on a malformed port)
    except ValueError:
        return "url_malformed"
    if parts.scheme not in ("http", "https"):
        return "url_scheme_refused"
    if not host:
        return "url_malformed"
    if host in allowed_hosts:
        return None
    if host in LOCAL_NAMES or host.endswith(LOCAL_SUFFIXES):
        return "url_private_address"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: see the module docstring
    if getattr(address, "ipv4_mapped", None):
        address = address.ipv4_mapped
    if (address.is_private or address.is_loopback or address.is_link_local or address.is_reserved
            or address.is_multicast or address.is_unspecified):
        return "url_private_address"
    return None
