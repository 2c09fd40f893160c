from __future__ import annotations

import threading

import pytest

from fedse_secure.envs import make_env, make_oracle
from fedse_secure.envs.agentgym import AgentGymHTTPEnv, normalise_for
from fedse_secure.envs.agentgym_server import make_server


@pytest.fixture(scope="module")
def server_url():
    server = make_server(envs=("maze", "wordle", "webshop", "textcraft"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", ["maze", "wordle", "webshop", "textcraft"])
def test_remote_matches_local(server_url, name):
    remote = make_env("agentgym", server_url=f"{server_url}/{name}", env_name=name)
    assert isinstance(remote, AgentGymHTTPEnv)
    # `shadow` is a local twin the oracle reads privileged state from; `local` is the reference.
    local, shadow, oracle = make_env(name), make_env(name), make_oracle(name)
    task = list(local.test_task_ids())[1]
    observation = local.reset(task)
    assert remote.reset(task) == observation
    shadow.reset(task)
    oracle.reset(shadow, task)
    for _ in range(local.max_turns):
        reply = oracle.act(shadow, observation)
        r_local, r_remote = local.step(reply), remote.step(reply)
        shadow.step(reply)
        assert (r_remote.observation, r_remote.reward, r_remote.done) == (
            r_local.observation,
            r_local.reward,
            r_local.done,
        )
        observation = r_local.observation
        if r_local.done:
            assert r_remote.success == r_local.success is True
            break
    # The server reports an error for stepping a finished task; the adapter ends the episode gracefully.
    assert remote.step("Action: anything").done


def test_server_error_ends_episode(server_url):
    remote = AgentGymHTTPEnv(f"{server_url}/maze", "maze")
    with pytest.raises(ValueError, match="rejected task"):
        remote.reset(10_000)


def test_unreachable_server_is_a_clear_error():
    env = AgentGymHTTPEnv("http://127.0.0.1:9/maze", "maze", timeout=2)
    with pytest.raises(ConnectionError, match="cannot reach the AgentGym server"):
        env.reset(0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="http"):
        AgentGymHTTPEnv("localhost:1", "maze")
    with pytest.raises(ValueError, match="unknown AgentGym protocol option"):
        AgentGymHTTPEnv("http://x", "maze", reset_field="x")
    with pytest.raises(ValueError, match="no local oracle"):
        make_oracle("agentgym")


def test_normalisation_like_agentgym_clients():
    assert normalise_for("maze", "Thought: hm\nAction: up") == "move up"
    assert normalise_for("wordle", "Action: crane") == "c r a n e"
    assert normalise_for("textcraft", "Action: get 1 oak-logs!") == "get 1 oaklogs"
