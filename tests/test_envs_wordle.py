from __future__ import annotations

import numpy as np
import pytest

from fedse_secure.envs import generate_demonstrations, make_env
from fedse_secure.envs.wordle import (
    AGENTGYM_WORDS,
    N_TRIES,
    _feedback_matrix,
    feedback,
    guess_vocab,
    parse_guess,
    solutions,
    task_word,
    vocabulary,
)


def test_word_lists_shipped():
    assert len(solutions()) == 2315 and len(guess_vocab()) >= 12_900
    assert set(solutions()) <= guess_vocab()
    # AgentGym's 40-word vocabulary (LMRL-Gym's tweet_words.txt) is part of the official solution list.
    assert len(AGENTGYM_WORDS) == len(set(AGENTGYM_WORDS)) == 40 and set(AGENTGYM_WORDS) <= set(solutions())


def test_agentgym_vocabulary_is_the_game_and_the_prompt():
    env = make_env("wordle")
    first = env.reset(0)
    # AgentGym's client lists the vocabulary in the first observation, one word per line.
    assert "\n".join(AGENTGYM_WORDS) in first and "{{vocab}}" not in first
    assert env.conversation_start()[0]["content"] == "You are an expert Wordle player."
    import random

    assert env.hidden == random.Random(0).choice(AGENTGYM_WORDS)  # LMRL-Gym's first draw for seed 0
    assert {env.vocab.task_word(t) for t in range(980)} <= set(AGENTGYM_WORDS)
    assert env.valid_actions() == [" ".join(w) for w in sorted(AGENTGYM_WORDS)]
    r = env.step("Action:\nc r a n e")  # an English word, but not in the game's vocabulary
    assert r.observation == "invalid word" and r.info["invalid"]
    full = make_env("wordle", vocabulary="full")
    assert "\n".join(AGENTGYM_WORDS) not in full.reset(0) and len(full.valid_actions()) == len(guess_vocab())
    with pytest.raises(ValueError, match="vocabulary must be one of agentgym, full"):
        make_env("wordle", vocabulary="tweets")


@pytest.mark.parametrize(
    "guess,hidden,marks",
    [
        ("crane", "crane", "ggggg"),
        ("speed", "abide", "bbyby"),  # second e is not yellow: only one e left unmatched
        ("eerie", "there", "ybybg"),
        ("llama", "allay", "ygyby"),
        ("geese", "eerie", "bgybg"),
    ],
)
def test_feedback_repeated_letters(guess, hidden, marks):
    assert feedback(guess, hidden) == marks


def test_vectorised_feedback_matches_scalar():
    words, matrix = solutions(), _feedback_matrix()
    rng = np.random.default_rng(0)
    for i, j in rng.integers(0, len(words), size=(3000, 2)):
        code = 0
        for m in feedback(words[i], words[j]):
            code = code * 3 + "byg".index(m)
        assert matrix[i, j] == code


def test_parse_guess():
    assert parse_guess("Thought: x\nAction: s h i r e") == "shire"
    assert parse_guess('Action: "SHIRE".') == "shire"
    assert parse_guess("Action: try crane") == "crane"
    assert parse_guess("Action: s h i r") is None
    assert parse_guess("Action: crane or slate") is None
    # AgentGym: the text after the first marker, spaces removed, must be five lower-case letters.
    assert parse_guess("Thought:\nx\n\nAction:\ns h i r e", "agentgym") == "shire"
    assert parse_guess("Action: shire", "agentgym") == "shire"
    assert parse_guess("Action: S H I R E", "agentgym") is None
    assert parse_guess('Action: "shire".', "agentgym") is None
    assert parse_guess("Action: s h i r e\nbecause", "agentgym") is None


def test_episode_mechanics():
    env = make_env("wordle", vocabulary="full")
    assert "Wordle" in env.reset(0)
    hidden = task_word(0)
    other = next(w for w in solutions() if w != hidden)
    r = env.step(f"Action: {' '.join(other)}")
    assert r.observation == " ".join(feedback(other, hidden)) and r.reward == 0 and not r.done
    r = env.step("Action: x x x x x")
    assert r.observation == "invalid word" and r.info["invalid"]
    r = env.step(f"Action: {hidden}")
    assert (r.observation, r.reward, r.done, r.success) == ("g g g g g", 1.0, True, True)


def test_six_attempts_including_invalid():
    env = make_env("wordle", vocabulary="full")
    env.reset(3)
    results = [env.step("Action: zzzzz") for _ in range(N_TRIES)]
    assert [r.done for r in results] == [False] * 5 + [True]
    assert not results[-1].success


@pytest.mark.parametrize("vocab", ["agentgym", "full"])
def test_oracle_solves_all_test_tasks(vocab):
    env = make_env("wordle", vocabulary=vocab)
    demos = generate_demonstrations("wordle", env.test_task_ids(), vocabulary=vocab)
    assert len(demos) == 25 and all(d.num_turns <= N_TRIES for d in demos)


def test_oracle_solves_every_agentgym_task():
    env = make_env("wordle")
    ids = list(env.test_task_ids()) + list(env.train_task_ids())
    assert len(generate_demonstrations("wordle", ids)) == len(ids) == 980
    assert vocabulary("agentgym").n_tasks() == 980


@pytest.mark.slow
def test_oracle_solves_every_word():
    env = make_env("wordle", vocabulary="full")
    ids = list(env.test_task_ids()) + list(env.train_task_ids())
    assert len(generate_demonstrations("wordle", ids, vocabulary="full")) == len(ids) == 2315
