"""Contract tests every local environment must pass (registry, determinism, robustness, demo format)."""

from __future__ import annotations

import importlib.util
import re

import pytest

from fedse_secure.envs import (
    ENVIRONMENTS,
    BatchedEnv,
    extract_action,
    generate_demonstrations,
    make_env,
    make_oracle,
    oracle_environments,
)
from fedse_secure.envs.rollout import run_oracle_episode

ENV_NAMES = oracle_environments()
_AVAILABLE = [
    n for n in ENV_NAMES if importlib.util.find_spec(f"fedse_secure.envs.{n}") is not None
]

JUNK = ["", "Action:", "Thought: hmm", "!!!@@@", "Action: \x00\x01", "Action: " + "x" * 5000, "Thought:\nAction:\n\n"]


def test_env_names():
    assert ENV_NAMES == ["babyai", "maze", "textcraft", "webshop", "wordle"]
    assert ENVIRONMENTS.names() == ["agentgym", *ENV_NAMES]


def test_unknown_env_error_lists_names():
    with pytest.raises(ValueError) as err:
        make_env("alfworld")
    msg = str(err.value)
    assert "alfworld" in msg and all(n in msg for n in ENV_NAMES)
    with pytest.raises(ValueError):
        make_oracle("nope")


def test_extract_action():
    assert extract_action("Thought: a\nAction: move up") == "move up"
    assert extract_action("Thought: a\nAction:\nmove up\nmore") == "move up"
    assert extract_action("Action: a\nThought: b\nAction: `c`") == "c"
    assert extract_action("just this\nline two") == "just this"
    assert extract_action("") == ""


def test_agentgym_client_parsers():
    """The three ways AgentGym's clients cut the action from a reply (agentenv/agentenv/envs/*.py)."""
    from fedse_secure.envs.base import agentgym_action_line, agentgym_first_split, agentgym_react_tail

    reply = "Thought:\nI go down.\n\nAction:\nmove down"
    # LMRL-Gym (Maze, Wordle): between the first and a second marker, stripped; the whole reply without one.
    assert agentgym_first_split(reply) == "move down"
    assert agentgym_first_split("Action: a\nAction: b") == "a"
    assert agentgym_first_split("  move up </s>".replace(" </s>", "</s>")) == "move up"
    # BabyAI, TextCraft: the line after the only marker, punctuation dropped; two markers are refused.
    assert agentgym_action_line(reply) == "move down"
    assert agentgym_action_line("Action: go to red-ball 1!") == "go to redball 1"
    assert agentgym_action_line("Action: a\nAction: b") is None
    assert agentgym_action_line("turn left") == ""
    # WebShop: everything after the last marker; without one, the reply if it holds search[ or click[.
    assert agentgym_react_tail("Thought: x\nAction: click[a]\nmore") == "click[a]\nmore"
    assert agentgym_react_tail("I will click[buy now]") == "I will click[buy now]"
    assert agentgym_react_tail("no action here") == ""


def _oracle_actions(name: str, task_id: int) -> list[str]:
    env, oracle = make_env(name), make_oracle(name)
    traj = run_oracle_episode(env, oracle, task_id)
    return [m["content"] for m in traj.messages if m["role"] == "assistant"]


@pytest.mark.parametrize("name", _AVAILABLE)
def test_same_task_same_actions_same_outcome(name):
    env = make_env(name)
    for task_id in list(env.test_task_ids())[:3] + list(env.train_task_ids())[:2]:
        actions = _oracle_actions(name, task_id)
        # Mix in junk so invalid-action paths are covered by the determinism check too.
        actions = actions[:1] + ["Action: nonsense"] + actions[1:]
        runs = []
        for _ in range(2):
            e = make_env(name)
            obs = [e.reset(task_id)]
            rew = []
            for a in actions:
                r = e.step(a)
                obs.append(r.observation)
                rew.append((r.reward, r.done, r.success))
                if r.done:
                    break
            runs.append((obs, rew))
        assert runs[0] == runs[1]


@pytest.mark.parametrize("name", _AVAILABLE)
def test_reset_is_reproducible_across_instances(name):
    env = make_env(name)
    ids = list(env.test_task_ids())[:3]
    assert [make_env(name).reset(t) for t in ids] == [env.reset(t) for t in ids]


@pytest.mark.parametrize("name", _AVAILABLE)
def test_junk_actions_never_raise(name):
    env = make_env(name)
    env.reset(list(env.test_task_ids())[0])
    for junk in JUNK:
        r = env.step(junk)
        assert isinstance(r.observation, str) and r.observation
        assert not r.success
        if r.done:
            break


@pytest.mark.parametrize("name", _AVAILABLE)
def test_splits(name):
    env = make_env(name)
    test, train = list(env.test_task_ids()), list(env.train_task_ids())
    expected = {"babyai": 90, "webshop": 200, "textcraft": 100, "maze": 25, "wordle": 25}[name]
    assert len(test) == expected
    assert len(train) == {"babyai": 810, "webshop": 3930, "textcraft": 444, "maze": 585, "wordle": 955}[name]
    assert not set(test) & set(train)
    # Never filtered by what the oracle can do: the first ids in task order (TextCraft: evenly over depths).
    if name != "textcraft":
        assert test == list(range(expected))


@pytest.mark.parametrize("name", _AVAILABLE)
def test_demonstration_format(name):
    """AgentGym's layout: the instruction as a user turn answered "OK", the first observation, then ReAct turns."""
    env = make_env(name)
    demos = generate_demonstrations(name, list(env.train_task_ids())[:2])
    assert demos
    for d in demos:
        assert d.source == "expert" and d.round == -1 and d.success and d.env == name
        roles = [m["role"] for m in d.messages]
        assert d.messages[:2] == env.conversation_start()
        assert roles[0] == "user" and roles[1] == "assistant" and d.messages[1]["content"].startswith(("OK", "Ok"))
        assert roles[2:] == ["user", "assistant"] * ((len(roles) - 2) // 2)
        assert d.num_turns == (len(roles) - 2) // 2
        for m in d.messages[3::2]:
            assert re.fullmatch(r"Thought:\n.+\n\nAction:\n[^\n]+", m["content"], re.DOTALL), m["content"]


@pytest.mark.parametrize("name", _AVAILABLE)
def test_prompt_file_replaces_the_wording(name, tmp_path):
    import json

    default = make_env(name)
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps({"instruction": "Custom rules.", "reply": "Sure."}))
    env = make_env(name, prompt_file=str(path))
    assert env.conversation_start() == [{"role": "user", "content": "Custom rules."},
                                        {"role": "assistant", "content": "Sure."}]
    task = list(env.test_task_ids())[0]
    assert env.reset(task) == default.reset(task)  # the preamble was not replaced
    for bad, message in [("[]", "must be a JSON object"), ('{"system": "x"}', "must be a JSON object"),
                         ("not json", "not readable JSON")]:
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            make_env(name, prompt_file=str(path))
    with pytest.raises(ValueError, match="does not exist"):
        make_env(name, prompt_file=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="parsing must be one of agentgym, lenient"):
        make_env(name, parsing="strict")


@pytest.mark.parametrize("name", _AVAILABLE)
def test_batched_matches_single(name):
    env = make_env(name)
    ids = list(env.test_task_ids())[:4]
    batch = BatchedEnv([make_env(name) for _ in ids])
    oracles = [make_oracle(name) for _ in ids]
    obs = batch.reset(ids)
    for o, e, t in zip(oracles, batch.envs, ids):
        o.reset(e, t)
    live = [True] * len(ids)
    batched_rewards = [0.0] * len(ids)
    for _ in range(env.max_turns):
        acts = [o.act(e, ob) if alive else None for o, e, ob, alive in zip(oracles, batch.envs, obs, live)]
        results = batch.step(acts)
        for i, r in enumerate(results):
            if r is None:
                continue
            obs[i] = r.observation
            batched_rewards[i] = r.reward
            live[i] = not r.done
        if not any(live):
            break
    single = [run_oracle_episode(make_env(name), make_oracle(name), t).reward for t in ids]
    assert batched_rewards == single


def test_make_env_option_errors():
    with pytest.raises(ValueError, match="does not accept option.*colour"):
        make_env("maze", colour="red")
    with pytest.raises(ValueError, match="needs option.*server_url"):
        make_env("agentgym")
    assert make_env("maze", max_turns=5).max_turns == 5


def test_observations_identical_across_processes():
    """Task generation must not depend on hash randomisation or process state."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json\nfrom fedse_secure.envs import make_env, oracle_environments\n"
        "out = {}\n"
        "for n in oracle_environments():\n"
        "    e = make_env(n)\n"
        "    t = list(e.test_task_ids())[-1]\n"
        "    out[n] = [e.reset(t), e.step('Action: look').observation]\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    for n in ENV_NAMES:
        e = make_env(n)
        t = list(e.test_task_ids())[-1]
        assert other[n] == [e.reset(t), e.step("Action: look").observation], n


@pytest.mark.parametrize("parsing", ["agentgym", "lenient"])
@pytest.mark.parametrize("name", _AVAILABLE)
def test_valid_actions_are_literal_and_accepted(name, parsing):
    """Every environment enumerates its valid actions (score and constrained modes need them), each accepted as
    the action of an AgentGym-layout reply, at every state of the first turns of oracle episodes."""
    from fedse_secure.envs.base import react

    env, oracle = make_env(name, parsing=parsing), make_oracle(name)
    for task in list(env.test_task_ids())[:2]:
        observation = env.reset(task)
        oracle.reset(env, task)
        history: list[str] = []
        for _ in range(4):
            actions = env.valid_actions()
            assert actions and len(set(actions)) == len(actions)
            space = env.action_space()
            assert all(space.accepts(a) for a in space.literals)
            sample = actions if len(actions) <= 30 else actions[:: len(actions) // 20]
            for a in sample:
                probe = make_env(name, parsing=parsing)
                probe.reset(task)
                for past in history:  # the same state as env's
                    probe.step(past)
                assert not probe.step(react("x", a)).info.get("invalid"), a
            reply = oracle.act(env, observation)
            on_search_page = name == "webshop" and env.page == "search"  # free-text keywords
            assert on_search_page or extract_action(reply) in actions
            history.append(reply)
            result = env.step(reply)
            if result.done:
                break
            observation = result.observation


def test_configs_check_option_values_before_building_anything():
    from fedse_secure.config import ConfigError, parse_config

    def client(env, options):
        return {"model": {"name_or_path": "tiny-llama"}, "federation": {"secure_aggregation": "none"},
                "clients": [{"name": "a", "env": env, "env_options": options}]}

    for env, options, message in [
        ("babyai", {"success_rule": "reward == 1"}, "success_rule must be one of agentgym, any_step"),
        ("wordle", {"vocabulary": "tweets"}, "vocabulary must be one of agentgym, full"),
        ("webshop", {"catalogue": "amazon"}, "catalogue must be one of realistic, simple"),
        ("maze", {"parsing": "strict"}, "parsing must be one of agentgym, lenient"),
        ("maze", {"max_turns": 0}, "max_turns must be an integer >= 1"),
        ("textcraft", {"prompt_file": "/no/such/prompt.json"}, "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(client(env, options))
    assert parse_config(client("babyai", {"success_rule": "any_step", "parsing": "lenient"}))
