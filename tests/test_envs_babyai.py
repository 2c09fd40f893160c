from __future__ import annotations

import pytest

from fedse_secure.envs import generate_demonstrations, make_env
from fedse_secure.envs.babyai import LEVELS, TEST_IDS, normalise_action, scan_feasible


def test_task_mapping_follows_agentgym():
    env = make_env("babyai")
    obs = env.reset(41)
    assert env.level == LEVELS[1] and env.seed == 1
    assert obs.startswith(f"Your goal: {env.mission}\n")
    assert '\nAvailable actions: ["turn left", "turn right"' in obs
    assert len(LEVELS) == 40
    assert LEVELS[0] == "BabyAI-GoToRedBallGrey-v0" and LEVELS[-1] == "BabyAI-BossLevelNoUnlock-v0"


def test_split():
    env = make_env("babyai")
    assert TEST_IDS == tuple(range(90)) and max(TEST_IDS) < min(env.train_task_ids())
    assert len(env.train_task_ids()) == 810


def test_description_and_primitive_actions():
    env = make_env("babyai")
    obs = env.reset(0)
    assert "You are not carrying anything." in obs
    before = (tuple(env.env.agent_pos), env.env.agent_dir)
    r = env.step("Thought: look around\nAction: turn left")
    assert (tuple(env.env.agent_pos), env.env.agent_dir) == (before[0], (before[1] - 1) % 4)
    assert not r.done and r.reward == 0 and "Available actions" in r.observation


def test_invalid_and_check_actions():
    env = make_env("babyai")
    env.reset(3)
    r = env.step("Action: fly to the moon")
    assert r.observation.startswith("The action is not recognized. Please check valid actions.") and r.info["invalid"]
    r = env.step("Action: check available actions")
    assert r.observation.startswith("You can take the following actions: turn left, turn right")


def test_go_to_macro_solves_goto_level():
    env = make_env("babyai")
    env.reset(0)  # go to the red ball
    target = next(a for a in env.valid_actions() if a.startswith("go to red ball"))
    r = env.step(f"Action: {target}")
    assert r.done and r.success and 0 < r.reward < 1
    assert r.observation.rstrip().endswith("The task is completed.")


def test_normalise_action():
    assert normalise_action("Action: Pick up the_red ball 1.") == "pickup the red ball 1"
    assert normalise_action("Action: check") == "check available actions"
    # AgentGym's client drops punctuation (underscores too) and keeps one Action: line; its server lower-cases.
    assert normalise_action("Action: Pickup the_red ball 1.", "agentgym") == "pickup thered ball 1"
    assert normalise_action("Action: turn left\nAction: turn right", "agentgym") is None


def test_agentgym_names_and_messages():
    env = make_env("babyai")
    obs = env.reset(16)  # Pickup
    assert any(a.startswith("pickup ") for a in env.valid_actions()) and '"pickup ' in obs
    r = env.step("Action: pick up " + next(a for a in env.valid_actions() if a.startswith("pickup "))[7:])
    assert r.info["invalid"]  # AgentGym's server only knows "pickup"
    assert env.step("Action: please check").observation.startswith("You can take the following actions:")
    assert env.step("no marker").observation.startswith("No change in state.")
    r = env.step("Action: turn left\nAction: turn right")
    assert r.observation.startswith("Error: Only one 'Action' is allowed") and r.info["invalid"]


#: Test tasks the oracle cannot finish in 20 AgentGym actions (long exploration with a 7x7 view, or levels
#: minigrid's BabyAIBot cannot solve): the oracle's ceiling on the unfiltered test set is 71/90.
ORACLE_MISSES = (6, 15, 17, 22, 23, 25, 27, 31, 36, 38, 39, 46, 47, 55, 62, 63, 65, 71, 77)


def test_oracle_on_first_test_tasks():
    demos = generate_demonstrations("babyai", TEST_IDS[:30])
    assert [d.task_id for d in demos] == [t for t in TEST_IDS[:30] if t not in ORACLE_MISSES]
    assert all(d.num_turns <= 20 and 0 < d.reward < 1 for d in demos)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["agentgym", "any_step"])
def test_oracle_ceiling_on_the_test_set(rule):
    assert tuple(scan_feasible(0, 90, success_rule=rule)) == tuple(t for t in TEST_IDS if t not in ORACLE_MISSES)


@pytest.mark.parametrize("rule,success", [("agentgym", False), ("any_step", True)])
def test_success_rule(rule, success):
    """'toggle and go through' opens the door, then steps through it: the mission's reward comes on the toggle,
    not on the action's last primitive, which is the only one AgentGym's server keeps."""
    env = make_env("babyai", success_rule=rule)
    env.reset(12)  # OpenRedDoor: "open the red door"
    r = env.step("Action: toggle and go through red closed door 1")
    assert (r.success, r.done) == (success, success) and (r.reward > 0) == success
    with pytest.raises(ValueError, match="success_rule must be one of agentgym, any_step"):
        make_env("babyai", success_rule="reward == 1")


def test_bot_that_never_returns_is_cut_off():
    # On this seed minigrid's BabyAIBot loops forever inside one replan; the oracle must give up, not hang.
    env = make_env("babyai")
    demos = generate_demonstrations("babyai", [708])
    assert demos == [] and env.reset(708).startswith("Your goal:")
