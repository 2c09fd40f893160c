"""The environment interface every institution's private environment implements.

Text observation in, text action out, in AgentGym's conversation layout: the instruction is the first user turn,
answered by a fixed assistant "OK" turn (AgentGym's ``conversation_start``), then the first observation, then
alternating agent replies ("Thought:\\n...\\n\\nAction:\\n...") and observations. A task id fully determines an
episode, so the same task id and the same actions always give the same observations and rewards. Environments
never raise on malformed model output.

Two parsing modes (every local environment's ``parsing`` option):

* ``agentgym`` (the default): the reply is read exactly as AgentGym's client and server for that environment read
  it (where the action is cut from the reply, which characters are dropped, what counts as a valid action and
  what the environment answers otherwise). Each module's docstring states its rule.
* ``lenient``: the text after the last ``Action:``, first non-empty line; near-misses ("Move Up.", "shire") are
  accepted. Useful for small models that write the right action in the wrong shape.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

PARSINGS = ("agentgym", "lenient")
#: The assistant's fixed answer to the instruction turn (AgentGym's clients; WebShop's says "Ok.").
OK_REPLY = "OK. I'll follow your instructions and try my best to solve the task."
#: AgentGym's ReAct layout of an agent reply (``BaseAdapter.to_react``).
REACT_TEMPLATE = "Thought:\n{thought}\n\nAction:\n{action}"
ACTION_MARKER = "Action:"


def react(thought: str, action: str) -> str:
    return REACT_TEMPLATE.format(thought=thought, action=action)


@dataclass(frozen=True)
class StepResult:
    observation: str
    reward: float
    done: bool
    success: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prompt:
    """What the agent is told before the first observation.

    ``instruction`` is the first user turn and ``reply`` the assistant's fixed answer to it. ``preamble`` opens the
    first observation (AgentGym's Maze and Wordle clients put their rules, worked example and vocabulary there).
    """

    instruction: str
    reply: str = OK_REPLY
    preamble: str = ""

    def first_observation(self, observation: str) -> str:
        if not self.preamble:
            return observation
        return f"{self.preamble}\n{observation}" if observation else self.preamble


PROMPT_KEYS = ("instruction", "reply", "preamble")


def load_prompt(prompt_file: str | Path | None, default: Prompt) -> Prompt:
    """``default`` with the fields a JSON ``prompt_file`` sets (keys: instruction, reply, preamble).

    This is how a user plugs in AgentGym's exact text (its clients' ``conversation_start`` values and, for Maze and
    Wordle, their first-observation text) instead of this package's own wording.
    """
    if prompt_file is None:
        return default
    path = Path(prompt_file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"prompt_file {str(path)!r} does not exist; give the path of a JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"prompt_file {str(path)!r} is not readable JSON ({err}); write a JSON object with keys "
                         f"{', '.join(PROMPT_KEYS)}") from None
    if not isinstance(data, dict) or not data or set(data) - set(PROMPT_KEYS) or not all(
        isinstance(v, str) for v in data.values()
    ):
        raise ValueError(f"prompt_file {str(path)!r} must be a JSON object whose keys are among "
                         f"{', '.join(PROMPT_KEYS)} and whose values are strings")
    return Prompt(**{**default.__dict__, **data})


@dataclass(frozen=True)
class ActionSpace:
    """The actions an environment accepts right now, for decoding an action under them.

    ``literals`` are complete actions. ``slots`` are parametrised actions with one free-text argument: ``(prefix,
    close)`` means ``prefix`` + a non-empty text without ``close``, the prefix's last character or a line break +
    ``close`` (WebShop's ``search[...]``).
    """

    literals: tuple[str, ...] = ()
    slots: tuple[tuple[str, str], ...] = ()

    def accepts(self, action: str) -> bool:
        if action in self.literals:
            return True
        for prefix, close in self.slots:
            if action.startswith(prefix) and action.endswith(close) and len(action) > len(prefix) + len(close):
                arg = action[len(prefix) : len(action) - len(close)]
                if close not in arg and prefix[-1:] not in arg and "\n" not in arg:
                    return True
        return False


_ACTION_RE = re.compile(r"Action\s*:", re.IGNORECASE)


def extract_action(text: str) -> str:
    """Lenient parse: the text after the last ``Action:``, first non-empty line, stripped of backticks.

    Without an ``Action:`` marker the first non-empty line of the whole text is used, so a bare ``move up`` still
    works.
    """
    matches = list(_ACTION_RE.finditer(text))
    tail = text[matches[-1].end() :] if matches else text
    for line in tail.splitlines():
        line = line.strip().strip("`").strip()
        if line:
            return line
    return ""


# -- AgentGym's clients' parsers (agentenv/agentenv/envs/*.py), one per client family ------------------------------


def _drop_eos(text: str) -> str:
    return text[:-4] if text.endswith("</s>") else text


def agentgym_first_split(text: str) -> str:
    """LMRL-Gym clients (Maze, Wordle): the text between the first and a second ``Action:``, stripped; the whole
    reply when there is no marker."""
    parts = _drop_eos(text).split(ACTION_MARKER)
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


_LINE_ACTION_RE = re.compile(r"Action:\s*(.*?)(?=\n|$)", re.DOTALL)
#: BabyAI's and TextCraft's clients answer a reply with two ``Action:`` lines with this, without stepping.
MULTIPLE_ACTIONS = "Error: Only one 'Action' is allowed per response. Please adjust your response."


def agentgym_action_line(text: str) -> str | None:
    """BabyAI and TextCraft clients: the line after the only ``Action:`` (None when there are several), with every
    character but letters, digits, commas and spaces dropped and spaces collapsed; "" without a marker."""
    found = _LINE_ACTION_RE.findall(text)
    if len(found) > 1:
        return None
    action = found[-1] if found else ""
    action = re.sub(r"[^A-Za-z0-9, ]+", "", action)
    return " ".join(action.split()).strip()


def agentgym_react_tail(text: str) -> str:
    """WebShop's client (``BaseAdapter.parse_react``): everything after the last ``Action:``, stripped; without a
    marker the whole reply if it mentions ``search[`` or ``click[``, else ""."""
    text = _drop_eos(text)
    head, marker, tail = text.rpartition(ACTION_MARKER)
    if marker:
        return tail.strip()
    return text.strip() if ("search[" in text or "click[" in text) else ""


class TextEnv(ABC):
    """One episode at a time; see :class:`BatchedEnv` for many in lock-step."""

    name: ClassVar[str]
    #: Turn limit used for exploration and evaluation (the paper's / AgentGym's defaults).
    max_turns: ClassVar[int]
    #: The environment's own wording (the class default); ``prompt_file`` replaces any of its fields.
    default_prompt: ClassVar[Prompt]

    #: Options with a fixed set of values (checked by ``validate_options`` without building the environment).
    option_choices: ClassVar[dict[str, tuple[str, ...]]] = {"parsing": PARSINGS}

    prompt: Prompt
    parsing: str = "agentgym"

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """``ValueError`` (one line: the value and the fix) for a bad value of a common or fixed-choice option;
        what a config checks before anything is built."""
        max_turns = options.get("max_turns")
        if max_turns is not None and (not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1):
            raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
        for name, choices in cls.option_choices.items():
            if name in options and options[name] not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {options[name]!r}")
        if options.get("prompt_file") is not None:
            load_prompt(options["prompt_file"], Prompt(""))

    def _configure(self, max_turns: int | None, parsing: str, prompt_file: str | None) -> None:
        """The options every local environment takes (one place for their checks and error messages)."""
        type(self).validate_options({"max_turns": max_turns, "parsing": parsing})
        if max_turns is not None:
            self.max_turns = max_turns
        self.parsing = parsing
        self.prompt = load_prompt(prompt_file, self.default_prompt)

    def conversation_start(self) -> list[dict[str, str]]:
        """The messages before the first observation: the instruction and the assistant's "OK"."""
        return [{"role": "user", "content": self.prompt.instruction},
                {"role": "assistant", "content": self.prompt.reply}]

    @abstractmethod
    def reset(self, task_id: int) -> str:
        """Start the episode fully determined by ``task_id``; return the first observation (task included)."""

    @abstractmethod
    def step(self, action_text: str) -> StepResult:
        """Apply the model's raw reply (parsed per ``parsing``). Never raises on malformed actions."""

    def valid_actions(self) -> list[str] | None:
        """The currently valid actions where the environment can enumerate them, else None.

        Each entry is a literal action that ``step`` accepts as the action of a reply (callers may score them by
        likelihood).
        """
        return None

    def action_space(self) -> ActionSpace | None:
        """What constrained decoding may produce now (default: the valid actions as literals)."""
        actions = self.valid_actions()
        return ActionSpace(literals=tuple(actions)) if actions else None

    def close(self) -> None:
        """Release what the environment holds outside this process (a remote server's instance); a no-op here."""

    @abstractmethod
    def train_task_ids(self) -> Sequence[int]:
        """Task ids for exploration and expert demonstrations (disjoint from the test ids)."""

    @abstractmethod
    def test_task_ids(self) -> Sequence[int]:
        """Held-out task ids, sized like the paper's test sets (never filtered by what the oracle can solve)."""


class Oracle(ABC):
    """An expert that plays an environment; produces the seed demonstrations (the paper's AgentTraj)."""

    @abstractmethod
    def reset(self, env: TextEnv, task_id: int) -> None:
        """Called right after ``env.reset(task_id)``."""

    @abstractmethod
    def act(self, env: TextEnv, observation: str) -> str:
        """The next assistant message, in AgentGym's layout ``Thought:\\n...\\n\\nAction:\\n...``."""


class BatchedEnv:
    """Many independent episodes stepped together (one environment instance per slot)."""

    def __init__(self, envs: Sequence[TextEnv]):
        if not envs:
            raise ValueError("BatchedEnv needs at least one environment")
        self.envs = list(envs)

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, task_ids: Sequence[int]) -> list[str]:
        if len(task_ids) != len(self.envs):
            raise ValueError(f"expected {len(self.envs)} task ids, got {len(task_ids)}")
        return [env.reset(t) for env, t in zip(self.envs, task_ids)]

    def step(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        """Step every slot whose action is not None (finished episodes pass None)."""
        if len(actions) != len(self.envs):
            raise ValueError(f"expected {len(self.envs)} actions, got {len(actions)}")
        return [None if a is None else env.step(a) for env, a in zip(self.envs, actions)]
