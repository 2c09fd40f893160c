from __future__ import annotations

import pytest

from fedse_secure.envs import generate_demonstrations, make_env, make_oracle
from fedse_secure.envs.maze import AGENTGYM_STARTS, GOAL, MazeEnv, shortest_path, task_spec


def test_split_sizes_and_disjoint():
    env = make_env("maze")
    test, train = list(env.test_task_ids()), list(env.train_task_ids())
    assert len(test) == 25
    assert not set(test) & set(train)
    assert [task_spec(t) for t in test] == [(GOAL, s) for s in AGENTGYM_STARTS[:25]]
    # No train task is a test episode (same goal and start).
    test_specs = {task_spec(t) for t in test}
    assert all(task_spec(t) not in test_specs for t in train)
    assert all(len(shortest_path(s, g)) <= MazeEnv.max_turns for g, s in map(task_spec, train))


def test_observation_wording_and_success():
    env = make_env("maze")
    obs = env.reset(18)  # start (7, 6), one step above the goal
    # AgentGym's client opens the first observation with the rules, a worked example and the reply format.
    assert obs.startswith(env.prompt.preamble) and "An example game:" in obs and "Thought:\n<your reasoning>" in obs
    assert obs.endswith(
        "The goal is at position 8, 6. Your current position is at position 7, 6. "
        "There are walls to your right, to your left."
    )
    assert env.conversation_start()[0]["content"] == "You are an expert at solving mazes."
    r = env.step("Thought:\ngo down.\n\nAction:\nmove down")
    assert (r.observation, r.reward, r.done, r.success) == ("Success", 1.0, True, True)


def test_agentgym_parsing_wants_the_exact_move():
    env = make_env("maze")
    env.reset(0)  # (1, 1)
    same = ("The goal is at position 8, 6. Your current position is at position 1, 1. "
            "There are walls to your left, above you, below you.")
    # LMRL-Gym needs exactly "move <direction>" after the first marker; anything else leaves the agent in place
    # and shows the same position, as AgentGym's server does.
    for near_miss in ["Action: Move right", "Action: move right.", "right", "Action: go right",
                      "Action: move right\nbecause it is open"]:
        r = env.step(near_miss)
        assert (r.observation, r.reward, r.done, r.info.get("invalid")) == (same, 0.0, False, True), near_miss
    r = env.step("Action:  move right ")
    assert "position 1, 2" in r.observation and not r.info.get("invalid")
    r = env.step("move right")  # no marker: the whole reply is the action
    assert "position 1, 3" in r.observation
    r = env.step("Action: move right\nAction: move up")  # the text up to the second marker
    assert "position 1, 4" in r.observation


def test_walls_block_and_lenient_parse():
    env = make_env("maze", parsing="lenient")
    env.reset(0)  # (1, 1)
    r = env.step("Action: Move Up.")
    assert "position 1, 1" in r.observation and r.reward == 0 and not r.done and not r.info.get("invalid")
    r = env.step("right")
    assert "position 1, 2" in r.observation


def test_invalid_action_never_raises():
    for parsing, prefix in [("lenient", "Invalid action"), ("agentgym", "The goal is at position")]:
        env = make_env("maze", parsing=parsing)
        env.reset(3)
        for junk in ["", "Action:", "jump!!", "\x00\n\n", "Action: move diagonally"]:
            r = env.step(junk)
            assert r.info.get("invalid") and r.reward == 0
            assert r.observation.startswith(prefix)


def test_turn_limit_ends_episode():
    env = make_env("maze", max_turns=3)
    env.reset(0)
    results = [env.step("move up") for _ in range(3)]
    assert [r.done for r in results] == [False, False, True]
    assert not results[-1].success


def test_oracle_solves_all_test_tasks():
    env = make_env("maze")
    demos = generate_demonstrations("maze", env.test_task_ids())
    assert len(demos) == 25
    for d in demos:
        assert d.source == "expert" and d.round == -1 and d.env == "maze"
        assert [m["role"] for m in d.messages[:3]] == ["user", "assistant", "user"]
        assert d.num_turns == len(shortest_path(task_spec(d.task_id)[1], GOAL))


def test_bad_task_id():
    with pytest.raises(ValueError, match="out of range"):
        make_env("maze").reset(10_000)
    assert make_oracle("maze") is not None
