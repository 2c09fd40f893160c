"""Playing an environment with an oracle and recording the episode in the training chat format."""

from __future__ import annotations

from fedse_secure.envs.base import Oracle, TextEnv
from fedse_secure.envs.trajectory import Trajectory


def run_oracle_episode(env: TextEnv, oracle: Oracle, task_id: int, max_turns: int | None = None) -> Trajectory:
    """One episode of ``oracle`` on ``task_id`` as an expert trajectory (``source="expert"``, ``round=-1``).

    The episode ends when the environment says done or after ``max_turns`` (default: the environment's own).
    """
    limit = max_turns if max_turns is not None else env.max_turns
    observation = env.reset(task_id)
    oracle.reset(env, task_id)
    messages = [*env.conversation_start(), {"role": "user", "content": observation}]
    reward, success, steps = 0.0, False, 0
    for _ in range(limit):
        reply = oracle.act(env, observation)
        result = env.step(reply)
        steps += 1
        messages.append({"role": "assistant", "content": reply})
        reward, success = result.reward, result.success
        if result.done:
            break
        observation = result.observation
        messages.append({"role": "user", "content": observation})
    return Trajectory(
        env=env.name,
        task_id=task_id,
        messages=messages,
        reward=float(reward),
        success=bool(success),
        source="expert",
        round=-1,
        info={"steps": steps},
    )
