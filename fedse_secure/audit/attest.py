"""Signed statements: what an institution attests about each round (its ledger head, the payload it
contributed) and what the coordinator attests about each global adapter, both with Ed25519 identities.

A statement is a JSON object; its signature is over the canonical JSON (sorted keys, no spaces), prefixed
with a domain label so a signature made for one purpose is never valid for another.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedse_secure.audit.chain import canonical
from fedse_secure.errors import FedseError

ROUND_ATTESTATION = "fedse/round-attestation/v1"
ADAPTER_SIGNATURE = "fedse/global-adapter/v1"


class SignatureError(FedseError, ValueError):
    """A signed statement is missing, malformed, or its signature does not verify; the message says which."""


def _message(domain: str, statement: dict[str, Any]) -> bytes:
    return domain.encode() + b"\n" + canonical(statement)


def sign(identity, domain: str, statement: dict[str, Any]) -> dict[str, Any]:
    """``{"statement", "signature", "public_key"}`` (hex), signed with ``identity`` (an ``IdentityKey``)."""
    return {"statement": statement, "signature": identity.sign(_message(domain, statement)).hex(),
            "public_key": identity.public_bytes().hex()}


def verify(signed: Any, domain: str, public_key: bytes | None = None, what: str = "statement") -> dict[str, Any]:
    """The statement if the signature verifies (against ``public_key`` when given, else the embedded key);
    ``SignatureError`` naming the problem otherwise."""
    if not isinstance(signed, dict) or not {"statement", "signature", "public_key"} <= set(signed):
        raise SignatureError(f"{what}: not a signed statement (statement, signature, public_key)")
    statement = signed["statement"]
    if not isinstance(statement, dict):
        raise SignatureError(f"{what}: the statement is not a JSON object")
    try:
        embedded = bytes.fromhex(signed["public_key"])
        signature = bytes.fromhex(signed["signature"])
    except (TypeError, ValueError):
        raise SignatureError(f"{what}: the signature or public key is not hex") from None
    if public_key is not None and embedded != public_key:
        raise SignatureError(f"{what}: signed by key {embedded.hex()[:16]}..., not by the pinned key "
                             f"{public_key.hex()[:16]}...")
    try:
        Ed25519PublicKey.from_public_bytes(embedded).verify(signature, _message(domain, statement))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{what}: the signature does not verify (the statement or what it covers was "
                             "altered, or it was signed by another key)") from None
    return statement


def adapter_digest(state) -> str:
    """SHA-256 over an adapter state's tensors in order (name, dtype, shape, bytes): independent of file format."""
    import numpy as np

    digest = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(np.ascontiguousarray(t.numpy()).tobytes())
    return digest.hexdigest()


SIGNATURE_FILE = "signature.json"


class AdapterSigner:
    """The coordinator's signature over each global adapter it sends and publishes: the adapter's digest, the
    round whose result it is (0 = the initial adapter), the run key and the experiment hash."""

    def __init__(self, identity, experiment_json: str) -> None:
        from fedse_secure.federation.wire import run_key

        self.identity = identity
        self.run_key = run_key(experiment_json)
        self.experiment_hash = hashlib.sha256(experiment_json.encode()).hexdigest()

    def sign(self, round_id: int, state) -> dict[str, Any]:
        return sign(self.identity, ADAPTER_SIGNATURE, {
            "kind": "global-adapter", "round": int(round_id), "run_key": self.run_key,
            "experiment_hash": self.experiment_hash, "digest": adapter_digest(state),
        })

    def write(self, folder, round_id: int, state) -> None:
        """Put ``signature.json`` next to a saved adapter (``fedse adapter verify`` checks it)."""
        import json
        from pathlib import Path

        from fedse_secure.io_utils import atomic_write_text

        atomic_write_text(Path(folder) / SIGNATURE_FILE, json.dumps(self.sign(round_id, state), indent=2) + "\n")


def verify_adapter(signed: Any, state, *, public_key: bytes | None, round_id: int | None = None,
                   run_key: str | None = None, experiment_hash: str | None = None) -> dict[str, Any]:
    """The statement, if ``signed`` is the coordinator's valid signature over exactly ``state`` (and, where given,
    for that round, run and experiment); ``SignatureError`` naming the mismatch otherwise."""
    statement = verify(signed, ADAPTER_SIGNATURE, public_key, what="global adapter signature")
    if statement.get("kind") != "global-adapter":
        raise SignatureError("global adapter signature: the statement is not about a global adapter")
    digest = adapter_digest(state)
    if statement.get("digest") != digest:
        raise SignatureError(f"global adapter signature: the adapter's digest {digest[:16]}... differs from the signed "
                             f"{str(statement.get('digest'))[:16]}...: the adapter was altered after it was signed")
    for name, want in (("round", round_id), ("run_key", run_key), ("experiment_hash", experiment_hash)):
        if want is not None and statement.get(name) != want:
            raise SignatureError(f"global adapter signature: signed for {name} {statement.get(name)!r}, expected "
                                 f"{want!r} (an adapter of another round or run was replayed)")
    return statement
