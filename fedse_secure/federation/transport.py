"""How the round driver reaches institutions: one request per institution per stage, the replies that arrive.

:class:`InProcessTransport` serves ``fedse simulate``: every institution's :class:`InstitutionEndpoint` lives in
this process, and every request and reply is round-tripped through the wire frames on the way, exactly as on
a network. The Flower transport (``federation/flower/server_app.py``) implements the same protocol over
``Grid.push_messages``/``pull_messages``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from fedse_secure.errors import FedseError
from fedse_secure.federation.endpoint import InstitutionEndpoint
from fedse_secure.federation.wire import StageReply, StageRequest, WireError, decode_reply, decode_request, encode


class StageTransport(Protocol):
    def online(self) -> set[str]:
        """Institutions currently connected."""

    def send_stage(self, requests: dict[str, StageRequest], timeout_s: float) -> dict[str, StageReply]:
        """Deliver each request to its institution; return the replies received within ``timeout_s``."""

    def reachable(self, names: set[str]) -> set[str]:
        """Of ``names``, those worth asking now (not known to have stopped answering)."""


class InProcessTransport:
    """Every institution in this process. ``dropouts`` maps an institution to the secure-aggregation stage from
    which it stops answering (``stages`` gives their order); evaluation requests always reach everyone."""

    def __init__(self, endpoints: Mapping[str, InstitutionEndpoint], stages: Sequence[str] = (),
                 dropouts: Mapping[str, str] | None = None) -> None:
        self.endpoints = dict(endpoints)
        self.order = {s: i for i, s in enumerate(stages)}
        self.dropouts = dict(dropouts or {})
        unknown = {s for s in self.dropouts.values() if s not in self.order}
        if unknown:
            raise FedseError(f"dropout stage(s) {sorted(unknown)} are not among {list(stages)}")

    def online(self) -> set[str]:
        return set(self.endpoints)

    def reachable(self, names: set[str]) -> set[str]:
        return set(names) & set(self.endpoints)

    def _silent(self, name: str, stage: str) -> bool:
        return stage in self.order and name in self.dropouts and self.order[stage] >= self.order[self.dropouts[name]]

    def send_stage(self, requests: dict[str, StageRequest], timeout_s: float) -> dict[str, StageReply]:
        replies = {}
        for name, req in requests.items():
            if name not in self.endpoints or self._silent(name, req.stage):
                continue
            reply = self.endpoints[name].handle(decode_request(encode(req)))
            try:
                replies[name] = decode_reply(encode(reply))
            except WireError:
                continue  # a reply that does not decode is no reply: that institution drops out of the stage
        return replies
