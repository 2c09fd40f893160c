"""The Flower ServerApp: runs :class:`CoordinatorRun` with Flower's ``Grid`` as the stage transport.

The SuperLink starts it in its own process when ``fedse federation run`` submits the run. It learns which
coordinator config to use from the run config (``fedse-config``), and which Flower node id belongs to which
institution from ``state_dir/nodes.json``, written by ``fedse server start`` when it registered each
institution's node-auth public key. A reply is attributed by the authenticated node it came from, never by
the name inside it (a mismatch is rejected).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedse_secure.federation.flower.codec import reply_from_record, request_to_record
from fedse_secure.federation.wire import EVALUATE, FLOWER_MESSAGE_TYPE, StageReply, StageRequest, WireError

POLL_S = 0.5
app = ServerApp()
log = logging.getLogger("fedse.serverapp")


class FlowerTransport:
    def __init__(self, grid: Grid, nodes_file: Path, flwr_home: Path, say, straggler_s: float | None = None):
        self.grid = grid
        #: CoordinatorTimeouts.straggler_s (None: every stage waits out its full timeout for the last reply).
        self.straggler_s = straggler_s
        self.flwr_home = flwr_home
        self.nodes_file = nodes_file
        self.say = say
        # Institutions that stopped answering (no reply at all, not a refusal) -> when. Flower keeps a killed
        # node "online" for up to two heartbeats (60 s), so without this every following round would wait the
        # full training timeout for it; it is asked again once its SuperNode has reconnected, or once a reply
        # to a request it missed arrives late (then it was only slow, and its node will never reconnect).
        self.unresponsive: dict[str, float] = {}
        # Requests whose stage closed before their reply came: message id -> (institution, its node id).
        self._unanswered: dict[str, tuple[str, int]] = {}

    def reachable(self, names: set[str]) -> set[str]:
        return (set(names) & self.online()) - set(self.unresponsive)

    def _node_map(self) -> dict[str, int]:
        if not self.nodes_file.is_file():
            raise RuntimeError(f"{self.nodes_file} is missing; start the coordinator with `fedse server start`")
        return {str(k): int(v) for k, v in json.loads(self.nodes_file.read_text()).items()}

    def online(self) -> set[str]:
        by_id = {v: k for k, v in self._node_map().items()}
        return {by_id[n] for n in self.grid.get_node_ids() if n in by_id}

    def _send_and_receive(self, msgs: list[Message], timeout_s: float, name_of: dict[int, str],
                          straggler_s: float | None = None) -> list[Message]:
        # Grid.send_and_receive polls every 3 s; a round has five stages, so poll faster (loopback-cheap, and
        # a few requests per second are nothing for a SuperLink).
        ids = list(self.grid.push_messages(msgs))
        pending = set(ids)
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        replies: list[Message] = []
        answered = 0
        cut = False
        while pending and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(pending))
            for m in got:
                pending.discard(m.metadata.reply_to_message_id)
                # An error the SuperLink writes for a node (offline, expired) is no sign of peers' progress.
                answered += not m.has_error()
            replies.extend(got)
            if straggler_s is not None and not cut and len(pending) == 1 and answered >= 2:
                # The last one gets at least as long again as its peers needed: under load they slow down too.
                cut = True
                took = time.monotonic() - t0
                deadline = min(deadline, t0 + took + max(straggler_s, took))
            if pending:
                time.sleep(POLL_S)
        if cut and pending:
            late = sorted(name_of.get(m.metadata.dst_node_id, "?") for mid, m in zip(ids, msgs) if mid in pending)
            self.say(f"{late} not answered {time.monotonic() - t0:.0f} s after the stage opened, when every other "
                     "institution had; not waited for further (timeouts.straggler_s)")
        for mid, msg in zip(ids, msgs):
            if mid in pending and msg.metadata.dst_node_id in name_of:
                self._unanswered[mid] = (name_of[msg.metadata.dst_node_id], msg.metadata.dst_node_id)
        return replies

    def answered_late(self) -> set[str]:
        """Institutions whose node has since replied to a request it missed: alive, only slow. The reply
        belongs to a closed stage and is dropped unread; an error the SuperLink writes in a node's place
        (node offline, request expired) proves nothing and ends the wait for that request."""
        if not self._unanswered:
            return set()
        alive = set()
        for m in self.grid.pull_messages(list(self._unanswered)):
            entry = self._unanswered.pop(m.metadata.reply_to_message_id, None)
            if entry is not None and m.metadata.src_node_id == entry[1]:
                alive.add(entry[0])
        return alive

    def reconnected_since(self, name: str, since: float) -> bool:
        from fedse_secure.federation.flower.processes import node_online_since

        node = self._node_map().get(name)
        return node is not None and (node_online_since(self.flwr_home, node) or 0.0) > since

    def send_stage(self, requests: dict[str, StageRequest], timeout_s: float) -> dict[str, StageReply]:
        node_of = self._node_map()
        name_of = {v: k for k, v in node_of.items()}
        msgs = []
        for name, req in requests.items():
            if name not in node_of:
                self.say(f"{name} has no registered node; skipped")
                continue
            msgs.append(Message(request_to_record(req), dst_node_id=node_of[name], message_type=FLOWER_MESSAGE_TYPE))
        out: dict[str, StageReply] = {}
        sent_at = time.time()
        # Only where every institution does the same small step: training and evaluation take as long as each
        # institution's data and environment make them.
        same_work = all(not r.train and r.stage != EVALUATE for r in requests.values())
        for rep in self._send_and_receive(msgs, timeout_s, name_of, self.straggler_s if same_work else None):
            name = name_of.get(rep.metadata.src_node_id)
            if name is None:
                continue
            if rep.has_error():
                self.say(f"{name}: the ClientApp failed: {rep.error.reason}")
                continue
            try:
                out[name] = reply_from_record(rep.content)
            except WireError as err:
                self.say(f"{name}: malformed reply rejected: {err}")
        for name in requests:
            if name in out:
                self.unresponsive.pop(name, None)
            else:
                self.unresponsive.setdefault(name, sent_at)
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedse_secure.federation.deploy_config import load_coordinator_config
    from fedse_secure.federation.flower.coordinator_loop import CoordinatorRun
    from fedse_secure.io_utils import append_jsonl

    cfg_path = context.run_config.get("fedse-config")
    if not cfg_path:
        raise RuntimeError("the run has no fedse-config; submit it with `fedse federation run --config ...`")
    cfg = load_coordinator_config(str(cfg_path))
    resume = bool(context.run_config.get("fedse-resume", False))
    events_file = cfg.state_dir / "events.jsonl"

    def say(text: str) -> None:
        print(f"[fedse coordinator] {text}", flush=True)

    def event(e: dict) -> None:
        append_jsonl(events_file, [e])

    event({"event": "serverapp_started", "time": time.time(), "resume": resume})
    transport = FlowerTransport(grid, cfg.state_dir / "nodes.json", cfg.state_dir / "flwr-home", say,
                                straggler_s=cfg.timeouts.straggler_s)
    CoordinatorRun(cfg, transport, resume=resume, log=say, events=event).run()
