"""AgentGym's HTTP protocol, both directions, for all five environments.

The protocol below is written from AgentGym's code (WooooDyy/AgentGym): its clients in
``agentenv/agentenv/envs/{lmrlgym,babyai,textcraft,webshop}.py`` (what they send and which response fields they
read) and its servers in ``agentenv-{lmrlgym,babyai,textcraft,webshop}/*/server.py`` with their request models
(``model.py``) and environment wrappers (what they answer). Two suites check it:

- ``AgentGymClient`` replays each client's calls against ``fedse envs serve`` (our server must work with AgentGym's
  clients);
- ``MockAgentGymServer`` answers like each AgentGym server, refusing what it refuses (a missing field is a 422, as
  FastAPI answers), and our HTTP adapter must play whole episodes against it with the requests AgentGym's client
  would make.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedse_secure.envs import make_env, make_oracle
from fedse_secure.envs.agentgym import AgentGymHTTPEnv
from fedse_secure.envs.agentgym_server import make_server
from fedse_secure.envs.base import react

ENVS = ["maze", "wordle", "babyai", "textcraft", "webshop"]


def _http(method: str, url: str, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read().decode())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode() or "null")


# -- direction 1: AgentGym's clients against `fedse envs serve` ------------------------------------------------


class AgentGymClient:
    """The HTTP calls of AgentGym's client for one environment, and the response fields it reads (a KeyError or a
    wrong type here is what would break AgentGym's own client)."""

    def __init__(self, base: str, env: str):
        self.base, self.env = base, env
        if env == "textcraft":  # TextCraftEnvClient posts its directory info as the create body
            status, created = _http("POST", f"{base}/create",
                                    {"minecraft_dir": "agentenv_textcraft/", "commands": None, "goal": None})
        else:
            status, created = _http("POST", f"{base}/create")
        assert status == 200
        if env == "webshop":  # WebshopEnvClient: self.env_id = ok.json()
            assert isinstance(created, int)
            self.id, self.key = created, "env_idx"
        else:
            assert isinstance(created["id"], int)
            self.id, self.key = created["id"], "id"
        if env == "textcraft":
            assert isinstance(created["observation"], str)
        if env == "wordle":  # WordleEnvClient.__init__: vocab = self._get("filtered_vocab")
            vocab = self._get("filtered_vocab")
            assert isinstance(vocab, list) and all(isinstance(w, str) for w in vocab)
            self.vocab = vocab

    def _post(self, path: str, data: dict):
        status, answer = _http("POST", f"{self.base}/{path}", {**data, self.key: self.id})
        assert status == 200, answer
        return answer

    def _get(self, path: str):
        status, answer = _http("GET", f"{self.base}/{path}?{self.key}={self.id}")
        assert status == 200, answer
        return answer

    def reset(self, idx: int) -> str:
        if self.env == "maze":
            return self._post("reset", {"game": idx})["observation"]
        if self.env == "wordle":
            self._post("reset", {"seed": idx})
            return "\n".join(self.vocab)  # the client's first observation is its rules with this list
        if self.env == "babyai":
            r = self._post("reset", {"data_idx": idx})
            assert {"observation", "reward", "score", "done"} <= set(r) and isinstance(r["observation"], str)
            return r["observation"]
        if self.env == "textcraft":
            return self._post("reset", {"data_idx": idx})["observation"]
        response = self._post("reset", {"session_id": idx})
        assert isinstance(response, list)  # WebshopEnvClient.reset: response[0] = self.observe()
        observation = self._get("observation")
        assert isinstance(observation, str)
        return observation

    def step(self, action: str) -> tuple[str, float, bool]:
        r = self._post("step", {"action": action})
        if self.env == "webshop":
            return r["state"], float(r["reward"]), bool(r["done"])
        if self.env == "babyai":  # BabyAIEnvClient.step reports the score as the reward
            return r["observation"], float(r["score"]), bool(r["done"])
        return r["observation"], float(r["reward"]), bool(r["done"])

    def close(self) -> None:
        if self.env in ("babyai", "textcraft", "webshop"):
            self._post("close", {})


@pytest.fixture(scope="module")
def fedse_server():
    server = make_server(envs=ENVS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _client_action(env: str, reply: str) -> str:
    """The action AgentGym's client cuts from a reply before it posts /step."""
    from fedse_secure.envs.agentgym import PARSERS, PROTOCOLS

    return PARSERS[PROTOCOLS[env].parser](reply)


@pytest.mark.parametrize("env_name", ENVS)
def test_agentgym_clients_work_against_fedse_serve(fedse_server, env_name):
    client = AgentGymClient(f"{fedse_server}/{env_name}", env_name)
    local, oracle = make_env(env_name), make_oracle(env_name)
    bare = replace(local.prompt, preamble="")  # the server's observations carry no client-side rules
    task = list(local.test_task_ids())[1]
    first_local = local.reset(task)
    first_remote = client.reset(task)
    if env_name == "wordle":
        assert first_remote in first_local  # the 40-word list the client inlines
    else:
        assert bare.first_observation(first_remote) == first_local.removeprefix(local.prompt.preamble + "\n")
    oracle.reset(local, task)
    observation, reward, done = first_local, 0.0, False
    for _ in range(local.max_turns):
        reply = oracle.act(local, observation)
        result = local.step(reply)
        remote = client.step(_client_action(env_name, reply))
        assert remote[0] == result.observation and remote[2] == result.done
        observation, reward, done = result.observation, remote[1], remote[2]
        if done:
            break
    assert done and reward > 0
    if env_name in ("maze", "wordle", "babyai"):  # these servers refuse a finished task
        status, answer = _http("POST", f"{fedse_server}/{env_name}/step", {"id": client.id, "action": "x"})
        assert status == 200 and "has finished" in answer["error"]
    client.close()


def test_fedse_serve_answers_like_agentgym_servers(fedse_server):
    # Maze's and WebShop's available actions; a missing field is FastAPI's 422; unknown ids are an error body.
    assert _http("GET", f"{fedse_server}/maze/available_actions") == (
        200, ["move up", "move down", "move left", "move right"])
    status, env_idx = _http("POST", f"{fedse_server}/webshop/create")
    _http("POST", f"{fedse_server}/webshop/reset", {"env_idx": env_idx, "session_id": 0})
    status, listed = _http("GET", f"{fedse_server}/webshop/available_actions?env_idx={env_idx}")
    assert status == 200 and listed == {"has_search_bar": True, "clickables": []}
    assert _http("POST", f"{fedse_server}/maze/reset", {"id": 0})[0] == 422
    assert _http("POST", f"{fedse_server}/babyai/step", {"id": "zero", "action": "x"})[0] == 422
    status, answer = _http("POST", f"{fedse_server}/babyai/step", {"id": 10_000, "action": "turn left"})
    assert status == 200 and "not valid" in answer["error"]
    status, answer = _http("POST", f"{fedse_server}/maze/create")
    assert "not valid" in _http("POST", f"{fedse_server}/maze/reset", {"id": answer["id"], "game": 10**6})[1]["error"]
    assert _http("POST", f"{fedse_server}/maze/nope", {})[0] == 404
    assert _http("GET", f"{fedse_server}/babyai") == (200, "This is environment babyai.")


# -- direction 2: the adapter against servers that answer like AgentGym's ------------------------------------


class MockAgentGymServer:
    """Answers like AgentGym's server for one environment: its routes, required body fields (422 when one is
    missing or mistyped, as FastAPI answers), response shapes and error bodies. The game behind it is the local
    environment; every request is logged as (method, route, sorted body keys)."""

    def __init__(self, env_name: str):
        self.env_name = env_name
        self.log: list[tuple[str, str, tuple[str, ...]]] = []
        self.envs: dict[int, object] = {}
        self.ids = 0
        key = "env_idx" if env_name == "webshop" else "id"
        reset_key = {"maze": "game", "wordle": "seed", "webshop": "session_id"}.get(env_name, "data_idx")
        # route -> required body fields (from each server's pydantic request models)
        self.post_fields = {"create": {}, "reset": {key: int, reset_key: int}, "step": {key: int, "action": str}}
        if env_name in ("babyai", "textcraft"):
            self.post_fields["close"] = {key: int}
        if env_name == "textcraft":
            self.post_fields["reset"] = {key: int}  # data_idx: Optional[int] = 0
        if env_name == "webshop":
            self.post_fields["reset"] = {key: int}  # session_id: Optional[int] = None
        self.key, self.reset_key = key, reset_key
        self.gets = {"observation"} | ({"available_actions"} if env_name in ("maze", "webshop") else set()) | (
            {"filtered_vocab"} if env_name == "wordle" else set())

    def _env(self):
        env = make_env(self.env_name)
        env.prompt = replace(env.prompt, preamble="")
        return env

    def post(self, route: str, body):
        self.log.append(("POST", route, tuple(sorted(body)) if isinstance(body, dict) else ()))
        if route not in self.post_fields:
            return 404, {"detail": "Not Found"}
        if route == "create" and self.env_name == "textcraft" and not isinstance(body, dict):
            return 422, {"detail": "body required"}  # TextCraft's create takes a CreateRequestBody
        for name, kind in self.post_fields[route].items():
            if not isinstance(body, dict) or not isinstance(body.get(name), kind):
                return 422, {"detail": f"field required: {name}"}
        if route == "create":
            idx = self.ids
            self.ids += 1
            self.envs[idx] = self._env()
            if self.env_name == "webshop":
                return 200, idx
            if self.env_name == "textcraft":
                obs = self.envs[idx].reset(idx)
                return 200, {"id": idx, "observation": obs, "done": False, "reward": 0}
            return 200, {"id": idx}
        env = self.envs.get(body[self.key])
        if env is None:
            return 200, {"error": f"The id {body[self.key]} is not valid."}
        if route == "close":
            del self.envs[body[self.key]]
            return 200, True
        if route == "reset":
            obs = env.reset(int(body.get(self.reset_key) or 0))
            env.last = obs
            return 200, {"webshop": [obs, None], "wordle": {"id": body[self.key], "observation": "Let's start Wordle!"},
                         "babyai": {"observation": obs, "reward": 0, "score": 0, "deleted": False, "done": False},
                         "textcraft": {"id": body[self.key], "observation": obs, "done": False, "reward": 0},
                         }.get(self.env_name, {"observation": obs})
        r = env.step("Action: " + body["action"])
        env.last = r.observation
        if self.env_name == "webshop":
            return 200, {"state": r.observation, "reward": r.reward, "done": r.done, "info": None}
        if self.env_name == "babyai":
            return 200, {"observation": r.observation, "reward": r.reward, "score": r.reward, "done": r.done}
        return 200, {"observation": r.observation, "reward": r.reward, "done": r.done}

    def get(self, route: str, query: dict):
        self.log.append(("GET", route, tuple(sorted(query))))
        if route not in self.gets:
            return 404, {"detail": "Not Found"}
        if route == "available_actions" and self.env_name == "maze":
            return 200, ["move left", "move right", "move up", "move down"]
        try:
            env = self.envs[int(query[self.key][0])]
        except (KeyError, ValueError):
            return 422, {"detail": f"query parameter required: {self.key}"}
        if route == "filtered_vocab":
            return 200, list(env.vocab.hidden)
        if route == "available_actions":
            return 200, {"has_search_bar": env.page == "search", "clickables": env.clickables()}
        return 200, env.last

    def serve(self) -> ThreadingHTTPServer:
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                self._send(*mock.get(url.path.strip("/"), urllib.parse.parse_qs(url.query)))

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                self._send(*mock.post(self.path.strip("/"), json.loads(raw) if raw else None))

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


#: The requests AgentGym's client makes for one episode (create, reset, the first step), per environment.
EXPECTED_OPENING = {
    "maze": [("POST", "create", ()), ("POST", "reset", ("game", "id")), ("POST", "step", ("action", "id"))],
    "wordle": [("POST", "create", ()), ("GET", "filtered_vocab", ("id",)), ("POST", "reset", ("id", "seed")),
               ("POST", "step", ("action", "id"))],
    "babyai": [("POST", "create", ()), ("POST", "reset", ("data_idx", "id")), ("POST", "step", ("action", "id"))],
    "textcraft": [("POST", "create", ("commands", "goal")), ("POST", "reset", ("data_idx", "id")),
                  ("POST", "step", ("action", "id"))],
    "webshop": [("POST", "create", ()), ("POST", "reset", ("env_idx", "session_id")),
                ("GET", "observation", ("env_idx",)), ("POST", "step", ("action", "env_idx"))],
}


@pytest.mark.parametrize("env_name", ENVS)
def test_adapter_drives_agentgym_servers(env_name):
    mock = MockAgentGymServer(env_name)
    server = mock.serve()
    try:
        remote = make_env("agentgym", server_url=f"http://127.0.0.1:{server.server_address[1]}", env_name=env_name)
        assert isinstance(remote, AgentGymHTTPEnv) and remote.timeout == 300.0
        local, shadow, oracle = make_env(env_name), make_env(env_name), make_oracle(env_name)
        assert remote.conversation_start() == local.conversation_start()
        task = list(local.test_task_ids())[1]
        observation = local.reset(task)
        # The first turn is rebuilt as AgentGym's client does (Maze: rules + observation; Wordle: rules with the
        # server's vocabulary; WebShop: GET observation after reset).
        assert remote.reset(task) == observation
        shadow.reset(task)
        oracle.reset(shadow, task)
        for turn in range(local.max_turns):
            if turn == 0 and env_name in ("maze", "wordle", "babyai", "webshop"):
                assert remote.valid_actions() and set(remote.valid_actions()) == set(local.valid_actions()) or \
                    env_name == "webshop"
            reply = oracle.act(shadow, observation)
            r_local, r_remote = local.step(reply), remote.step(reply)
            shadow.step(reply)
            assert (r_remote.observation, r_remote.reward, r_remote.done) == (
                r_local.observation, r_local.reward, r_local.done)
            observation = r_local.observation
            if r_local.done:
                assert r_remote.success == r_local.success is True
                break
        opening = [entry for entry in mock.log if entry[1] != "available_actions"][: len(EXPECTED_OPENING[env_name])]
        assert opening == EXPECTED_OPENING[env_name]
        remote.close()
        if env_name in ("babyai", "textcraft"):
            assert mock.log[-1] == ("POST", "close", ("id",)) and not mock.envs
        else:
            assert all(route != "close" for _, route, _ in mock.log)  # their servers have no /close
    finally:
        server.shutdown()
        server.server_close()


def test_adapter_refuses_two_actions_locally_for_babyai():
    mock = MockAgentGymServer("babyai")
    server = mock.serve()
    try:
        remote = AgentGymHTTPEnv(f"http://127.0.0.1:{server.server_address[1]}", "babyai")
        remote.reset(0)
        steps = len(mock.log)
        r = remote.step("Action: turn left\nAction: turn right")
        assert r.observation.startswith("Error: Only one 'Action' is allowed") and len(mock.log) == steps
        r = remote.step("Thought:\nx\n\nAction:\nturn left!")  # punctuation dropped as the client does
        assert mock.log[-1] == ("POST", "step", ("action", "id"))
        assert not r.done and "Available actions" in r.observation
    finally:
        server.shutdown()
        server.server_close()


def test_adapter_retries_unavailable_servers_but_never_a_step():
    calls = {"create": 0, "step": 0}

    class Flaky(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            route = self.path.strip("/")
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            calls[route] = calls.get(route, 0) + 1
            if route in ("create", "step") and calls[route] == 1:
                status, body = 503, {"detail": "busy"}
            else:
                status, body = 200, {"create": {"id": 0}, "reset": {"observation": "o"},
                                     "step": {"observation": "s", "reward": 0, "done": False}}[route]
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = AgentGymHTTPEnv(f"http://127.0.0.1:{server.server_address[1]}", "textcraft", retries=2)
        assert remote.reset(0) == "o" and calls["create"] == 2  # the 503 was retried
        with pytest.raises(ConnectionError, match="HTTP 503"):
            remote.step("Action: inventory")  # a step is never sent twice
        assert calls["step"] == 1
    finally:
        server.shutdown()
        server.server_close()


def test_server_error_ends_episode(fedse_server):
    remote = AgentGymHTTPEnv(f"{fedse_server}/maze", "maze")
    with pytest.raises(ValueError, match="refused to reset"):
        remote.reset(10_000)


def test_unreachable_server_is_a_clear_error():
    env = AgentGymHTTPEnv("http://127.0.0.1:9/maze", "maze", timeout=2, retries=0)
    with pytest.raises(ConnectionError, match="cannot reach the AgentGym server"):
        env.reset(0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="http"):
        AgentGymHTTPEnv("localhost:1", "maze")
    with pytest.raises(ValueError, match="unknown AgentGym protocol option"):
        AgentGymHTTPEnv("http://x", "maze", reset_field="x")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        AgentGymHTTPEnv("http://x", "maze", timeout=0)
    with pytest.raises(ValueError, match="no local oracle"):
        make_oracle("agentgym")


def test_constrained_mode_over_http(fedse_server):
    """The adapter's action space (WebShop: the server's clickables and search bar) feeds constrained decoding."""
    remote = AgentGymHTTPEnv(f"{fedse_server}/webshop", "webshop")
    remote.reset(0)
    space = remote.action_space()
    assert space.slots == (("search[", "]"),) and not space.literals
    remote.step(react("", "search[shampoo]"))
    space = remote.action_space()
    assert "click[back to search]" in space.literals and not space.slots
