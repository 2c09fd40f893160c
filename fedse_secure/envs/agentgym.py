"""Adapter for AgentGym's real environment servers over HTTP (``make_env("agentgym", server_url=..., env_name=...)``).

AgentGym runs each environment as a small web server (``agentenv-<name>``); its clients (``agentenv/envs/*.py``)
drive them. This adapter makes the calls those clients make, for all five environments of the paper:

=========  ==========================  ================  ===============================  =========================
env        create                      reset             first observation                available actions, close
=========  ==========================  ================  ===============================  =========================
maze       POST create -> {"id"}       {"id", "game"}    rules + reset's "observation"    GET available_actions
wordle     POST create -> {"id"}       {"id", "seed"}    rules + GET filtered_vocab list  the vocabulary
babyai     POST create -> {"id"}       {"id","data_idx"} reset's "observation"            parsed from observations;
                                                                                          POST close {"id"}
textcraft  POST create {"commands":    {"id","data_idx"} reset's "observation"            POST close {"id"}
           null, "goal": null}
webshop    POST create -> id (int)     {"env_idx",       GET observation?env_idx=         GET available_actions
                                        "session_id"}
=========  ==========================  ================  ===============================  =========================

Steps post ``{"id"|"env_idx", "action"}`` and read ``observation`` (WebShop: ``state``), ``reward`` and ``done``.
The action is cut from the model's reply exactly as that environment's client cuts it (``envs.base``'s
``agentgym_*`` parsers); a BabyAI or TextCraft reply with two ``Action:`` lines is refused locally, as their
clients do. ``server_url`` is the base URL AgentGym's client would get: ``http://host:36001`` for a BabyAI,
TextCraft or WebShop server, ``http://host:36001/maze`` or ``/wordle`` for LMRL-Gym's.

The conversation start and the rules AgentGym's Maze and Wordle clients put in the first observation come from the
local twin of the environment (our own wording), or from ``prompt_file`` (AgentGym's exact text). Success: reward
>= 1 (WebShop, TextCraft, Maze, Wordle), reward > 0 for BabyAI (see ``babyai.py``'s success rule).

Transport: AgentGym's clients wait 300 s per request (its servers can be slow to build an environment), so the
default ``timeout`` is 300 s. A request that never reached the server (connection refused or reset) or was
answered 503 is retried ``retries`` times with a growing pause, as AgentGym's WebShop client does for 503; a
request that timed out is not (a step may have been applied). Transport failures raise ``ConnectionError`` naming
the URL: they are infrastructure faults, not the model's. A server-side ``{"error": ...}`` ends the episode with
that message as the observation, as AgentGym's clients surface it. ``close`` (called by the rollout when it is
done with an environment) releases the server's instance where the server has ``/close``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedse_secure.envs import register_env
from fedse_secure.envs.base import (
    MULTIPLE_ACTIONS,
    ActionSpace,
    Prompt,
    StepResult,
    TextEnv,
    agentgym_action_line,
    agentgym_first_split,
    agentgym_react_tail,
)

PARSERS = {"first_split": agentgym_first_split, "action_line": agentgym_action_line, "react_tail": agentgym_react_tail}


@dataclass(frozen=True)
class Protocol:
    """How one AgentGym environment server is driven (field names and calls from AgentGym's client code)."""

    id_key: str = "id"
    reset_key: str = "data_idx"
    observation_keys: tuple[str, ...] = ("observation", "state")
    #: TextCraft's server validates a JSON body on /create (``commands`` and ``goal``, both optional).
    create_json: bool = False
    #: WebShop's /reset answers ``[observation, null]``; its client reads GET /observation instead.
    observation_after_reset: bool = False
    #: Wordle's client builds the first observation from the rules and GET /filtered_vocab.
    vocab_first_observation: bool = False
    #: Where the valid actions come from: "endpoint" (GET available_actions), "observation" (BabyAI's
    #: "Available actions: [...]" line), "vocab" (Wordle's filtered vocabulary) or "" (none).
    available_actions: str = ""
    has_close: bool = False
    #: Which AgentGym client parser cuts the action from a reply (``PARSERS``).
    parser: str = "first_split"
    #: Reward at or above which an episode counts as a success; ``success_above`` makes it strictly above.
    success_threshold: float = 1.0
    success_above: bool = False
    max_turns: int = 20
    n_test: int = 100


PROTOCOLS: dict[str, Protocol] = {
    "maze": Protocol(reset_key="game", available_actions="endpoint", max_turns=15, n_test=25),
    "wordle": Protocol(reset_key="seed", vocab_first_observation=True, available_actions="vocab", max_turns=8,
                       n_test=25),
    "babyai": Protocol(available_actions="observation", has_close=True, parser="action_line", success_threshold=0.0,
                       success_above=True, max_turns=20, n_test=90),
    "textcraft": Protocol(create_json=True, has_close=True, parser="action_line", max_turns=20, n_test=100),
    "webshop": Protocol(id_key="env_idx", reset_key="session_id", observation_after_reset=True,
                        available_actions="endpoint", parser="react_tail", max_turns=10, n_test=200),
}

_GENERIC_PROMPT = Prompt(
    "You are an agent acting in an environment. Each turn you get an observation; reply with one action in this "
    "format:\nThought:\n<your thought>\n\nAction:\n<your action>"
)
_AVAILABLE_RE = re.compile(r"Available actions: \[(.*)\]\s*$", re.DOTALL)


def _local_prompt(env_name: str) -> Prompt:
    """The local twin's conversation start and first-observation rules (our wording of AgentGym's)."""
    from fedse_secure.envs import ENVIRONMENTS

    if env_name in ENVIRONMENTS.names() and env_name != "agentgym":
        return ENVIRONMENTS.get(env_name).env_class.default_prompt
    return _GENERIC_PROMPT  # an AgentGym environment with no local twin (sciworld, alfworld, ...)


class AgentGymHTTPEnv(TextEnv):
    """One remote AgentGym environment instance (created lazily on the first reset)."""

    name = "agentgym"
    max_turns = 20

    def __init__(
        self,
        server_url: str,
        env_name: str,
        *,
        timeout: float = 300.0,
        retries: int = 3,
        prompt_file: str | None = None,
        max_turns: int | None = None,
        test_ids: Sequence[int] | None = None,
        train_ids: Sequence[int] | None = None,
        **protocol_overrides: Any,
    ):
        if not server_url or not re.match(r"^https?://", server_url):
            raise ValueError(f"server_url must be an http(s) URL such as http://localhost:36001, got {server_url!r}")
        if timeout <= 0 or retries < 0:
            raise ValueError(f"timeout must be > 0 and retries >= 0, got timeout={timeout!r}, retries={retries!r}")
        self.server_url = server_url.rstrip("/")
        self.env_name = env_name.lower()
        unknown = set(protocol_overrides) - set(Protocol.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown AgentGym protocol option(s) {sorted(unknown)}; valid: {sorted(Protocol.__dataclass_fields__)}"
            )
        self.protocol = replace(PROTOCOLS.get(self.env_name, Protocol()), **protocol_overrides)
        if self.protocol.parser not in PARSERS:
            raise ValueError(f"parser must be one of {', '.join(PARSERS)}, got {self.protocol.parser!r}")
        self.default_prompt = _local_prompt(self.env_name)
        self._configure(max_turns or self.protocol.max_turns, "agentgym", prompt_file)
        self.timeout, self.retries = float(timeout), int(retries)
        n_test = self.protocol.n_test
        self._test_ids = tuple(test_ids) if test_ids is not None else tuple(range(n_test))
        self._train_ids = tuple(train_ids) if train_ids is not None else tuple(range(n_test, n_test + 1000))
        self.remote_id: Any = None
        self.vocab: list[str] | None = None
        self.observation = ""
        self.turns = 0
        self.done = True

    # -- HTTP -------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, payload: Any = None, query: dict | None = None,
                 retry: bool = True) -> Any:
        url = f"{self.server_url}/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(payload).encode() if payload is not None else None
        attempt = 0
        while True:
            req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read().decode()
                break
            except urllib.error.HTTPError as err:
                if err.code == 503 and retry and attempt < self.retries:
                    attempt += 1
                    time.sleep(0.1 * attempt)
                    continue
                raise ConnectionError(f"AgentGym server {url} answered HTTP {err.code}: {err.read()[:200]!r}") from err
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as err:
                timed_out = isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError)
                if retry and not timed_out and attempt < self.retries:
                    attempt += 1
                    time.sleep(0.2 * attempt)
                    continue
                what = f"timed out after {self.timeout:g} s" if timed_out else f"{err}"
                raise ConnectionError(
                    f"cannot reach the AgentGym server at {url} ({what}); start it (e.g. `fedse envs serve` or "
                    "AgentGym's `textcraft --port 36001`) or fix server_url"
                ) from err
        try:
            return json.loads(body)
        except json.JSONDecodeError as err:
            raise ConnectionError(f"AgentGym server {url} did not answer JSON: {body[:200]!r}") from err

    def _post(self, path: str, payload: dict, retry: bool = True) -> Any:
        return self._request("POST", path, {self.protocol.id_key: self.remote_id, **payload}, retry=retry)

    def _get(self, path: str) -> Any:
        return self._request("GET", path, query={self.protocol.id_key: self.remote_id})

    def _observation_of(self, response: Any) -> str | None:
        if isinstance(response, str):
            return response
        if isinstance(response, dict):
            for key in self.protocol.observation_keys:
                if isinstance(response.get(key), str):
                    return response[key]
        return None

    @staticmethod
    def _raise_if_error(response: Any, what: str) -> None:
        if isinstance(response, dict) and "error" in response:
            raise ValueError(f"AgentGym server refused to {what}: {response['error']}")

    # -- TextEnv ----------------------------------------------------------------------------------------------

    def _create(self) -> None:
        created = self._request("POST", "create", {"commands": None, "goal": None} if self.protocol.create_json
                                else None)
        if isinstance(created, dict) and "error" in created:
            raise ConnectionError(f"AgentGym server {self.server_url} could not create an env: {created['error']}")
        if isinstance(created, dict):
            self.remote_id = created.get("id", created.get(self.protocol.id_key))
        else:  # WebShop's server answers the bare id
            self.remote_id = created
        if self.remote_id is None:
            raise ConnectionError(f"AgentGym server {self.server_url} answered /create without an id: {created!r}")
        if self.protocol.vocab_first_observation:
            vocab = self._get("filtered_vocab")
            self._raise_if_error(vocab, "list its vocabulary")
            self.vocab = [w for w in vocab if isinstance(w, str) and w]

    def reset(self, task_id: int) -> str:
        if self.remote_id is None:
            self._create()
        response = self._post("reset", {self.protocol.reset_key: int(task_id)})
        self._raise_if_error(response, f"reset to task {task_id}")
        if self.protocol.vocab_first_observation:
            observation = self.prompt.preamble.replace("{{vocab}}", "\n".join(self.vocab or []))
        else:
            observation = None if self.protocol.observation_after_reset else self._observation_of(response)
            if observation is None:
                observed = self._get("observation")
                self._raise_if_error(observed, "show its observation")
                observation = self._observation_of(observed) or str(observed)
            observation = self.prompt.first_observation(observation)
        self.task_id = task_id
        self.turns, self.done, self.observation = 0, False, observation
        return observation

    def step(self, action_text: str) -> StepResult:
        if self.remote_id is None:
            raise RuntimeError("AgentGymHTTPEnv.step called before reset(task_id)")
        if self.done:
            return StepResult("The episode is over; call reset(task_id).", 0.0, True, False, {"invalid": True})
        self.turns += 1
        action = PARSERS[self.protocol.parser](action_text)
        if action is None:  # BabyAI's and TextCraft's clients refuse a reply with two actions themselves
            self.done = self.turns >= self.max_turns
            return StepResult(MULTIPLE_ACTIONS, 0.0, self.done, False, {"invalid": True, "turns": self.turns})
        # A step is not idempotent: a request that reached the server is never sent twice.
        response = self._post("step", {"action": action}, retry=False)
        if isinstance(response, dict) and "error" in response:
            self.done = True
            return StepResult(str(response["error"]), 0.0, True, False, {"error": True, "turns": self.turns})
        observation = self._observation_of(response) or ""
        reward = float(response.get("reward", 0.0) or 0.0) if isinstance(response, dict) else 0.0
        server_done = bool(response.get("done", False)) if isinstance(response, dict) else False
        p = self.protocol
        reached = reward > p.success_threshold if p.success_above else reward >= p.success_threshold
        success = reached and (server_done or p.success_above)
        self.done = server_done or success or self.turns >= self.max_turns
        self.observation = observation
        return StepResult(observation, reward, self.done, success, {"turns": self.turns})

    def valid_actions(self) -> list[str] | None:
        source = self.protocol.available_actions
        if source == "vocab":
            return [" ".join(w) for w in self.vocab] if self.vocab else None
        if source == "observation":
            m = _AVAILABLE_RE.search(self.observation)
            return re.findall(r'"([^"]*)"', m.group(1)) if m else None
        if source == "endpoint" and self.remote_id is not None:
            listed = self._request("GET", "available_actions", query={self.protocol.id_key: self.remote_id})
            if isinstance(listed, list):
                return [str(a) for a in listed]
            if isinstance(listed, dict) and isinstance(listed.get("clickables"), list):
                return [f"click[{c}]" for c in listed["clickables"] if c != "search"]
        return None

    def action_space(self) -> ActionSpace | None:
        webshop_like = self.protocol.available_actions == "endpoint" and self.protocol.id_key == "env_idx"
        if webshop_like and self.remote_id is not None:
            listed = self._request("GET", "available_actions", query={self.protocol.id_key: self.remote_id})
            if isinstance(listed, dict):
                clicks = tuple(f"click[{c}]" for c in listed.get("clickables", []) if c != "search")
                slots = (("search[", "]"),) if listed.get("has_search_bar") else ()
                return ActionSpace(literals=clicks, slots=slots) if clicks or slots else None
        return super().action_space()

    def close(self) -> None:
        """Release the server's instance (BabyAI's and TextCraft's servers have /close); idempotent."""
        if self.remote_id is not None and self.protocol.has_close:
            try:
                self._post("close", {}, retry=False)
            except ConnectionError:
                pass  # the server is gone; nothing left to release
        self.remote_id, self.done = None, True

    def train_task_ids(self) -> Sequence[int]:
        return self._train_ids

    def test_task_ids(self) -> Sequence[int]:
        return self._test_ids


register_env("agentgym", AgentGymHTTPEnv)
