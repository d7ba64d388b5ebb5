"""Which Host headers the HTTP/SSE server admits, and the 421 that says how to admit another.

Loopback names are admitted on any port. With a non-loopback bind, so are this machine's own names: its
hostnames and the addresses of its interfaces (all of them for a wildcard bind such as 0.0.0.0, else the bound
address), on the bound port; `allowed_hosts` (`--allowed-host`) adds any other. A Host header outside that list
is refused with 421 and a body that names it and the flag that admits it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_WILDCARD_BINDS = ("0.0.0.0", "::", "")
_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def interface_addresses(*, ipv6: bool = True) -> list[str]:
    """Addresses of this machine's network interfaces (Linux: read from the kernel; elsewhere only what the
    hostname resolves to), link-local IPv6 excluded (a Host header cannot carry its zone)."""
    found: set[str] = set()
    with contextlib.suppress(OSError, ImportError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        import fcntl  # POSIX; the socket only carries the ioctl, it sends nothing

        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                found.add(socket.inet_ntoa(packed[20:24]))
    if ipv6:
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/net/if_inet6").read_text().splitlines():
                address = ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))
                if not address.is_link_local:
                    found.add(str(address))
    for name in (socket.gethostname(), socket.getfqdn()):
        with contextlib.suppress(OSError):
            for info in socket.getaddrinfo(name, None):
                address = str(info[4][0])
                if ipv6 or ":" not in address:
                    found.add(address)
    return sorted(found)


def _as_host(name: str) -> str:
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def machine_names(bind: str) -> list[str]:
    """This machine's names a client may use to reach a server bound to `bind` (non-loopback)."""
    names = {socket.gethostname(), socket.getfqdn()}
    if bind in _WILDCARD_BINDS:
        names.update(interface_addresses(ipv6=bind != "0.0.0.0"))
    else:
        names.add(bind.strip("[]"))
    return sorted(_as_host(n) for n in names if n)


def allowed_hosts(bind: str, port: int, loopback: bool, extra: list[str]) -> list[str]:
    """Host header values admitted (exact, or 'name:*' for any port)."""
    hosts = [*LOOPBACK_HOSTS, *(f"{n}:*" for n in LOOPBACK_HOSTS)]
    if not loopback:
        for name in machine_names(bind):
            if name in LOOPBACK_HOSTS:
                continue
            hosts.append(f"{name}:{port}" if port else f"{name}:*")  # port 0: whichever the OS picks
            if port == 80:
                hosts.append(name)
    return [*hosts, *extra]


def host_admitted(host: str | None, allowed: list[str]) -> bool:
    if not host:
        return False
    if host in allowed:
        return True
    return any(a.endswith(":*") and host.startswith(a[:-1]) for a in allowed)


def refusal(host: str | None) -> PlainTextResponse:
    if not host:
        return PlainTextResponse("421 Misdirected Request: the request has no Host header", status_code=421)
    return PlainTextResponse(
        f"421 Misdirected Request: Host header {host!r} is not admitted by this server (DNS-rebinding "
        f"protection). To admit it, restart the server with --allowed-host {host} (or add it to allowed_hosts "
        f"in the config file; 'name:*' admits any port).", status_code=421)


class HostGate:
    """ASGI middleware in front of the MCP app: refuses a Host outside `allowed` with an explanatory 421
    (the SDK's own check, behind it, answers a bare 'Invalid Host header')."""

    def __init__(self, app: Any, allowed: list[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host")
            if not host_admitted(host, self.allowed):
                await refusal(host)(scope, receive, send)
                return
        await self.app(scope, receive, send)
