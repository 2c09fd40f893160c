from __future__ import annotations

import pytest

from fedse_secure.envs import generate_demonstrations, make_env
from fedse_secure.envs import textcraft
from fedse_secure.envs.textcraft import make_task, normalise_action, recipe_book


def test_goal_pool_matches_agentgym_rule():
    book = recipe_book()
    assert len(book.goals) == 544
    depths = [book.depth[g] for g in book.goals]
    assert min(depths) == 1 and depths == sorted(depths)


def test_first_observation_format():
    env = make_env("textcraft")
    obs = env.reset(0)
    assert obs.startswith("Crafting commands:\ncraft ")
    assert obs.endswith(f"Goal: craft {make_task(0).goal.removeprefix('minecraft:').replace('_', ' ')}.")


def test_get_craft_inventory_and_success():
    env = make_env("textcraft")
    # Find a depth-1 goal made straight from gettable items.
    book = recipe_book()
    for task_id, goal in enumerate(book.goals):
        recipe = book.item_recipes[goal][0]
        if all(n not in book.tags and n not in book.item_recipes for n, _ in recipe.inputs):
            break
    env.reset(task_id)
    assert env.step("Action: inventory").observation == "Inventory: You are not carrying anything."
    craft = recipe.text
    r = env.step(f"Action: {craft}")
    assert r.observation.startswith("Could not find enough items") and not r.done
    assert not r.info.get("invalid")  # a real command the inventory cannot pay for: failed, not invalid
    for name, n in recipe.inputs:
        r = env.step(f"Action: get {n} {name.removeprefix('minecraft:').replace('_', ' ')}")
        assert r.observation.startswith("Got ")
    r = env.step(f"Thought: ok\nAction: {craft}.")
    assert r.observation == f"Crafted {recipe.count} {goal}"
    assert (r.reward, r.done, r.success) == (1.0, True, True)


def test_cannot_get_craftable_items_and_bad_counts_fail():
    env = make_env("textcraft", parsing="lenient")
    env.reset(0)
    assert env.step("Action: get 1 oak planks").observation == "Could not find oak planks"
    env.step("Action: get 2 oak logs")
    r = env.step("Action: craft 8 oak planks using 2 oak logs")  # recipe needs exactly 1 log per craft
    assert r.observation.startswith("Could not find a valid recipe")
    assert env.step("Action: craft 4 oak planks using 1 oak logs").observation == "Crafted 4 minecraft:oak_planks"
    assert env.step("Action: look").observation.startswith("Inventory: [oak logs] (1) [oak planks] (4)")


def test_normalise_action():
    assert normalise_action("Thought: x\nAction:\nGet 2 Oak-Logs!") == "get 2 oaklogs"
    assert normalise_action("Action: craft 4 oak planks using 1 oak logs.") == "craft 4 oak planks using 1 oak logs"
    assert normalise_action("Action: look") == "inventory"
    # AgentGym's client: case kept, one Action: line only.
    assert normalise_action("Action: Get 2 Oak-Logs!", "agentgym") == "Get 2 OakLogs"
    assert normalise_action("Action: get 1 a\nAction: get 2 b", "agentgym") is None


def test_agentgym_parsing_matches_the_command_start():
    env = make_env("textcraft")
    env.reset(0)
    # The server matches the command at the start of the line, case-sensitively; "look" is no command there.
    assert env.step("Action: inventory please").observation == "Inventory: You are not carrying anything."
    r = env.step("Action: look")
    assert r.observation == "Could not execute look" and r.info["invalid"]
    assert env.step("Action: Inventory").info["invalid"]
    r = env.step("Action: get 1 oak logs\nAction: get 2 oak logs")
    assert r.observation.startswith("Error: Only one 'Action' is allowed") and r.info["invalid"]


def test_turn_limit():
    env = make_env("textcraft", max_turns=2)
    env.reset(0)
    assert not env.step("inventory").done
    assert env.step("inventory").done


def test_test_set_is_unfiltered_and_the_oracle_ceiling_is_95():
    env = make_env("textcraft")
    tests = list(env.test_task_ids())
    n = len(recipe_book().goals)
    assert tests == list(textcraft.test_ids()) == [int(i * n / 100) for i in range(100)]
    # 5 test goals need more than 20 actions even with the expert plan: the ceiling, not a filter.
    assert len(generate_demonstrations("textcraft", tests)) == 95


def test_valid_actions_cover_every_oracle_action():
    """Score and constrained modes can replay the expert: each action it takes is among the valid ones."""
    from fedse_secure.envs import make_oracle
    from fedse_secure.envs.base import extract_action

    env, oracle = make_env("textcraft"), make_oracle("textcraft")
    for task in range(0, len(recipe_book().goals), 7):
        observation = env.reset(task)
        oracle.reset(env, task)
        for _ in range(env.max_turns):
            reply = oracle.act(env, observation)
            assert extract_action(reply) in env.valid_actions(), (task, reply)
            r = env.step(reply)
            if r.done:
                break
            observation = r.observation


@pytest.mark.slow
def test_oracle_solves_every_goal_it_can():
    assert len(generate_demonstrations("textcraft", range(len(recipe_book().goals)))) == 531
