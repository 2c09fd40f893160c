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
    assert obs == (
        "The goal is at position 8, 6. Your current position is at position 7, 6. "
        "There are walls to your right, to your left."
    )
    r = env.step("Thought: go down.\nAction: move down")
    assert (r.observation, r.reward, r.done, r.success) == ("Success", 1.0, True, True)


def test_walls_block_and_lenient_parse():
    env = make_env("maze")
    env.reset(0)  # (1, 1)
    r = env.step("Action: Move Up.")
    assert "position 1, 1" in r.observation and r.reward == 0 and not r.done
    r = env.step("right")
    assert "position 1, 2" in r.observation


def test_invalid_action_never_raises():
    env = make_env("maze")
    env.reset(3)
    for junk in ["", "Action:", "jump!!", "\x00\n\n", "Action: move diagonally"]:
        r = env.step(junk)
        assert r.info.get("invalid") and r.reward == 0
        assert r.observation.startswith("Invalid action")


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
        assert d.messages[0]["role"] == "system" and d.messages[1]["role"] == "user"
        assert d.num_turns == len(shortest_path(task_spec(d.task_id)[1], GOAL))


def test_bad_task_id():
    with pytest.raises(ValueError, match="out of range"):
        make_env("maze").reset(10_000)
    assert make_oracle("maze") is not None
