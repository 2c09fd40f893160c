"""LMRL-Gym's double-T maze as AgentGym serves it (``agentenv-lmrlgym`` maze).

Facts kept from the reference: the 10x13 double-T layout, the goal at (8, 6) (row, column), AgentGym's 26 start
positions in their order (the 26th is the goal cell itself, which LMRL-Gym rejects, so 25 are playable), actions
``move up/down/left/right``, observations "The goal is at position 8, 6. Your current position is at position r, c.
There are walls ...", reward 1 on reaching the goal and 0 otherwise, and the ``Success`` observation at the goal.

Conversation (AgentGym's ``MazeEnvClient``): the instruction turn is one sentence; the rules, a worked example, the
four actions and the reply format open the first observation. Written here in our own words with a shorter worked
example; ``prompt_file`` plugs in AgentGym's exact text. (The paper's own Maze prompt, its Table 5, is a few-shot
prompt with explicit row/column offsets; the oracle's thoughts reason the same way.)

Parsing. ``agentgym``: the client keeps the text between the first ``Action:`` and the next one, stripped, and
LMRL-Gym accepts only an exact ``move up``/``move down``/``move left``/``move right``; anything else leaves the
agent where it is and answers the same position description (a turn is used). ``lenient``: the first line after
the last ``Action:``, any case and punctuation, "up" alone or "go up"; anything else answers "Invalid action."
with the actions.

Split. AgentGym evaluates on the start positions and its AgentTraj demonstrations come from the same maze and
goal, so train and test overlap there. Here the test set is the 25 playable AgentGym starts (task ids 0..24, the
paper's 25 test tasks) and the train pool is disjoint: the same maze with every *other* free cell as the goal and
every remaining cell as the start, kept when the shortest path fits the 15-turn limit (task ids 25..609,
585 tasks, shuffled deterministically so that any prefix is diverse). Goal and position are in every observation,
so what is learnt on the train pool (read the goal, move towards it around walls) is exactly the skill the test
needs, without leaking test episodes into training.
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Sequence
from functools import lru_cache

from fedse_secure.envs import register_env
from fedse_secure.envs.base import Oracle, Prompt, StepResult, TextEnv, agentgym_first_split, extract_action, react

_LAYOUT = (
    "#############",
    "#.....#.....#",
    "###.#####.###",
    "###.#####.###",
    "###.#####.###",
    "###.......###",
    "######.######",
    "######.######",
    "######.######",
    "#############",
)
GOAL = (8, 6)
#: AgentGym's start positions, in its order (index = AgentGym game id).
AGENTGYM_STARTS: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 7), (1, 8), (1, 9), (1, 10), (1, 11),
    (2, 3), (3, 3), (4, 3), (5, 3), (5, 4), (5, 5), (5, 6), (6, 6), (7, 6),
    (5, 7), (5, 8), (5, 9), (4, 9), (3, 9), (2, 9), (8, 6),
)  # fmt: skip
TEST_STARTS = tuple(p for p in AGENTGYM_STARTS if p != GOAL)
MOVES: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
ACTIONS = tuple(f"move {d}" for d in MOVES)
LENIENT_INVALID = 'Invalid action. Your possible actions are "move up", "move down", "move left", "move right". '
#: LMRL-Gym's internal step cap; the agent-side turn limit (max_turns) is tighter.
ENV_STEP_CAP = 50

_WALL_ORDER = (("to your right", (0, 1)), ("to your left", (0, -1)), ("above you", (-1, 0)), ("below you", (1, 0)))
_ACTION_RE = re.compile(r"\b(?:move\s+|go\s+)?(up|down|left|right)\b")

def is_free(cell: tuple[int, int]) -> bool:
    r, c = cell
    return 0 <= r < len(_LAYOUT) and 0 <= c < len(_LAYOUT[0]) and _LAYOUT[r][c] == "."


FREE_CELLS: tuple[tuple[int, int], ...] = tuple(
    (r, c) for r in range(len(_LAYOUT)) for c in range(len(_LAYOUT[0])) if is_free((r, c))
)


@lru_cache(maxsize=1)
def _train_pairs() -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    # Only pairs solvable within the default turn limit: a demonstration must be able to succeed.
    pairs = [
        (g, s)
        for g in FREE_CELLS
        if g != GOAL
        for s in FREE_CELLS
        if s != g and len(shortest_path(s, g)) <= MazeEnv.max_turns
    ]
    random.Random(20251208).shuffle(pairs)
    return tuple(pairs)


def task_spec(task_id: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(goal, start) for a task id; ids 0..24 are AgentGym's test starts, 25.. the train pool."""
    if not isinstance(task_id, int) or task_id < 0:
        raise ValueError(f"maze task id must be a non-negative int, got {task_id!r}")
    if task_id < len(TEST_STARTS):
        return GOAL, TEST_STARTS[task_id]
    pairs = _train_pairs()
    k = task_id - len(TEST_STARTS)
    if k >= len(pairs):
        raise ValueError(f"maze task id {task_id} out of range: valid ids are 0..{len(TEST_STARTS) + len(pairs) - 1}")
    return pairs[k]


def describe(position: tuple[int, int], goal: tuple[int, int]) -> str:
    walls = [name for name, (dr, dc) in _WALL_ORDER if not is_free((position[0] + dr, position[1] + dc))]
    if not walls:
        wall_text = "There are no walls near you."
    elif len(walls) == 1:
        wall_text = f"There is a wall {walls[0]}."
    else:
        wall_text = f"There are walls {', '.join(walls)}."
    return (
        f"The goal is at position {goal[0]}, {goal[1]}. "
        f"Your current position is at position {position[0]}, {position[1]}. {wall_text}"
    )


def _worked_example() -> str:
    """A short game in the rules' format, rendered by the environment itself so it can never disagree with it."""
    lines, position = [], (5, 4)
    for move in ("right", "up", "right", "down", "down", "down"):
        lines.append(f"environment: {describe(position, GOAL)}")
        lines.append(f"action: move {move}")
        nxt = (position[0] + MOVES[move][0], position[1] + MOVES[move][1])
        position = nxt if is_free(nxt) else position
    lines.append("environment: Success")
    return "\n".join(lines)


INSTRUCTION = "You are an expert at solving mazes."
PREAMBLE = (
    "Reach the goal in as few moves as possible. Every turn you are told where the goal is, where you are, and "
    "which of the four cells next to you are walls.\n\n"
    "Positions are (row, column): \"move down\" adds 1 to the row and \"move right\" adds 1 to the column. "
    "Moving into a wall leaves you where you are.\n\n"
    "An example game:\n```\n" + _worked_example() + "\n```\n\n"
    'The actions are "move up", "move down", "move left" and "move right". Reply in exactly this format:\n'
    "Thought:\n<your reasoning>\n\nAction:\n<one action>\n\n"
    "A new game starts now. Give your reasoning and the best move for this state:"
)


def parse_move(action_text: str, parsing: str = "agentgym") -> str | None:
    """The direction of the model's reply, else None.

    ``agentgym``: exactly "move <direction>" after the first ``Action:``. ``lenient``: any of "Action: move up",
    "up", "Move Up.".
    """
    if parsing == "agentgym":
        action = agentgym_first_split(action_text)
        return action[5:] if action in ACTIONS else None
    action = extract_action(action_text).lower()
    m = _ACTION_RE.search(action)
    return m.group(1) if m else None


class MazeEnv(TextEnv):
    name = "maze"
    max_turns = 15
    default_prompt = Prompt(INSTRUCTION, preamble=PREAMBLE)

    def __init__(self, max_turns: int | None = None, parsing: str = "agentgym", prompt_file: str | None = None):
        self._configure(max_turns, parsing, prompt_file)
        self.goal: tuple[int, int] = GOAL
        self.position: tuple[int, int] | None = None
        self.turns = 0
        self.done = True

    def reset(self, task_id: int) -> str:
        self.goal, self.position = task_spec(task_id)
        self.task_id = task_id
        self.turns = 0
        self.done = False
        return self.prompt.first_observation(describe(self.position, self.goal))

    def step(self, action_text: str) -> StepResult:
        if self.position is None:
            raise RuntimeError("MazeEnv.step called before reset(task_id)")
        if self.done:
            return StepResult("The episode is over; call reset(task_id).", 0.0, True, False, {"invalid": True})
        self.turns += 1
        direction = parse_move(action_text, self.parsing)
        out_of_turns = self.turns >= min(self.max_turns, ENV_STEP_CAP)
        if direction is None:
            self.done = out_of_turns
            obs = describe(self.position, self.goal)
            if self.parsing == "lenient":
                obs = LENIENT_INVALID + obs
            return StepResult(obs, 0.0, self.done, False, {"invalid": True, "turns": self.turns})
        dr, dc = MOVES[direction]
        nxt = (self.position[0] + dr, self.position[1] + dc)
        if is_free(nxt):
            self.position = nxt
        if self.position == self.goal:
            self.done = True
            return StepResult("Success", 1.0, True, True, {"turns": self.turns})
        self.done = out_of_turns
        return StepResult(describe(self.position, self.goal), 0.0, self.done, False, {"turns": self.turns})

    def valid_actions(self) -> list[str]:
        return list(ACTIONS)

    def train_task_ids(self) -> Sequence[int]:
        return range(len(TEST_STARTS), len(TEST_STARTS) + len(_train_pairs()))

    def test_task_ids(self) -> Sequence[int]:
        return range(len(TEST_STARTS))


def shortest_path(start: tuple[int, int], goal: tuple[int, int]) -> list[str]:
    """Directions of one shortest path (BFS; ties broken in a fixed order so demos are deterministic)."""
    prev: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            break
        for d, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if is_free(nxt) and nxt not in prev:
                prev[nxt] = (cell, d)
                queue.append(nxt)
    if goal not in prev:
        raise ValueError(f"goal {goal} unreachable from {start}")
    path: list[str] = []
    cell = goal
    while prev[cell] is not None:
        cell, d = prev[cell]  # type: ignore[misc]
        path.append(d)
    return path[::-1]


class MazeOracle(Oracle):
    """BFS over the known layout; the thought states the row/column offsets, as the paper's Maze prompt does."""

    def reset(self, env: TextEnv, task_id: int) -> None:
        if not isinstance(env, MazeEnv):
            raise TypeError(f"MazeOracle plays MazeEnv, got {type(env).__name__}")

    def act(self, env: TextEnv, observation: str) -> str:
        assert isinstance(env, MazeEnv) and env.position is not None
        (r, c), (gr, gc) = env.position, env.goal
        path = shortest_path(env.position, env.goal)
        move = path[0] if path else "down"
        dr, dc = gr - r, gc - c
        rows = f"{abs(dr)} row{'s' if abs(dr) != 1 else ''} {'down' if dr >= 0 else 'up'}"
        cols = f"{abs(dc)} column{'s' if abs(dc) != 1 else ''} {'right' if dc >= 0 else 'left'}"
        thought = f"The goal is {rows} and {cols}. The open path goes {move}, {len(path)} steps to go."
        return react(thought, f"move {move}")


register_env("maze", MazeEnv, MazeOracle)
