"""A small AgentGym-protocol HTTP server backed by this package's local environments.

It speaks the same API as AgentGym's ``agentenv-*`` servers (see ``agentgym.PROTOCOLS``) under ``/<env name>``,
for testing the HTTP adapter and for serving an institution's private environment to AgentGym tooling::

    python -m fedse_secure.envs.agentgym_server --port 36001 --envs maze wordle

Standard library only (``ThreadingHTTPServer``); one lock per environment instance.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from fedse_secure.envs.agentgym import PROTOCOLS, Protocol


class _Instances:
    def __init__(self, env_name: str):
        self.env_name = env_name
        self.protocol: Protocol = PROTOCOLS.get(env_name, Protocol())
        self.envs: dict[int, object] = {}
        self.observations: dict[int, str] = {}
        self.locks: dict[int, threading.Lock] = {}
        self.lock = threading.Lock()

    def create(self) -> dict:
        from fedse_secure.envs import make_env

        with self.lock:
            idx = len(self.envs)
            self.envs[idx] = make_env(self.env_name)
            self.locks[idx] = threading.Lock()
        return {"id": idx}

    def _get(self, payload: dict):
        idx = payload.get(self.protocol.id_key)
        if idx not in self.envs:
            raise KeyError(f"The id {idx} is not valid.")
        return idx, self.envs[idx]

    def reset(self, payload: dict) -> dict:
        idx, env = self._get(payload)
        with self.locks[idx]:
            obs = env.reset(int(payload[self.protocol.reset_key]))
            self.observations[idx] = obs
        key = self.protocol.observation_keys[0] if self.env_name != "webshop" else "state"
        return {key: obs, "id": idx}

    def step(self, payload: dict) -> dict:
        idx, env = self._get(payload)
        with self.locks[idx]:
            if getattr(env, "done", False):
                raise RuntimeError(f"The task with environment {idx} has finished.")
            r = env.step(f"Action: {payload['action']}")
            self.observations[idx] = r.observation
        key = "state" if self.env_name == "webshop" else "observation"
        return {key: r.observation, "reward": r.reward, "done": r.done}

    def observation(self, query: dict) -> str:
        idx = int(query[self.protocol.id_key][0])
        if idx not in self.observations:
            raise KeyError(f"The id {idx} is not valid.")
        return self.observations[idx]


def make_server(host: str = "127.0.0.1", port: int = 0, envs=("maze", "wordle")) -> ThreadingHTTPServer:
    """A ready-to-serve server (port 0 picks a free port: read ``server.server_address``)."""
    registry = {name: _Instances(name) for name in envs}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _send(self, status: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self):
            url = urlparse(self.path)
            parts = [p for p in url.path.split("/") if p]
            if len(parts) != 2 or parts[0] not in registry:
                return None, None, url
            return registry[parts[0]], parts[1], url

        def do_GET(self):
            instances, op, url = self._route()
            if instances is None:
                return self._send(404, {"error": f"unknown path {url.path}; environments: {sorted(registry)}"})
            try:
                if op == "observation":
                    return self._send(200, instances.observation(parse_qs(url.query)))
                if op == "available_actions":
                    return self._send(200, [])
            except Exception as err:  # AgentGym servers answer errors in the body with status 200
                return self._send(200, {"error": str(err)})
            return self._send(404, {"error": f"unknown operation {op}"})

        def do_POST(self):
            instances, op, url = self._route()
            if instances is None:
                return self._send(404, {"error": f"unknown path {url.path}; environments: {sorted(registry)}"})
            length = int(self.headers.get("Content-Length") or 0)
            try:
                payload = json.loads(self.rfile.read(length) or b"{}")
                if op == "create":
                    return self._send(200, instances.create())
                if op == "reset":
                    return self._send(200, instances.reset(payload))
                if op == "step":
                    return self._send(200, instances.step(payload))
            except Exception as err:
                return self._send(200, {"error": f"{type(err).__name__}: {err}"})
            return self._send(404, {"error": f"unknown operation {op}"})

    return ThreadingHTTPServer((host, port), Handler)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=36001)
    parser.add_argument("--envs", nargs="+", default=["maze", "wordle", "textcraft", "babyai", "webshop"])
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port, args.envs)
    print(f"serving {args.envs} on http://{args.host}:{server.server_address[1]}/<env>", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
