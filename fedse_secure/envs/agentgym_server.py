"""An AgentGym-protocol HTTP server backed by this package's local environments (``fedse envs serve``).

Each environment is served under ``/<env>`` with the routes, request fields and response shapes of AgentGym's own
server for it (``agentenv-lmrlgym`` for maze and wordle, ``agentenv-babyai``, ``agentenv-textcraft``,
``agentenv-webshop``), so AgentGym's clients work against it given ``env_server_base=http://host:port/<env>``:

=========  =========================================================================================================
maze       POST create -> {"id"}; POST reset {"id","game"} -> {"observation"}; POST step {"id","action"} ->
           {"observation","reward","done"}; GET observation?id= -> str; GET available_actions -> [str]
wordle     as maze, with POST reset {"id","seed"} -> {"id","observation"} and GET filtered_vocab?id= -> [str]
babyai     POST create -> {"id"}; POST reset {"id","data_idx"} -> {"observation","reward","score","deleted","done"};
           POST step -> {"observation","reward","score","done"}; GET observation?id= -> {...}; POST close {"id"}
textcraft  POST create {"commands"?, "goal"?} -> {"id","observation","done","reward"}; POST reset {"id","data_idx"}
           -> {"id","observation","done","reward"}; POST step -> {"observation","reward","done"};
           GET observation?id= -> str; POST close {"id"}
webshop    POST create -> int; POST reset {"env_idx","session_id"} -> [str, null]; POST step {"env_idx","action"} ->
           {"state","reward","done","info"}; GET observation|instruction_text?env_idx= -> str;
           GET available_actions?env_idx= -> {"has_search_bar","clickables"}; POST close {"env_idx"}
=========  =========================================================================================================

As AgentGym's servers do, a failure is answered with status 200 and ``{"error": message}`` (an unknown id, a
finished episode, a bad task index), and a request body missing a required field with 422. The observations are
the server's: the rules AgentGym's Maze and Wordle clients add themselves are not in them. Actions arrive already
cut from the model's reply by the client and are applied with AgentGym's parsing. Standard library only
(``ThreadingHTTPServer``); one lock per environment instance.
"""

from __future__ import annotations

import argparse
import json
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from fedse_secure.envs.agentgym import PROTOCOLS, Protocol
from fedse_secure.envs.base import TextEnv

WORDLE_START = "Let's start Wordle!"


class RequestError(Exception):
    """A request whose body does not fit the route (answered 422, as FastAPI does)."""


class _Instance:
    def __init__(self, env: TextEnv):
        self.env = env
        self.lock = threading.Lock()
        self.observation = ""
        self.reward = 0.0
        self.score = 0.0
        self.done = False
        self.reset_once = False


class EnvService:
    """One environment's AgentGym routes over a set of local instances."""

    def __init__(self, env_name: str):
        self.env_name = env_name
        self.protocol: Protocol = PROTOCOLS.get(env_name, Protocol())
        self.instances: dict[int, _Instance] = {}
        self.next_id = 0
        self.lock = threading.Lock()

    # -- helpers ----------------------------------------------------------------------------------------------

    def _new_env(self) -> TextEnv:
        from fedse_secure.envs import make_env

        env = make_env(self.env_name, parsing="agentgym")
        # The server's observations are bare: AgentGym's clients add their own rules to the first one.
        env.prompt = replace(env.prompt, preamble="")
        return env

    def _field(self, body: Any, key: str, kind: type, optional: bool = False) -> Any:
        if not isinstance(body, dict) or (key not in body and not optional):
            raise RequestError(f"field required: {key}")
        value = body.get(key)
        if value is None and optional:
            return None
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise RequestError(f"{key} must be {kind.__name__}, got {value!r}")
        return value

    def _instance(self, idx: Any, *, finished_ok: bool = False) -> _Instance:
        inst = self.instances.get(idx)
        if inst is None:
            raise KeyError(f"The id {idx} is not valid.")
        if not finished_ok and inst.done:
            raise KeyError(f"The task with environment {idx} has finished.")
        return inst

    # -- routes -----------------------------------------------------------------------------------------------

    def create(self, body: Any) -> Any:
        if self.protocol.create_json:
            self._field(body, "commands", str, optional=True)
            self._field(body, "goal", str, optional=True)
        with self.lock:
            idx = self.next_id
            self.next_id += 1
            self.instances[idx] = inst = _Instance(self._new_env())
        if self.env_name == "webshop":
            return idx
        if self.env_name == "textcraft":  # AgentGym's TextCraft server starts each new env on task = its id
            with inst.lock:
                self._reset(inst, idx % len(_all_task_ids(inst.env)))
            return {"id": idx, "observation": inst.observation, "done": False, "reward": 0}
        return {"id": idx}

    def _reset(self, inst: _Instance, task: int) -> None:
        inst.observation = inst.env.reset(task)
        inst.reward = inst.score = 0.0
        inst.done, inst.reset_once = False, True

    def reset(self, body: Any) -> Any:
        idx = self._field(body, self.protocol.id_key, int)
        task = self._field(body, self.protocol.reset_key, int, optional=self.env_name in ("textcraft", "webshop"))
        task = 0 if task is None else task
        inst = self._instance(idx, finished_ok=True)
        if not 0 <= task < len(_all_task_ids(inst.env)):
            raise KeyError(f"The {self.protocol.reset_key} {task} is not valid.")
        with inst.lock:
            self._reset(inst, task)
        if self.env_name == "webshop":
            return [inst.observation, None]
        if self.env_name == "wordle":
            inst.observation = WORDLE_START
            return {"id": idx, "observation": WORDLE_START}
        if self.env_name == "babyai":
            return {"observation": inst.observation, "reward": 0, "score": 0, "deleted": False, "done": False}
        if self.env_name == "textcraft":
            return {"id": idx, "observation": inst.observation, "done": False, "reward": 0}
        return {"observation": inst.observation}

    def step(self, body: Any) -> Any:
        idx = self._field(body, self.protocol.id_key, int)
        action = self._field(body, "action", str)
        # TextCraft's and WebShop's servers keep stepping a finished episode; the others refuse.
        inst = self._instance(idx, finished_ok=self.env_name in ("textcraft", "webshop"))
        if not inst.reset_once:
            raise KeyError(f"The environment {idx} has not been reset.")
        with inst.lock:
            # The client already cut the action from the reply; the marker lets the local parser find it again.
            result = inst.env.step(f"Action: {action}")
            inst.observation, inst.reward = result.observation, result.reward
            inst.score += result.reward
            inst.done = result.done
        if self.env_name == "webshop":
            return {"state": result.observation, "reward": result.reward, "done": result.done, "info": None}
        if self.env_name == "babyai":
            return {"observation": result.observation, "reward": result.reward, "score": inst.score,
                    "done": result.done}
        return {"observation": result.observation, "reward": result.reward, "done": result.done}

    def observation(self, query: dict) -> Any:
        inst = self._instance(_query_id(query, self.protocol.id_key), finished_ok=True)
        if self.env_name == "babyai":
            return {"observation": inst.observation, "reward": inst.reward, "score": inst.score, "done": inst.done,
                    "deleted": False}
        return inst.observation

    def available_actions(self, query: dict) -> Any:
        if self.env_name == "webshop":
            inst = self._instance(_query_id(query, self.protocol.id_key), finished_ok=True)
            env = inst.env
            return {"has_search_bar": getattr(env, "page", "") == "search", "clickables": list(env.clickables())}
        if self.env_name == "maze":
            from fedse_secure.envs.maze import ACTIONS

            return list(ACTIONS)
        raise LookupError("available_actions")

    def filtered_vocab(self, query: dict) -> Any:
        if self.env_name != "wordle":
            raise LookupError("filtered_vocab")
        inst = self._instance(_query_id(query, self.protocol.id_key), finished_ok=True)
        return list(inst.env.vocab.hidden)

    def instruction_text(self, query: dict) -> Any:
        if self.env_name != "webshop":
            raise LookupError("instruction_text")
        inst = self._instance(_query_id(query, self.protocol.id_key), finished_ok=True)
        return "Instruction: " + inst.env.goal.instruction if inst.env.goal is not None else ""

    def close(self, body: Any) -> Any:
        idx = self._field(body, self.protocol.id_key, int)
        with self.lock:
            return self.instances.pop(idx, None) is not None


def _all_task_ids(env: TextEnv) -> range:
    ids = list(env.test_task_ids()) + list(env.train_task_ids())
    return range(max(ids) + 1)


def _query_id(query: dict, key: str) -> int:
    try:
        return int(query[key][0])
    except (KeyError, IndexError, ValueError):
        raise RequestError(f"query parameter required: {key}") from None


_GET_ROUTES = ("observation", "available_actions", "filtered_vocab", "instruction_text")
_POST_ROUTES = ("create", "reset", "step", "close")


def make_server(host: str = "127.0.0.1", port: int = 0, envs=("maze", "wordle")) -> ThreadingHTTPServer:
    """A ready-to-serve server (port 0 picks a free port: read ``server.server_address``)."""
    services = {name: EnvService(name) for name in envs}

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

        def _route(self, allowed):
            url = urlparse(self.path)
            parts = [p for p in url.path.split("/") if p]
            if not parts:
                return None, None, url
            if len(parts) == 1:  # GET /<env> says hello, as AgentGym's servers do on "/"
                return services.get(parts[0]), "", url
            if len(parts) != 2 or parts[0] not in services or parts[1] not in allowed:
                return None, None, url
            return services[parts[0]], parts[1], url

        def _handle(self, call):
            try:
                return self._send(200, call())
            except RequestError as err:
                return self._send(422, {"detail": str(err)})
            except LookupError as err:
                if isinstance(err, KeyError):
                    return self._send(200, {"error": err.args[0] if err.args else str(err)})
                return self._send(404, {"detail": "Not Found"})
            except Exception as err:  # AgentGym's servers answer failures in the body with status 200
                return self._send(200, {"error": f"{type(err).__name__}: {err}"})

        def do_GET(self):
            service, op, url = self._route(_GET_ROUTES)
            if service is None:
                return self._send(404, {"detail": "Not Found", "environments": sorted(services)})
            if op == "":
                return self._send(200, f"This is environment {service.env_name}.")
            query = parse_qs(url.query)
            return self._handle(lambda: getattr(service, op)(query))

        def do_POST(self):
            service, op, _ = self._route(_POST_ROUTES)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if service is None or op == "":
                return self._send(404, {"detail": "Not Found", "environments": sorted(services)})
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                return self._send(422, {"detail": "body is not JSON"})
            return self._handle(lambda: getattr(service, op)(body))

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
