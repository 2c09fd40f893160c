"""The attack machinery the secure-aggregation checks share: a federation of five institutions run through the
real backends, the coordinator's view of a round, and the tools a lying coordinator uses (an honest run up to
a chosen stage, stripping masks with stolen secrets).

Protections are switched off through the backends' seams: a registry that accepts any signature, a share
cipher without its tag check (``MaskingBackend(aead=...)``), a client class without the consistency round
(``MaskingBackend(client_class=...)``), or the ``none`` backend instead of masking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from fedse_threat_model.harness import ProtectionSettings

NAMES = ["inst0", "inst1", "inst2", "inst3", "inst4"]  # full graph, threshold t = 4 (default for n = 5)


class AcceptAnyRegistry:
    """A public-key registry that verifies nothing: what a deployment without signature checks amounts to."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = sorted(names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return list(self._names)

    def verify(self, name: str, signature: bytes, data: bytes, what: str) -> None:
        return None


class UnauthenticatedAESGCM:
    """AES-GCM with the tag check removed: encryption is unchanged, decryption runs GCM's CTR keystream
    (counter block nonce || 2 for a 96-bit nonce) over the ciphertext and ignores the tag and the AD."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._key = key
        self._gcm = AESGCM(key)

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self._gcm.encrypt(nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        dec = Cipher(algorithms.AES(self._key), modes.CTR(nonce + (2).to_bytes(4, "big"))).decryptor()
        return dec.update(data[:-16]) + dec.finalize()


def no_consistency_client_class():
    from fedse_secure.secagg.masking import (
        ConsistencyRequest,
        ConsistencySignature,
        SecAggClient,
        Stage,
        UnmaskRequest,
        UnmaskShares,
    )
    from fedse_secure.secagg.masking.messages import survivors_payload

    class NoConsistencyClient(SecAggClient):
        """SecAgg without the consistency round: signs any survivor list and answers every unmask request
        with the shares it asks for, keeping them for later requests."""

        def handle(self, msg):
            if isinstance(msg, ConsistencyRequest) and self.expecting in (Stage.CONSISTENCY, Stage.UNMASK, "done"):
                self.survivors = sorted(msg.survivors)
                self.expecting = Stage.UNMASK
                sig = self.identity.sign(survivors_payload(self.digest, self.round_id, self.survivors))
                return ConsistencySignature(round_id=self.round_id, sender=self.name, signature=sig)
            if isinstance(msg, UnmaskRequest) and self.expecting in (Stage.UNMASK, "done"):
                alive = set(msg.survivors)
                self.expecting = "done"
                return UnmaskShares(
                    round_id=self.round_id, sender=self.name,
                    seed_shares={p: self._seed_shares[p] for p in sorted(self.shared_with) if p in alive},
                    key_shares={p: self._key_shares[p] for p in sorted(self.shared_with) if p not in alive},
                )
            return super().handle(msg)

    return NoConsistencyClient


def masking_backend(settings: ProtectionSettings, *, aead: bool = False, consistency: bool = False):
    """The masking backend with the protections this check exercises switched per ``settings``: ``aead`` and
    ``consistency`` name the seams the check puts under test (the others stay as shipped)."""
    from fedse_secure.secagg.backends.masking import MaskingBackend

    return MaskingBackend(
        aead=UnauthenticatedAESGCM if aead and not settings.on("aead") else None,
        client_class=no_consistency_client_class() if consistency and not settings.on("consistency") else None,
    )


class Federation:
    """NAMES with fixed long-term identities (reused across rounds, as in a deployment), a backend, and the
    registry every party verifies against (one that accepts anything when ``signatures`` is off)."""

    def __init__(self, settings: ProtectionSettings, backend, seed: int) -> None:
        from fedse_secure.secagg.masking import IdentityKey, PublicKeyRegistry
        from fedse_secure.secagg.masking.prg import RandomSource

        self.backend, self.seed = backend, seed
        root = RandomSource.seeded(seed, "threat-check")
        self.identities = {p: IdentityKey.generate(root.child("id/" + p)) for p in NAMES}
        self.registry = (PublicKeyRegistry.from_identities(self.identities) if settings.on("signatures")
                         else AcceptAnyRegistry(NAMES))

    def aggregate(self, round_id: int, contributions: Mapping[str, np.ndarray], interceptor=None):
        from fedse_secure.secagg.driver import aggregate

        return aggregate(self.backend, round_id, contributions, identities=self.identities, registry=self.registry,
                         interceptor=interceptor, seed=self.seed)

    def machines(self, round_id: int, size: int, inputs: Mapping[str, np.ndarray]):
        """The server machine and every client machine of one round, inputs set, nothing exchanged yet."""
        server = self.backend.server(round_id, NAMES, size, self.registry, seed=self.seed)
        clients = {p: self.backend.client(p, self.identities[p], self.registry, seed=self.seed) for p in NAMES}
        for p in NAMES:
            clients[p].set_input(inputs[p])
        return server, clients


def on_messages(fn: Callable[[str, str, str, Any], Any]):
    """A driver interceptor (bytes) around ``fn(stage, direction, name, message)`` on decoded masking messages;
    ``fn`` returns a replacement message or None."""
    from fedse_secure.secagg.masking import decode

    def intercept(stage: str, direction: str, name: str, data: bytes) -> bytes | None:
        replaced = fn(stage, direction, name, decode(data))
        return None if replaced is None else replaced.to_bytes()

    return intercept


def coordinator_view(settings: ProtectionSettings, contributions: Mapping[str, np.ndarray], seed: int,
                     round_id: int = 1):
    """Run one aggregation round and return (result, per-institution vectors the coordinator received, counts).

    With masking, the coordinator receives every protocol message; the only per-institution vector among them
    is the masked input, so that is what an attacker can start from. With ``masking`` off, the coordinator
    receives the updates themselves.
    """
    from fedse_secure.secagg.backends.plaintext import PlaintextBackend
    from fedse_secure.secagg.single_stage import unframe
    from fedse_secure.secagg.masking import MaskedInput, Stage, decode
    from fedse_secure.secagg.masking.quantize import dequantise

    received: dict[str, np.ndarray] = {}
    counts = {"messages_seen": 0}
    n = next(iter(contributions.values())).size
    if not settings.on("masking"):
        def grab_plain(stage, direction, name, data):
            if direction == "to_server":
                counts["messages_seen"] += 1
                header, body = unframe(data, name)
                received[name] = np.frombuffer(body, dtype=header["dtype"]).astype(np.float64)
            return None

        result = Federation(settings, PlaintextBackend(), seed).aggregate(round_id, contributions, grab_plain)
        return result, received, counts

    def grab(stage, direction, name, data):
        if direction == "to_server":
            counts["messages_seen"] += 1
            if stage == Stage.MASKED_INPUT:
                msg = decode(data)
                if isinstance(msg, MaskedInput):
                    received[name] = msg.vector.copy()
        return None

    backend = masking_backend(settings)
    result = Federation(settings, backend, seed).aggregate(round_id, dict(contributions), grab)
    bits = backend.settings.fractional_bits
    # The masked vector ends with the masked count of clipped values; the update is the first n elements.
    return result, {p: dequantise(y, bits)[:n] for p, y in received.items()}, counts


def round_to_consistency(settings: ProtectionSettings, size: int, seed: int, consistency: bool = False):
    """An honest run of the first three stages; returns what the coordinator and every client hold:
    (settings, server machine, client machines, updates, masked inputs)."""
    from fedse_secure.secagg.driver import InProcessParties, drive_until
    from fedse_secure.secagg.masking import Stage, decode

    from fedse_threat_model.harness import updates

    backend = masking_backend(settings, consistency=consistency)
    fed = Federation(settings, backend, seed)
    xs = updates(NAMES, size, seed)
    server, clients = fed.machines(1, size, xs)
    masked = {}

    def keep_masked(stage, direction, name, data):
        if stage == Stage.MASKED_INPUT and direction == "to_server":
            masked[name] = decode(data).vector.copy()
        return None

    drive_until(server, InProcessParties(clients, stages=backend.stages, interceptor=keep_masked), Stage.CONSISTENCY)
    return backend.settings, server.machine, {p: c.machine for p, c in clients.items()}, xs, masked


def strip_pair_masks(y: np.ndarray, owner: str, owner_mask_key, server, peers: Iterable[str]) -> np.ndarray:
    """Remove ``owner``'s pairwise masks with ``peers`` from its masked vector, given its mask private key."""
    from fedse_secure.secagg.masking import keys
    from fedse_secure.secagg.masking.prg import MaskApplier, MaskStream

    y = y.copy()
    streams = []
    for v in sorted(peers):
        k = keys.pair_mask_key(owner_mask_key, server.adverts[v].mask_public_key, server.digest, owner, v)
        streams.append(MaskStream(k, y.dtype, -1 if owner < v else +1))
    MaskApplier(y.dtype).apply(y, streams)
    return y


def strip_self_mask(y: np.ndarray, seed: bytes, digest: bytes) -> np.ndarray:
    from fedse_secure.secagg.masking import keys
    from fedse_secure.secagg.masking.prg import MaskApplier, MaskStream

    y = y.copy()
    MaskApplier(y.dtype).apply(y, [MaskStream(keys.self_mask_key(seed, digest), y.dtype, -1)])
    return y
