"""The Flower ClientApp: a relay from the SuperNode to this institution's worker (see :mod:`.worker`).

It runs in a short-lived process per message (Flower 1.42), so it keeps no state and imports nothing heavy.
The SuperNode tells it where the worker is through its node config (set by ``fedse node start``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedse_secure.federation.flower.codec import reply_to_record, request_from_record
from fedse_secure.federation.flower.worker import call_worker
from fedse_secure.federation.wire import StageReply, WireError

SOCKET_KEY = "fedse-worker-socket"
AUTHKEY_KEY = "fedse-worker-authkey-file"
NAME_KEY = "fedse-institution"

app = ClientApp()
log = logging.getLogger("fedse.clientapp")


@app.query("fedse")
def relay(msg: Message, context: Context) -> Message:
    cfg = context.node_config
    name = str(cfg.get(NAME_KEY, "?"))
    try:
        socket_path, key_file = str(cfg[SOCKET_KEY]), Path(str(cfg[AUTHKEY_KEY]))
    except KeyError as err:
        raise RuntimeError(
            f"this SuperNode has no {err} in its node config; start it with `fedse node start`, which runs the "
            "institution worker and passes its address"
        ) from None
    try:
        req = request_from_record(msg.content)
    except WireError as err:
        reply = StageReply("?", -1, name, error=f"WireError: {err}")
    else:
        reply = call_worker(socket_path, key_file.read_bytes(), req)
    return Message(reply_to_record(reply), reply_to=msg)
