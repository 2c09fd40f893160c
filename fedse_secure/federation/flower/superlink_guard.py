"""``flower-superlink`` with the Control and Runtime APIs closed to remote clients.

In Flower 1.42 (open source) one HTTPS port serves three APIs: Fleet (SuperNodes), Control (register nodes,
start runs) and Runtime (the ServerApp process). Control has no account authentication without Flower's
enterprise OIDC plugin, so anyone who can reach the port could register their own node key and join despite
``--enable-supernode-auth``. This launcher adds one middleware in front of Flower's own: requests outside
``/v1/fleet/`` are answered 403 unless they come from an allowed address (loopback by default: the
coordinator's operator and ServerApp run on the coordinator machine). Everything else is Flower's unchanged
``flower-superlink`` entry point.

Usage (what ``fedse server start`` runs): ``python -m fedse_secure.federation.flower.superlink_guard
--control-allow 127.0.0.1,::1 -- <flower-superlink arguments>``.
"""

from __future__ import annotations

import ipaddress
import sys

FLEET_PREFIX = "/v1/fleet/"
LOOPBACK = ("127.0.0.1", "::1")


def is_allowed(path: str, client_host: str | None, allowed: tuple[str, ...]) -> bool:
    if path.startswith(FLEET_PREFIX):
        return True
    if client_host is None:
        return False
    try:
        ip = ipaddress.ip_address(client_host)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for entry in allowed:
        if ip in ipaddress.ip_network(entry, strict=False):
            return True
    return False


def make_guard(allowed: tuple[str, ...]):
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse

    class ControlGuard(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            host = request.client.host if request.client else None
            if not is_allowed(request.url.path, host, allowed):
                return JSONResponse(
                    {"detail": "the SuperLink's Control and Runtime APIs only accept the coordinator's own "
                               "addresses (fedse superlink.control_allow); institutions use /v1/fleet/ only"},
                    status_code=403,
                )
            return await call_next(request)

    return ControlGuard


def install(allowed: tuple[str, ...]) -> None:
    """Put the guard first in the SuperLink app's middleware list (flwr==1.42.0's ``_get_middleware``)."""
    import flwr.superlink.main as superlink_main
    from starlette.middleware import Middleware

    original = superlink_main._get_middleware
    if getattr(original, "_fedse_guarded", False):
        return

    def guarded():
        return [Middleware(make_guard(allowed)), *original()]

    guarded._fedse_guarded = True  # type: ignore[attr-defined]
    superlink_main._get_middleware = guarded


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    allowed = LOOPBACK
    if args[:1] == ["--control-allow"]:
        allowed = tuple(a.strip() for a in args[1].split(",") if a.strip())
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    for entry in allowed:
        ipaddress.ip_network(entry, strict=False)  # fail early on a typo
    install(allowed)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *args]
    flower_superlink()


if __name__ == "__main__":
    main()
