"""Adapter for real AgentGym environment servers over HTTP (``make_env("agentgym", server_url=..., env_name=...)``).

AgentGym runs each environment as a small web server (``agentenv-<name>``) with the same shape of API:
``POST <base>/create`` -> an environment id, ``POST <base>/reset`` with the id and a task index, ``POST
<base>/step`` with the id and an action string -> observation, reward and done, and ``GET <base>/observation?id=``.
The field names differ per environment (e.g. WebShop uses ``env_idx``/``session_id`` and answers with ``state``;
Maze resets with ``game``, Wordle with ``seed``, BabyAI and TextCraft with ``data_idx``); ``PROTOCOLS`` records
them, and any field can be overridden for another server. ``server_url`` is the environment's base URL as
AgentGym's clients use it, e.g. ``http://localhost:36001`` for TextCraft or ``http://localhost:36001/maze`` for
LMRL-Gym's maze.

The model's raw output is parsed leniently as AgentGym's clients do (the text after ``Action:``; bare "up" becomes
"move up" for Maze, "shire" becomes "s h i r e" for Wordle). A server-side ``{"error": ...}`` ends the episode
with that message as the observation, like AgentGym's client. Transport failures raise ``ConnectionError`` naming
the URL: they are infrastructure faults, not the model's.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedse_secure.envs import register_env
from fedse_secure.envs.base import StepResult, TextEnv, extract_action


@dataclass(frozen=True)
class Protocol:
    id_key: str = "id"
    reset_key: str = "data_idx"
    observation_keys: tuple[str, ...] = ("observation", "state")
    #: Reward at or above which an episode counts as a success.
    success_threshold: float = 1.0
    max_turns: int = 20
    n_test: int = 100


PROTOCOLS: dict[str, Protocol] = {
    "maze": Protocol(reset_key="game", max_turns=15, n_test=25),
    "wordle": Protocol(reset_key="seed", max_turns=8, n_test=25),
    "babyai": Protocol(reset_key="data_idx", success_threshold=1e-9, max_turns=20, n_test=90),
    "textcraft": Protocol(reset_key="data_idx", max_turns=20, n_test=100),
    "webshop": Protocol(id_key="env_idx", reset_key="session_id", max_turns=10, n_test=200),
}

_GENERIC_PROMPT = (
    "You are an agent acting in an environment. Each turn you get an observation; respond with one action.\n"
    "Reply exactly in this format:\nThought: <your thought>\nAction: <your action>"
)


def _local_prompt(env_name: str) -> str:
    try:
        from fedse_secure.envs import make_env

        return make_env(env_name).system_prompt()
    except Exception:  # an AgentGym environment with no local twin (sciworld, alfworld, ...)
        return _GENERIC_PROMPT


def normalise_for(env_name: str, action_text: str) -> str:
    action = extract_action(action_text)
    low = action.lower().strip().rstrip(".")
    if env_name == "maze" and low in ("up", "down", "left", "right"):
        return f"move {low}"
    if env_name == "wordle" and re.fullmatch(r"[a-z]{5}", low):
        return " ".join(low)
    if env_name == "textcraft":
        action = " ".join(re.sub(r"[^A-Za-z0-9, ]+", "", action).split())
        return "inventory" if action.lower() == "look" else action
    return action


class AgentGymHTTPEnv(TextEnv):
    """One remote AgentGym environment instance (created lazily on the first reset)."""

    name = "agentgym"
    max_turns = 20

    def __init__(
        self,
        server_url: str,
        env_name: str,
        *,
        timeout: float = 30.0,
        system_prompt: str | None = None,
        max_turns: int | None = None,
        test_ids: Sequence[int] | None = None,
        train_ids: Sequence[int] | None = None,
        **protocol_overrides: Any,
    ):
        if not server_url or not re.match(r"^https?://", server_url):
            raise ValueError(f"server_url must be an http(s) URL such as http://localhost:36001, got {server_url!r}")
        self.server_url = server_url.rstrip("/")
        self.env_name = env_name.lower()
        unknown = set(protocol_overrides) - set(Protocol.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown AgentGym protocol option(s) {sorted(unknown)}; valid: {sorted(Protocol.__dataclass_fields__)}"
            )
        self.protocol = replace(PROTOCOLS.get(self.env_name, Protocol()), **protocol_overrides)
        self.timeout = timeout
        self.max_turns = max_turns or self.protocol.max_turns
        self._prompt = system_prompt
        n_test = self.protocol.n_test
        self._test_ids = tuple(test_ids) if test_ids is not None else tuple(range(n_test))
        self._train_ids = tuple(train_ids) if train_ids is not None else tuple(range(n_test, n_test + 1000))
        self.remote_id: Any = None
        self.turns = 0
        self.done = True

    # -- HTTP -------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, payload: dict | None = None, query: dict | None = None) -> Any:
        url = f"{self.server_url}/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(payload).encode() if payload is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read().decode()
        except urllib.error.HTTPError as err:
            raise ConnectionError(f"AgentGym server {url} answered HTTP {err.code}: {err.read()[:200]!r}") from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise ConnectionError(
                f"cannot reach the AgentGym server at {url} ({err}); start it (e.g. `textcraft --port 36001`) "
                "or fix server_url"
            ) from err
        try:
            return json.loads(body)
        except json.JSONDecodeError as err:
            raise ConnectionError(f"AgentGym server {url} did not answer JSON: {body[:200]!r}") from err

    def _observation_of(self, response: Any) -> str | None:
        if isinstance(response, dict):
            for key in self.protocol.observation_keys:
                if isinstance(response.get(key), str):
                    return response[key]
        return None

    # -- TextEnv ----------------------------------------------------------------------------------------------

    def system_prompt(self) -> str:
        if self._prompt is None:
            self._prompt = _local_prompt(self.env_name)
        return self._prompt

    def reset(self, task_id: int) -> str:
        if self.remote_id is None:
            created = self._request("POST", "create")
            if isinstance(created, dict) and "error" in created:
                raise ConnectionError(f"AgentGym server {self.server_url} could not create an env: {created['error']}")
            if isinstance(created, dict):
                self.remote_id = created.get("id", created.get(self.protocol.id_key))
            else:  # WebShop's server answers the bare id
                self.remote_id = created
        response = self._request(
            "POST", "reset", {self.protocol.id_key: self.remote_id, self.protocol.reset_key: int(task_id)}
        )
        if isinstance(response, dict) and "error" in response:
            raise ValueError(f"AgentGym server rejected task {task_id}: {response['error']}")
        observation = self._observation_of(response)
        if observation is None:
            observed = self._request("GET", "observation", query={self.protocol.id_key: self.remote_id})
            observation = observed if isinstance(observed, str) else self._observation_of(observed) or str(observed)
        self.task_id = task_id
        self.turns, self.done = 0, False
        return observation

    def step(self, action_text: str) -> StepResult:
        if self.remote_id is None:
            raise RuntimeError("AgentGymHTTPEnv.step called before reset(task_id)")
        if self.done:
            return StepResult("The episode is over; call reset(task_id).", 0.0, True, False, {"invalid": True})
        self.turns += 1
        action = normalise_for(self.env_name, action_text)
        response = self._request("POST", "step", {self.protocol.id_key: self.remote_id, "action": action})
        if isinstance(response, dict) and "error" in response:
            self.done = True
            return StepResult(str(response["error"]), 0.0, True, False, {"error": True, "turns": self.turns})
        observation = self._observation_of(response) or ""
        reward = float(response.get("reward", 0.0) or 0.0) if isinstance(response, dict) else 0.0
        server_done = bool(response.get("done", False)) if isinstance(response, dict) else False
        success = server_done and reward >= self.protocol.success_threshold
        self.done = server_done or self.turns >= self.max_turns
        return StepResult(observation, reward, self.done, success, {"turns": self.turns})

    def train_task_ids(self) -> Sequence[int]:
        return self._train_ids

    def test_task_ids(self) -> Sequence[int]:
        return self._test_ids


register_env("agentgym", AgentGymHTTPEnv)
