"""BabyAI (minigrid 3.2 levels) with AgentGym's text layer (``agentenv-babyai``), re-implemented for gymnasium 1.x.

Kept from AgentGym:
- Tasks: task id i -> level ``LEVELS[i % 40]`` (AgentGym's 40-level list, GoToRedBallGrey .. BossLevelNoUnlock),
  seed ``i // 40``. ``GoToObjS6`` is v1 here: minigrid 3.2 registers only v1, AgentGym's minigrid < 2.5 ran v0.
- First observation "Your goal: <mission>\\n<description>\\nAvailable actions: [...]", later observations
  "<description>\\nAvailable actions: [...]". The description lists the objects in the agent's 7x7 egocentric view,
  nearest first, numbered per name ("There is a red ball 1 3 steps in front of you and 1 steps to your right."),
  the nearest wall or box straight ahead, and what the agent carries.
- High-level actions under AgentGym's names, each expanded to minigrid primitives by breadth-first search over the
  visible cells: ``turn left``, ``turn right``, ``move forward``, ``go to <obj> <n>``, ``pickup <obj> <n>``, ``go
  through <open door> <n>``, ``toggle and go through <door> <n>`` (a locked door needs the key of its colour),
  ``toggle``, ``drop`` and ``check available actions``. Unavailable actions get AgentGym's messages ("The action is
  not recognized. Please check valid actions." or the specific reason). AgentGym's prompt says "pick up" but its
  server only accepts "pickup"; the prompt here says what the server accepts.
- Conversation: AgentGym's instruction (the actions and the reply format) in our own words as the first user turn.

Differences, on purpose: the mission text is kept verbatim (AgentGym rewrites "then"/"after you" to "and", which
changes the meaning of ordered missions); objects are numbered the same way in the description and in the action
names (AgentGym numbers actions only over reachable objects, so "red ball 2" could name different balls); closed
doors block paths and ``toggle`` also opens boxes (minigrid allows it; KeyInBox needs it).

Parsing. ``agentgym`` (AgentGym's client, then its server): the line after the only ``Action:`` (a reply with two
is answered "Error: Only one 'Action' is allowed ..." and nothing happens), characters other than letters,
digits, commas and spaces dropped, spaces collapsed, lower-cased; any action containing "check" lists the
available actions; an empty one is answered "No change in state.". ``lenient``: the first line after the last
``Action:``, any punctuation, "pick up" or "pickup".

Reward and success (the ``success_rule`` option). minigrid's reward is 1 - 0.9 * (primitive steps / level max
steps) on the primitive step that accomplishes the mission, else 0, so AgentGym's evaluator (reward == 1) never
counts a BabyAI success, while its self-evolution filter (AgentEvol) keeps BabyAI trajectories with reward > 0,
where every other environment needs > 0.99. The paper reports 68-93% BabyAI success and filters on "success", so
it most likely counted reward > 0 on AgentGym's server; that is the default:

- ``agentgym`` (default): as AgentGym's server, every primitive of a high-level action runs and the action's reward
  is the last primitive's; the episode is a success (and ends) when that reward is > 0. Minigrid ending the episode
  otherwise (a failed mission, its own step cap) does not end it, as on AgentGym's server. (AgentGym also keeps an
  episode going when the reward is at most 0.5, i.e. slow successes; such an episode already counts under the
  > 0 rule, so it ends here.)
- ``any_step``: a success as soon as any primitive accomplishes the mission (the rest of the action is skipped);
  a failed mission or minigrid's step cap ends the episode unsuccessful.

Split. The paper has 90 BabyAI test tasks: test = task ids 0..89, in AgentGym's id order, never filtered by what
the expert can do (some need more than 20 AgentGym actions with a 7x7 view, and minigrid's BabyAIBot cannot solve
KeyInBox, PutNextS7N4Carrying or OpenDoorsOrderN4Debug at all); the oracle's ceiling on them is reported beside
the agent's success. Train = ids 90..899 (810, the size of AgentTraj's BabyAI set; some have no demonstration and
are left to exploration).
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from fedse_secure.envs import register_env
from fedse_secure.envs.base import (
    MULTIPLE_ACTIONS,
    Oracle,
    Prompt,
    StepResult,
    TextEnv,
    agentgym_action_line,
    extract_action,
    react,
)

LEVELS: tuple[str, ...] = (
    "BabyAI-GoToRedBallGrey-v0", "BabyAI-GoToRedBall-v0", "BabyAI-GoToRedBallNoDists-v0", "BabyAI-GoToObjS6-v1",
    "BabyAI-GoToLocalS8N7-v0", "BabyAI-GoToObjMazeS7-v0", "BabyAI-GoToImpUnlock-v0", "BabyAI-GoToSeqS5R2-v0",
    "BabyAI-GoToRedBlueBall-v0", "BabyAI-GoToDoor-v0", "BabyAI-GoToObjDoor-v0", "BabyAI-Open-v0",
    "BabyAI-OpenRedDoor-v0", "BabyAI-OpenDoorLoc-v0", "BabyAI-OpenRedBlueDoorsDebug-v0",
    "BabyAI-OpenDoorsOrderN4Debug-v0", "BabyAI-Pickup-v0", "BabyAI-UnblockPickup-v0", "BabyAI-PickupLoc-v0",
    "BabyAI-PickupDistDebug-v0", "BabyAI-PickupAbove-v0", "BabyAI-PutNextLocalS6N4-v0",
    "BabyAI-PutNextS7N4Carrying-v0", "BabyAI-Unlock-v0", "BabyAI-UnlockLocalDist-v0", "BabyAI-KeyInBox-v0",
    "BabyAI-UnlockPickupDist-v0", "BabyAI-BlockedUnlockPickup-v0", "BabyAI-UnlockToUnlock-v0",
    "BabyAI-ActionObjDoor-v0", "BabyAI-FindObjS7-v0", "BabyAI-KeyCorridorS6R3-v0", "BabyAI-OneRoomS20-v0",
    "BabyAI-MoveTwoAcrossS8N9-v0", "BabyAI-SynthS5R2-v0", "BabyAI-SynthLoc-v0", "BabyAI-SynthSeq-v0",
    "BabyAI-MiniBossLevel-v0", "BabyAI-BossLevel-v0", "BabyAI-BossLevelNoUnlock-v0",
)  # fmt: skip
N_TEST = 90
N_TRAIN = 810
TEST_IDS: tuple[int, ...] = tuple(range(N_TEST))
TRAIN_START = N_TEST
SUCCESS_RULES = ("agentgym", "any_step")

# minigrid primitive actions
LEFT, RIGHT, FORWARD, PICKUP, DROP, TOGGLE, DONE = range(7)
_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # minigrid DIR_TO_VEC: right, down, left, up
_OBJECTS = ("door", "key", "ball", "box", "goal", "lava")
_PICKABLE = ("key", "ball", "box")

INSTRUCTION = (
    "You are an exploration master who wants to finish every goal you are given. Each turn I give you an "
    "observation, and you reply with your thought and one action based on it, to accomplish the given goal. You "
    "are placed in a room.\n\n"
    "You can use these actions:\n\n"
    "- turn right\n\n- turn left\n\n- move forward\n\n- go to <obj> <id>\n\n- pickup <obj> <id>\n\n"
    "- go through <door> <id>: <door> must be an open door.\n\n"
    "- toggle and go through <door> <id>: <door> may be a closed or a locked door. To open a locked door you must "
    "carry a key of the same color as the door.\n\n"
    "- toggle: toggles the closed or locked door right in front of you.\n"
    "Reply in this format:\nThought:\n<your thought>\n\nAction:\n<your action>"
)
NO_CHANGE = "No change in state."
INVALID = "The action is not recognized. Please check valid actions."


def _add(a, b):
    return (int(a[0]) + int(b[0]), int(a[1]) + int(b[1]))


@dataclass(frozen=True)
class _Seen:
    name: str  # "red ball", "grey closed door"
    kind: str
    pos: tuple[int, int]
    front: int
    right: int


class BabyAIEnv(TextEnv):
    name = "babyai"
    max_turns = 20
    default_prompt = Prompt(INSTRUCTION)
    option_choices = {**TextEnv.option_choices, "success_rule": SUCCESS_RULES}

    def __init__(
        self,
        max_turns: int | None = None,
        parsing: str = "agentgym",
        prompt_file: str | None = None,
        success_rule: str = "agentgym",
    ):
        self._configure(max_turns, parsing, prompt_file)
        self.validate_options({"success_rule": success_rule})
        self.success_rule = success_rule
        self._gym_envs: dict[str, object] = {}
        self.env = None  # the unwrapped minigrid env of the current episode
        self.mission = ""
        self.actions: dict[str, list[int]] = {}
        self.errors: dict[str, str] = {}
        self.turns = 0
        self.done = True
        self.reward = 0.0

    # -- episode ---------------------------------------------------------------------------------------------

    def reset(self, task_id: int) -> str:
        if not isinstance(task_id, int) or task_id < 0:
            raise ValueError(f"babyai task id must be a non-negative int, got {task_id!r}")
        level, seed = LEVELS[task_id % len(LEVELS)], task_id // len(LEVELS)
        if level not in self._gym_envs:
            import gymnasium as gym
            import minigrid  # noqa: F401  (registers the BabyAI levels)

            self._gym_envs[level] = gym.make(level)
        # Some level generators print "Sampling rejected ..." while placing objects; keep stdout clean.
        with contextlib.redirect_stdout(io.StringIO()):
            self._gym_envs[level].reset(seed=seed)
        self.env = self._gym_envs[level].unwrapped
        self.task_id, self.level, self.seed = task_id, level, seed
        self.mission = self.env.mission
        self.turns, self.done, self.reward = 0, False, 0.0
        description = self._observe()
        return f"Your goal: {self.mission}\n{description}\n{self._actions_line()}"

    def step(self, action_text: str) -> StepResult:
        if self.env is None:
            raise RuntimeError("BabyAIEnv.step called before reset(task_id)")
        if self.done:
            return StepResult("The episode is over; call reset(task_id).", 0.0, True, False, {"invalid": True})
        self.turns += 1
        action = normalise_action(action_text, self.parsing)
        info: dict = {"turns": self.turns}
        success = failed = False
        if action is None:
            observation = MULTIPLE_ACTIONS
            info["invalid"] = True
        elif "check" in action if self.parsing == "agentgym" else action == "check available actions":
            observation = "You can take the following actions: " + ", ".join(self.valid_actions())
        elif action == "" and self.parsing == "agentgym":
            observation = NO_CHANGE
            info["invalid"] = True
        elif action not in self.actions:
            observation = self.errors.get(action, INVALID)
            info["invalid"] = True
        else:
            success, failed = self._execute(self.actions[action])
            observation = self._observe()
            if success:
                observation += "\nThe task is completed."
        self.done = success or failed or self.turns >= self.max_turns
        if not self.done:
            observation += "\n" + self._actions_line()
        info["primitive_steps"] = int(self.env.step_count)
        return StepResult(observation, self.reward if success else 0.0, self.done, success, info)

    def _execute(self, primitives: list[int]) -> tuple[bool, bool]:
        """Run one high-level action's primitives; (success, failed) per ``success_rule``."""
        reward = 0.0
        for primitive in primitives:
            _, reward, terminated, truncated, _ = self.env.step(primitive)
            if self.success_rule == "any_step" and (terminated or truncated):
                success = terminated and reward > 0
                self.reward = float(reward) if success else 0.0
                return success, not success
        if self.success_rule == "agentgym" and reward > 0:
            self.reward = float(reward)
            return True, False
        return False, False

    def valid_actions(self) -> list[str]:
        return list(self.actions) + ["check available actions"]

    def train_task_ids(self) -> Sequence[int]:
        return range(TRAIN_START, TRAIN_START + N_TRAIN)

    def test_task_ids(self) -> Sequence[int]:
        return TEST_IDS

    # -- text layer ------------------------------------------------------------------------------------------

    def _actions_line(self) -> str:
        return "Available actions: [" + ", ".join(f'"{a}"' for a in self.valid_actions()) + "]"

    def _observe(self) -> str:
        """Describe the view and rebuild the available high-level actions."""
        text, self.actions, self.errors = describe(self.env)
        return text


def _visible(env) -> tuple[set[tuple[int, int]], list[_Seen]]:
    grid, vis = env.gen_obs_grid()
    size = env.agent_view_size
    pos, fvec, rvec = tuple(env.agent_pos), env.dir_vec, env.right_vec
    cells: set[tuple[int, int]] = set()
    seen: list[_Seen] = []
    for i in range(size):
        for j in range(size):
            if not vis[i, j]:
                continue
            front, right = size - 1 - j, i - size // 2
            absolute = (
                int(pos[0] + fvec[0] * front + rvec[0] * right),
                int(pos[1] + fvec[1] * front + rvec[1] * right),
            )
            if not (0 <= absolute[0] < env.width and 0 <= absolute[1] < env.height):
                continue
            cells.add(absolute)
            if front == 0 and right == 0:
                continue
            obj = env.grid.get(*absolute)
            if obj is not None and obj.type in _OBJECTS:
                if obj.type == "door":
                    state = "locked" if obj.is_locked else "open" if obj.is_open else "closed"
                    label = f"{obj.color} {state} door"
                else:
                    label = f"{obj.color} {obj.type}"
                seen.append(_Seen(label, obj.type, absolute, front, right))
    seen.sort(key=lambda s: (abs(s.front) + abs(s.right), s.front, s.right))
    return cells, seen

def describe(env) -> tuple[str, dict[str, list[int]], dict[str, str]]:
    """(description, high-level action -> primitives, unavailable action -> reason) for a minigrid env's state."""
    cells, seen = _visible(env)
    pos, d = tuple(int(x) for x in env.agent_pos), int(env.agent_dir)
    counts: dict[str, int] = {}
    named: list[tuple[str, _Seen]] = []
    parts = []
    for s in seen:
        counts[s.name] = counts.get(s.name, 0) + 1
        ident = f"{s.name} {counts[s.name]}"
        named.append((ident, s))
        if s.right == 0:
            where = f"right in front of you {s.front} steps away"
        else:
            side = "right" if s.right > 0 else "left"
            where = f"{s.front} steps in front of you and {abs(s.right)} steps to your {side}"
        parts.append(f"There is a {ident} {where}.")
    if parts:
        text = "In front of you in this room, you can see several objects: " + " ".join(parts) + " "
    else:
        text = "You cannot see any objects within sight. "
    # Nearest wall or box straight ahead.
    blocker = None
    ahead = pos
    for k in range(1, env.agent_view_size):
        ahead = _add(ahead, _DIRS[d])
        if ahead not in cells:
            break
        cell = env.grid.get(*ahead)
        if cell is not None and cell.type in ("wall", "box"):
            blocker = (cell.type, k)
            break
    text += "The room has walls around you. "
    if blocker:
        text += f"You are facing a {blocker[0]} {blocker[1]} steps away. "
    carrying = env.carrying
    text += f"You are carrying a {carrying.color} {carrying.type}." if carrying else "You are not carrying anything."

    actions: dict[str, list[int]] = {"turn left": [LEFT], "turn right": [RIGHT]}
    errors: dict[str, str] = {}
    paths = _Paths(env.grid, cells, pos, d)
    front_pos = _add(pos, _DIRS[d])
    front = env.grid.get(*front_pos)
    if front is None or front.can_overlap():
        actions["move forward"] = [FORWARD]
    else:
        errors["move forward"] = "There is a barrier in front of you, you can't move forward."
    for ident, s in named:
        if s.kind in ("goal", "lava"):
            continue
        path = paths.to(s.pos, arrive=False)
        if path is None:
            errors[f"go to {ident}"] = f"You cannot go to {ident}, as there is no path leading to it."
            continue
        actions[f"go to {ident}"] = path
        if s.kind in _PICKABLE:
            if carrying is None:
                actions[f"pickup {ident}"] = path + [PICKUP]
            else:
                errors[f"pickup {ident}"] = f"You cannot pickup {ident}, as you are already carrying something."
        if s.kind == "door":
            door = env.grid.get(*s.pos)
            if door.is_open:
                through = paths.to(s.pos, arrive=True)
                if through is not None:
                    actions[f"go through {ident}"] = through
            elif door.is_locked and (carrying is None or carrying.type != "key" or carrying.color != door.color):
                errors[f"toggle and go through {ident}"] = (
                    f"You cannot toggle and go through {ident}, as you are not carrying a key of its color."
                )
            else:
                actions[f"toggle and go through {ident}"] = path + [TOGGLE, FORWARD]
                errors[f"go through {ident}"] = f"You cannot go through {ident}, as it is closed. Toggle it first."
    if front is not None and front.type in ("door", "box"):
        if front.type == "box" or not front.is_open:
            actions["toggle"] = [TOGGLE]
    if carrying is not None:
        if front is None:
            actions["drop"] = [DROP]
        else:
            errors["drop"] = "You cannot drop the object, as there is already an object in front of you."
    else:
        errors["drop"] = "You cannot drop the object, as you are not carrying anything."
    return text, actions, errors


class _Paths:
    """One breadth-first search over (cell, direction) within the visible free cells, shared by every target.

    States are visited in order of path length, so the first visited state that stands on (arrive) or faces
    (not arrive) a target gives a fewest-primitives path to it.
    """

    def __init__(self, grid, cells, pos, d):
        def free(cell):
            if cell not in cells:
                return False
            obj = grid.get(*cell)
            return obj is None or (obj.can_overlap() and obj.type != "lava")

        start = (pos, d)
        self.prev: dict = {start: None}
        self.order = [start]
        queue = deque([start])
        while queue:
            state = queue.popleft()
            p, k = state
            for a in (FORWARD, LEFT, RIGHT):
                if a == FORWARD:
                    nxt = _add(p, _DIRS[k])
                    if not free(nxt):
                        continue
                    new = (nxt, k)
                else:
                    new = (p, (k - 1) % 4 if a == LEFT else (k + 1) % 4)
                if new not in self.prev:
                    self.prev[new] = (state, a)
                    self.order.append(new)
                    queue.append(new)

    def to(self, target, arrive: bool) -> list[int] | None:
        for state in self.order:
            p, k = state
            if (arrive and p == target) or (not arrive and _add(p, _DIRS[k]) == target):
                path = []
                while self.prev[state] is not None:
                    state, a = self.prev[state]
                    path.append(a)
                return path[::-1]
        return None


def normalise_action(action_text: str, parsing: str = "lenient") -> str | None:
    """The action of a reply, lower-cased (None: several ``Action:`` lines, which AgentGym's client refuses)."""
    if parsing == "agentgym":
        action = agentgym_action_line(action_text)
        return None if action is None else action.lower().strip()
    action = extract_action(action_text).lower()
    action = re.sub(r"[^a-z0-9 ]+", " ", action)
    action = " ".join(action.split())
    action = re.sub(r"\bpick up\b", "pickup", action)
    if action.startswith("check"):
        return "check available actions"
    return action


# ---------------------------------------------------------------------------------------------------------------
# Oracle: minigrid's BabyAIBot, with its primitive plan expressed in the fewest high-level actions


def _move(grid, state, a):
    p, k = state
    if a == LEFT:
        return (p, (k - 1) % 4)
    if a == RIGHT:
        return (p, (k + 1) % 4)
    nxt = _add(p, _DIRS[k])
    obj = grid.get(*nxt)
    return (nxt, k) if obj is None or obj.can_overlap() else state


_MOVES = (LEFT, RIGHT, FORWARD)
_REACH = 9  # the farthest visible cell of a 7x7 egocentric view: 6 ahead + 3 aside


def _front(state) -> tuple[int, int]:
    return _add(state[0], _DIRS[state[1]])


class _BotStuck(Exception):
    pass


def _guarded_bot(env):
    """A BabyAIBot that gives up instead of looping forever.

    On some seeds (e.g. UnlockToUnlock) the bot's subgoals keep replacing each other inside a single ``replan``
    call and it never returns. Every such cycle runs a breadth-first search, so a cap on searches per call turns
    the hang into a deterministic failure (normal calls run a handful).
    """
    from minigrid.utils.baby_ai_bot import BabyAIBot

    class GuardedBot(BabyAIBot):
        MAX_SEARCHES_PER_REPLAN = 200

        def replan(self, action_taken=None):
            self._searches = 0
            return super().replan(action_taken)

        def _breadth_first_search(self, *args, **kwargs):
            self._searches = getattr(self, "_searches", 0) + 1
            if self._searches > self.MAX_SEARCHES_PER_REPLAN:
                raise _BotStuck("BabyAIBot replanning does not terminate")
            return super()._breadth_first_search(*args, **kwargs)

    return GuardedBot(env)


class BabyAIOracle(Oracle):
    """Minigrid's ``BabyAIBot`` decides *what* to do; a search decides how to say it in AgentGym's actions.

    On reset the bot plays a copy of the episode to the end. Its primitive plan is reduced to its events (each
    pickup, drop and toggle with the cell it acts on, in order) and, when the plan ends with moves, the cell the
    agent must finally face. A breadth-first search over (position, direction, events done), whose edges are the
    high-level actions available in each state (computed from the egocentric view, exactly as the environment
    does), then finds the fewest turns that perform the same events on the same cells. The world only changes at
    events, so each search state is evaluated on a snapshot of the world after its events. When the bot cannot
    solve a level (minigrid documents KeyInBox and PutNext...Carrying) or the search exceeds its budget, the
    oracle has no plan and the episode is not a demonstration.
    """

    MAX_PRIMITIVES = 2000
    #: Search budget per episode. The test tasks need at most about 1,900 expansions; infeasible tasks are cut
    #: off by the turn-limit bound long before this, so it only caps pathological cases.
    MAX_EXPANSIONS = 5000

    def __init__(self):
        self.script: list[str] = []
        self.expansions = 0

    def reset(self, env: TextEnv, task_id: int) -> None:
        if not isinstance(env, BabyAIEnv) or env.env is None:
            raise TypeError(f"BabyAIOracle plays a reset BabyAIEnv, got {type(env).__name__}")
        self.script = []
        self.expansions = 0
        bot_run = self._bot_events(env.env)
        if bot_run is not None:
            self.script = self._search(env.env, *bot_run, max_depth=env.max_turns,
                                       last_primitive=env.success_rule == "agentgym") or []

    def _bot_events(self, start_env):
        sim = copy.deepcopy(start_env)
        worlds = [copy.deepcopy(sim)]
        events: list[tuple[int, tuple[int, int]]] = []
        last = None
        try:
            bot = _guarded_bot(sim)
            for _ in range(self.MAX_PRIMITIVES):
                a = int(bot.replan())
                if a == DONE:
                    return None
                state = (tuple(int(x) for x in sim.agent_pos), int(sim.agent_dir))
                _, reward, terminated, truncated, _ = sim.step(a)
                last = a
                if a not in _MOVES:
                    events.append((a, _front(state)))
                    worlds.append(copy.deepcopy(sim))
                if terminated or truncated:
                    if not (terminated and reward > 0):
                        return None
                    break
            else:
                return None
        except Exception:  # the bot fails on a few levels (see the class docstring)
            return None
        final = None if last not in _MOVES else _front((tuple(int(x) for x in sim.agent_pos), int(sim.agent_dir)))
        return events, worlds, final

    def _search(self, env, events, worlds, final, max_depth: int, last_primitive: bool = True) -> list[str] | None:
        """The fewest high-level actions that replay the bot's events; with ``last_primitive`` (the ``agentgym``
        success rule) the last event must be an action's last primitive, since only that primitive's reward
        counts (e.g. "toggle and go through" opens a door but ends with a step, so an Open mission needs
        "toggle")."""
        start = (tuple(int(x) for x in env.agent_pos), int(env.agent_dir), 0)

        def is_goal(node) -> bool:
            return node[2] == len(events) and (final is None or _front((node[0], node[1])) == final)

        if is_goal(start):
            return []
        # A high-level action ends on a cell that was visible when it was chosen (7x7 view: at most 6 ahead and 3
        # aside), so one turn moves the agent at most _REACH cells (Manhattan). With one event per turn at most,
        # this bounds the turns still needed from below; nodes that cannot finish in time are never expanded.
        targets = [cell for _, cell in events] + ([final] if final is not None else [])

        def turns_needed(node) -> int:
            pos, _, k = node
            if k >= len(targets):
                return 0
            distance = abs(pos[0] - targets[k][0]) + abs(pos[1] - targets[k][1]) - 1
            return max(len(events) - k, -(-max(distance, 0) // _REACH))

        prev: dict = {start: None}
        queue = deque([(start, 0)])
        self.expansions = 0
        while queue and self.expansions < self.MAX_EXPANSIONS:
            node, depth = queue.popleft()
            if depth >= max_depth:  # BFS: every later node is at least this deep, so nothing fits the turn limit
                break
            if depth + turns_needed(node) > max_depth:
                continue
            self.expansions += 1
            pos, d, k = node
            world = worlds[k]
            world.agent_pos, world.agent_dir = pos, d
            _, actions, _ = describe(world)
            for name, prims in actions.items():
                state, kk, ok, finished_at = (pos, d), k, True, None
                for i, a in enumerate(prims):
                    if a in _MOVES:
                        state = _move(worlds[kk].grid, state, a)
                    elif kk < len(events) and events[kk] == (a, _front(state)):
                        kk += 1
                        finished_at = i if kk == len(events) else None
                    else:
                        ok = False
                        break
                if last_primitive and final is None and finished_at is not None and finished_at != len(prims) - 1:
                    continue  # the mission's reward would come before the action's last primitive
                nxt = (state[0], state[1], kk)
                if not ok or nxt in prev:
                    continue
                prev[nxt] = (node, name)
                if is_goal(nxt):
                    script = []
                    while prev[nxt] is not None:
                        nxt, step_name = prev[nxt]
                        script.append(step_name)
                    return script[::-1]
                queue.append((nxt, depth + 1))
        return None

    def act(self, env: TextEnv, observation: str) -> str:
        assert isinstance(env, BabyAIEnv) and env.env is not None
        mission = env.mission
        if not self.script:
            return react(f"My goal is to {mission}. I check what I can do.", "check available actions")
        name = self.script.pop(0)
        return react(_thought(mission, name), name)


def _thought(mission: str, action: str) -> str:
    if action.startswith(("go to", "go through", "toggle and go through")):
        target = action.split(" ", 2)[2] if action.startswith("go to") else action.rsplit("through ", 1)[1]
        return f"My goal is to {mission}. The {target} is in sight and on my way, so I head there."
    if action.startswith("pickup"):
        return f"My goal is to {mission}. I need the {action[7:]}, so I pick it up."
    if action == "drop":
        return f"My goal is to {mission}. I put down what I carry here."
    if action == "toggle":
        return f"My goal is to {mission}. I open what is in front of me."
    return f"My goal is to {mission}. I {action} to get where I need to be."


def scan_feasible(start: int, stop: int, success_rule: str = "agentgym") -> list[int]:
    """Task ids in ``[start, stop)`` whose oracle episode succeeds within the default turn limit (the ceiling)."""
    from fedse_secure.envs.rollout import run_oracle_episode

    env, oracle = BabyAIEnv(success_rule=success_rule), BabyAIOracle()
    return [t for t in range(start, stop) if run_oracle_episode(env, oracle, t).success]


register_env("babyai", BabyAIEnv, BabyAIOracle)
