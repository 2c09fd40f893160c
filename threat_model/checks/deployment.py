"""Threat checks on a deployment: T11 an identity key read from disk, T12 a network attacker impersonating the
coordinator."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import stat
import tempfile
import threading
from pathlib import Path

from fedse_threat_model.harness import CheckResult, ProtectionSettings, check

# ======================================================================================================
# T11: an identity key is read from disk
# ======================================================================================================

@check
def identity_key_at_rest(settings: ProtectionSettings) -> CheckResult:
    """Someone with read access to the institution's disk (other users, a backup) wants its Ed25519 identity.
    Pass: the key file is mode 0600, and a passphrase-protected file is useless without the passphrase."""
    from fedse_secure.secagg.masking import IdentityKey, SecureAggregationError

    with tempfile.TemporaryDirectory(prefix="fedse-threat-key-") as tmp:
        key = IdentityKey.generate()
        plain, locked = Path(tmp) / "id.pem", Path(tmp) / "id-locked.pem"
        key.save(plain)
        key.save(locked, passphrase=b"correct horse battery staple")
        modes = {p.name: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in (plain, locked)}
        outcomes = {}
        for label, pw in (("no_passphrase", None), ("wrong_passphrase", b"guess")):
            try:
                IdentityKey.load(locked, passphrase=pw)
                outcomes[label] = "loaded"
            except SecureAggregationError:
                outcomes[label] = "refused"
        ok_load = IdentityKey.load(locked, passphrase=b"correct horse battery staple").public_bytes() == key.public_bytes()
    passed = all(m == "0o600" for m in modes.values()) and set(outcomes.values()) == {"refused"} and ok_load
    return CheckResult(passed, f"key files {sorted(set(modes.values()))}; locked key without passphrase: "
                               f"{outcomes['no_passphrase']}, wrong passphrase: {outcomes['wrong_passphrase']}",
                       {"file_modes": modes, "attempts": outcomes, "owner_can_load": ok_load})


# ======================================================================================================
# T12: a network attacker impersonates the coordinator
# ======================================================================================================

def _tls_handshake(server_cert: Path, server_key: Path, ca: Path | None, host: str = "127.0.0.1") -> str:
    """Serve one TLS handshake with ``server_cert`` on loopback and connect to it as an institution would.
    Returns "connected" or the client's error. ``ca=None`` is a client that does not verify."""
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(str(server_cert), str(server_key))
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve():
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with contextlib.suppress(OSError, ssl.SSLError):
                with srv_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
        except OSError:
            pass

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    cli_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        cli_ctx.check_hostname = False
        cli_ctx.verify_mode = ssl.CERT_NONE
    else:
        cli_ctx.load_verify_locations(str(ca))
    try:
        with socket.create_connection((host, port), timeout=5) as raw:
            with cli_ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(b"x")
        return "connected"
    except (ssl.SSLError, OSError) as err:
        return f"refused: {type(err).__name__}: {str(err)[:90]}"
    finally:
        listener.close()
        th.join(timeout=5)


@check
def coordinator_impersonation(settings: ProtectionSettings) -> CheckResult:
    """An attacker on the network answers in the coordinator's place with its own certificate (from another
    CA). Pass: institutions, which pin the federation CA, refuse the impostor and accept the real coordinator.
    Uses the certificates ``fedse certs init`` issues (fedse_secure.federation.flower.pki)."""
    from fedse_secure.federation.flower import pki

    with tempfile.TemporaryDirectory(prefix="fedse-threat-tls-") as tmp:
        real = pki.init_certs(Path(tmp) / "federation", ["inst0"])
        fake = pki.init_certs(Path(tmp) / "attacker", ["inst0"])
        ca = real.ca_cert if settings.on("tls") else None
        genuine = _tls_handshake(real.superlink_cert, real.superlink_key, ca)
        impostor = _tls_handshake(fake.superlink_cert, fake.superlink_key, ca)
    passed = genuine == "connected" and impostor.startswith("refused")
    return CheckResult(passed, f"real coordinator: {genuine}; impostor: {impostor.split(':')[0]}",
                       {"real_coordinator": genuine, "impostor": impostor, "verify_against_federation_ca": settings.on("tls")})
