"""Local PKI for tests and small pilots: a CA, TLS certificates, Flower node-auth keys and identity keys.

What each file is for (Flower 1.42):

* ``ca/ca.pem`` signs every TLS server certificate; institutions and the operator verify the SuperLink with
  it (``--root-certificates``; ``root-certificates`` in the flwr connection).
* ``coordinator/superlink.{pem,key}``: the SuperLink's server certificate. In 1.42 one certificate serves the
  Fleet API (SuperNodes), the Control API (``flwr run``) and the Runtime API (the ServerApp process).
* ``institutions/<name>/supernode.{pem,key}``: each SuperNode's server certificate for its own Runtime API
  (the SuperNode <-> ClientApp process link). Flower 1.42 has no mutual TLS on the Fleet API: a SuperNode
  proves who it is with its node-authentication key instead (next item), so these are *server* certificates.
* ``institutions/<name>/node_auth{,.pub}``: the EC P-384 key pair (OpenSSH format) Flower's SuperNode
  authentication uses. The SuperLink runs with ``--enable-supernode-auth`` and only accepts nodes whose public
  key the coordinator registered; every Fleet request is signed with the private key.
* ``institutions/<name>/identity_ed25519{.pem,.pub}``: the institution's long-term Ed25519 identity for our
  secure-aggregation signatures and round attestations (independent of Flower, so a compromised transport
  cannot impersonate it).
* ``coordinator/identity_ed25519{.pem,.pub}``: the coordinator's Ed25519 identity; it signs every global
  adapter, and institutions verify with the ``.pub`` (received out of band) before loading one.

Bring your own: any CA works. Put your CA certificate, the SuperLink's certificate/key (SANs must cover the
address institutions dial) and each SuperNode's certificate/key at the paths the deployment configs name.
Keys can be made on each institution's own machine with ``fedse keys init --institution NAME --out DIR``;
only the ``*.pub`` files travel to the coordinator, which lists them in its config.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedse_secure.errors import FedseError

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")


class PkiError(FedseError, RuntimeError):
    """A certificate or key is missing, unreadable or does not match what is expected; says how to fix it."""


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    superlink_cert: Path
    superlink_key: Path
    supernode_certs: dict[str, tuple[Path, Path]]


@dataclass(frozen=True)
class KeyPaths:
    # name -> (private, public)
    node_auth: dict[str, tuple[Path, Path]]
    identity: dict[str, tuple[Path, Path]]
    #: The coordinator's adapter-signing identity (private, public), when it was asked for.
    coordinator: tuple[Path, Path] | None = None


def _write_private(path: Path, data: bytes, force: bool) -> None:
    _write_key_file(path, data, force, 0o600, "pass --force to overwrite it (this invalidates the old key)")


def _write_public(path: Path, data: bytes, force: bool) -> None:
    _write_key_file(path, data, force, 0o644, "pass --force to overwrite it")


def write_public_file(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (0644, atomically, never through a link): registries, public keys."""
    _write_key_file(Path(path), data, True, 0o644, "")


def _check_writable(path: Path, force: bool, fix: str) -> None:
    if path.is_symlink():
        raise PkiError(f"{path} is a symbolic link (to {os.readlink(path)}); a key is never written through a link: "
                       "remove the link or choose another --out")
    if os.path.lexists(path) and not force:
        raise PkiError(f"{path} already exists; {fix}")


def _write_key_file(path: Path, data: bytes, force: bool, mode: int, fix: str) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``, whatever the umask, and never through a symbolic link.

    The file is created under a temporary name with O_EXCL|O_NOFOLLOW (so nothing else can sit there), given
    its mode before it holds a byte, fsynced and renamed over ``path``: a rename replaces a link itself, never
    its target, so a (dangling) symlink planted at a key path cannot redirect a private key elsewhere.
    """
    path = Path(path)
    _check_writable(path, force, fix)
    make_public_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb", closefd=False) as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        if os.path.lexists(tmp) and not os.path.islink(tmp):
            os.unlink(tmp)
        raise PkiError(f"cannot write {path}: {err.strerror}; choose a writable --out") from None


def make_public_dirs(folder: str | Path) -> Path:
    """``mkdir -p`` whose new folders are 0755 whatever the umask (never world-writable: a key written there
    could be swapped by anyone)."""
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o755)
        except FileExistsError:
            continue
        except OSError as err:
            raise PkiError(f"cannot create {d}: {err.strerror}; choose a writable --out") from None
        os.chmod(d, 0o755)
    if not folder.is_dir():
        raise PkiError(f"{folder} is not a folder; choose another --out")
    return folder


def _pem_private_key(data: bytes):
    return serialization.load_pem_private_key(data, password=None)


def _parse(path: str | Path, what: str, load,
           fix: str = "restore it, or create it again with `fedse certs init` / `fedse keys init`"):
    """``load(bytes)`` on the file's content; PkiError naming the file if it is unreadable or malformed (then
    ``fix`` says what to do)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PkiError(f"{what} {path} cannot be read ({err.strerror}); check the path in the config") from None
    try:
        return load(data)
    except Exception as err:  # noqa: BLE001 - cryptography raises ValueError, TypeError or UnsupportedAlgorithm
        raise PkiError(f"{what} {path} is damaged or not in the expected format ({type(err).__name__}); "
                       f"{fix}") from None


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedse-secure local PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_host(host: str) -> None:
    import re

    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    if len(host) > 253 or not re.fullmatch(rf"(\*\.)?{label}(\.{label})*\.?", host):
        raise PkiError(f"--host {host!r} is neither an IP address nor a DNS name (dot-separated labels of letters, "
                       "digits and '-'); pass the name or address institutions dial, e.g. --host coord.example.org")


def _server_key(path: Path, force: bool) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The TLS key at ``path`` (kept, so a rerun only reissues its certificate), or a new one with ``force`` or
    when there is none; with whether it is new."""
    if force or not os.path.lexists(path):
        return ec.generate_private_key(ec.SECP256R1()), True
    fix = "restore it, or pass --force to replace every TLS key and certificate"
    key = _parse(path, "TLS key", _pem_private_key, fix)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: expected an EC private key (PEM); {fix}")
    return key, False


def _issue_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    hosts: Sequence[str],
    days: int,
    key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    if not cert_path.is_file() or not key_path.is_file():
        raise PkiError(f"no CA in {ca_dir}; run `fedse certs init` first (or drop your own ca.pem/ca.key there)")
    fix = "restore it, or pass --force to create a new CA (this invalidates every certificate)"
    cert = _parse(cert_path, "CA certificate", x509.load_pem_x509_certificate, fix)
    key = _parse(key_path, "CA key", _pem_private_key, fix)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: expected an EC private key for the CA; {fix}")
    if not _same_public_key(key, cert):
        raise PkiError(f"{key_path} does not belong to {cert_path} (certificates it signs would not verify); put the "
                       "CA's own key there, or pass --force to create a new CA (this invalidates every certificate)")
    return cert, key


def _same_public_key(key, cert: x509.Certificate) -> bool:
    der = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*der) == cert.public_key().public_bytes(*der)


def init_certs(
    out_dir: str | Path,
    institutions: Sequence[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    force: bool = False,
) -> CertPaths:
    """Create (or reuse) a local CA, the SuperLink certificate and one SuperNode certificate per institution.

    An existing CA is reused so that adding an institution later does not invalidate the others' trust, and so
    are existing TLS keys (their certificates are reissued, for ``hosts`` and ``days``); ``force`` replaces all.
    """
    out = Path(out_dir)
    institutions = list(dict.fromkeys(institutions))
    for name in institutions:  # every name and host before any file: a bad one must not leave a CA behind
        _check_name(name)
    for host in hosts:
        _check_host(host)
    link_dir = out / "coordinator"
    node_dirs = {name: out / "institutions" / name for name in institutions}
    # Every kept key is read before anything is written: a damaged one leaves the PKI as it was.
    keys = {path: _server_key(path, force) for path in
            [link_dir / "superlink.key", *(d / "supernode.key" for d in node_dirs.values())]}
    ca_dir = out / "ca"
    if (ca_dir / "ca.pem").exists() and not force:
        ca_cert, ca_key = _load_ca(ca_dir)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        now = _now()
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("fedse-secure local CA"))
            .issuer_name(_name("fedse-secure local CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384())
        )
        _write_private(ca_dir / "ca.key", _pem_key(ca_key), force=True)
        _write_public(ca_dir / "ca.pem", _pem_cert(ca_cert), force=True)

    common_names = {link_dir / "superlink.key": ("fedse superlink", hosts),
                    **{d / "supernode.key": (f"fedse supernode {n}", DEFAULT_HOSTS) for n, d in node_dirs.items()}}
    for key_path, (key, new) in keys.items():
        common_name, names = common_names[key_path]
        cert = _issue_server_cert(ca_cert, ca_key, common_name, names, days, key)
        if new:
            _write_private(key_path, _pem_key(key), force=True)
        _write_public(key_path.with_suffix(".pem"), _pem_cert(cert), force=True)
    nodes = {name: (d / "supernode.pem", d / "supernode.key") for name, d in node_dirs.items()}
    return CertPaths(
        ca_cert=ca_dir / "ca.pem",
        ca_key=ca_dir / "ca.key",
        superlink_cert=link_dir / "superlink.pem",
        superlink_key=link_dir / "superlink.key",
        supernode_certs=nodes,
    )


def _check_name(name: str) -> None:
    import re

    from fedse_secure.config import NAME_PATTERN

    if not re.fullmatch(NAME_PATTERN, name):
        raise PkiError(f"institution name {name!r}: start with a letter or digit, then use letters, digits, '.', '_' "
                       "or '-' only (at most 64 characters)")


def _write_identity(folder: Path, force: bool) -> tuple[Path, Path]:
    ikey = ed25519.Ed25519PrivateKey.generate()
    _write_private(
        folder / "identity_ed25519.pem",
        ikey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        force,
    )
    _write_public(
        folder / "identity_ed25519.pub",
        ikey.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        force,
    )
    return folder / "identity_ed25519.pem", folder / "identity_ed25519.pub"


def init_keys(out_dir: str | Path, institutions: Sequence[str], force: bool = False,
              coordinator: bool = False) -> KeyPaths:
    """Create each institution's Flower node-auth key pair (EC P-384) and Ed25519 identity key pair; with
    ``coordinator``, also the coordinator's adapter-signing identity (an existing one is kept unless ``force``)."""
    out = Path(out_dir)
    institutions = list(dict.fromkeys(institutions))  # a name given twice would meet its own keys as "existing"
    # Every name and every target path before any file: a bad one must not leave half the keys behind.
    for name in institutions:
        _check_name(name)
    folder = out / "coordinator"
    existing = (folder / "identity_ed25519.pem", folder / "identity_ed25519.pub")
    keep_coordinator = all(p.is_file() and not p.is_symlink() for p in existing) and not force
    if coordinator and keep_coordinator:
        _check_identity_pair(*existing)
    targets = [out / "institutions" / name / f for name in institutions
               for f in ("node_auth", "node_auth.pub", "identity_ed25519.pem", "identity_ed25519.pub")]
    if coordinator and not keep_coordinator:
        targets += existing
    for path in targets:
        _check_writable(path, force, "pass --force to overwrite it (this invalidates the old key)")
    coordinator_paths = None
    if coordinator:
        coordinator_paths = existing if keep_coordinator else _write_identity(folder, force)
    node_auth: dict[str, tuple[Path, Path]] = {}
    identity: dict[str, tuple[Path, Path]] = {}
    for name in institutions:
        d = out / "institutions" / name
        # Flower 1.42's SuperNode loads an OpenSSH-format NIST-curve EC key (`--auth-supernode-private-key`),
        # and `flwr supernode register` takes the OpenSSH public key.
        nkey = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            d / "node_auth",
            nkey.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
            force,
        )
        _write_public(
            d / "node_auth.pub",
            nkey.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f" fedse-{name}\n".encode(),
            force,
        )
        ikey = ed25519.Ed25519PrivateKey.generate()
        _write_private(
            d / "identity_ed25519.pem",
            ikey.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            force,
        )
        _write_public(
            d / "identity_ed25519.pub",
            ikey.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            force,
        )
        node_auth[name] = (d / "node_auth", d / "node_auth.pub")
        identity[name] = (d / "identity_ed25519.pem", d / "identity_ed25519.pub")
    return KeyPaths(node_auth=node_auth, identity=identity, coordinator=coordinator_paths)


def _check_identity_pair(private: Path, public: Path) -> None:
    """A kept identity must load, and its two halves belong together, or everything it signs fails later."""
    fix = (f"restore it from a backup, or move {private.name} and {public.name} in {private.parent} away to create a "
           "new identity (every institution then needs the new .pub)")
    key = _parse(private, "identity key", _pem_private_key, fix)
    pub = _parse(public, "identity public key", serialization.load_pem_public_key, fix)
    if not isinstance(key, ed25519.Ed25519PrivateKey) or not isinstance(pub, ed25519.Ed25519PublicKey):
        raise PkiError(f"{private} and {public} are not an Ed25519 key pair; {fix}")
    if raw_public_bytes(key.public_key()) != raw_public_bytes(pub):
        raise PkiError(f"{public} is not the public half of {private}; {fix}")


def read_registry(path: str | Path):
    """The identity registry in ``path`` (empty if there is none); PkiError if it is damaged."""
    from fedse_secure.secagg.masking.identity import PublicKeyRegistry

    path = Path(path)
    if not os.path.lexists(path):
        return PublicKeyRegistry()
    return _parse(path, "identity registry", lambda data: PublicKeyRegistry.from_json(data.decode("utf-8")))


def merge_registry(path: str | Path, keys: dict[str, bytes]) -> list[str]:
    """Add (or, for a name already there, replace) identity public keys in the registry file at ``path``,
    keeping every other institution's entry; written atomically, 0644. Returns the names now registered."""
    registry = read_registry(path)
    for name, raw in keys.items():
        registry.add(name, raw)
    write_public_file(path, (registry.to_json() + "\n").encode())
    return registry.names()


# -- loading and checking (used before any process starts, so a bad file fails with a clear message) ---------
def load_identity_private(path: str | Path) -> ed25519.Ed25519PrivateKey:
    path = Path(path)
    if not path.is_file():
        raise PkiError(f"identity key {path} not found; create it with `fedse keys init` or fix identity_key")
    key = _parse(path, "identity key", _pem_private_key)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PkiError(f"{path}: expected an Ed25519 private key (PKCS8 PEM), got {type(key).__name__}")
    return key


def _is_private_pem(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return b"PRIVATE KEY-----" in fh.read(100)
    except OSError:
        return False  # _parse names what is wrong with the file


def load_identity_public(path: str | Path) -> ed25519.Ed25519PublicKey:
    path = Path(path)
    if not path.is_file():
        raise PkiError(f"identity public key {path} not found; copy the institution's identity_ed25519.pub there")
    if _is_private_pem(path):
        pub = path.with_suffix(".pub")
        hint = str(pub) if pub.is_file() else "the .pub file `fedse keys init` wrote beside it"
        raise PkiError(f"{path} is a private key, not a public one; pass its public key instead: {hint}")
    key = _parse(path, "identity public key", serialization.load_pem_public_key)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PkiError(f"{path}: expected an Ed25519 public key (PEM), got {type(key).__name__}")
    return key


def raw_public_bytes(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_node_auth_public(path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise PkiError(f"node-auth public key {path} not found; copy the institution's node_auth.pub there")
    key = _parse(path, "node-auth public key", serialization.load_ssh_public_key)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(f"{path}: Flower node authentication needs a NIST EC key (P-384), got {type(key).__name__}")


def check_node_auth_private(path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise PkiError(f"node-auth key {path} not found; create it with `fedse keys init` or fix node_auth_key")
    key = _parse(path, "node-auth key (an unencrypted OpenSSH private key)",
                 lambda b: serialization.load_ssh_private_key(b, password=None))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: Flower node authentication needs a NIST EC key (P-384), got {type(key).__name__}")


def check_server_cert(ca_path: str | Path, cert_path: str | Path, key_path: str | Path, host: str) -> None:
    """Fail early, with a fix, if the certificate is not signed by the CA or does not name ``host``."""
    for p, what in ((ca_path, "CA certificate"), (cert_path, "certificate"), (key_path, "private key")):
        if not Path(p).is_file():
            raise PkiError(f"{what} {p} not found; run `fedse certs init` or fix the path in the config")
    ca = _parse(ca_path, "CA certificate", x509.load_pem_x509_certificate)
    cert = _parse(cert_path, "certificate", x509.load_pem_x509_certificate)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as err:  # InvalidSignature has no common base worth naming
        raise PkiError(f"{cert_path} is not signed by {ca_path} ({type(err).__name__}); reissue it with that CA")
    if cert.not_valid_after_utc < _now():
        raise PkiError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; reissue it")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError(f"{cert_path} has no subjectAltName; reissue it for {host}") from None
    names = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    if host not in names:
        raise PkiError(f"{cert_path} is not valid for {host} (it names {sorted(names)}); reissue it with --host {host}")
    key = _parse(key_path, "private key", _pem_private_key)
    if not _same_public_key(key, cert):
        raise PkiError(f"{key_path} does not belong to {cert_path}; use the key the certificate was issued for")
