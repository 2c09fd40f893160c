from __future__ import annotations

from fedse_secure.envs import generate_demonstrations, make_env
from fedse_secure.envs.webshop import parse_action, purchase_reward, satisfies, type_reward
from fedse_secure.envs.webshop_catalog import catalogue


def test_catalogue_and_goals_deterministic():
    c = catalogue()
    assert len(c.products) == len({p.asin for p in c.products}) >= 900
    g1, g2 = c.goal(7), c.goal(7)
    assert g1 == g2 and g1.instruction.endswith("dollars")
    assert satisfies(c.by_asin[g1.target_asin], g1)


def test_bm25_ranks_matching_products_first():
    c = catalogue()
    results = c.search("sulfate free shampoo")
    assert 0 < len(results) <= 50
    assert results[0].product_type == "shampoo" and "sulfate free" in results[0].attributes


def test_reward_rule():
    c = catalogue()
    goal = c.goal(0)
    target = c.by_asin[goal.target_asin]
    assert purchase_reward(target, goal, dict(goal.options)) == 1.0
    # No options selected: loses exactly the option share.
    n = len(goal.attributes) + len(goal.options) + 1
    assert purchase_reward(target, goal, {}) == round((n - len(goal.options)) / n, 4)
    other = next(p for p in c.products if p.department != target.department)
    assert type_reward(other, goal) == 0.0


def test_page_flow_and_invalid_actions():
    env = make_env("webshop")
    obs = env.reset(0)
    assert obs.startswith("WebShop [SEP] Instruction: [SEP] ") and obs.endswith("[SEP] Search")
    r = env.step("Action: click[buy now]")
    assert r.observation.startswith("Invalid action.") and r.info["invalid"] and not r.done
    r = env.step("Thought: go\nAction: search[shampoo]")
    assert "Page 1 (Total results: " in r.observation and "Next >" in r.observation
    r = env.step("Action: search[shampoo]")
    assert r.info.get("invalid")  # search only exists on the search page
    asin = env.results[0].asin
    r = env.step(f"Action: click[{asin}]")
    assert "Buy Now" in r.observation and "Price: $" in r.observation
    r = env.step("Action: click[Description]")
    assert "< Prev" in r.observation
    env.step("Action: click[< Prev]")
    r = env.step("Action: click[buy now]")
    assert r.done and 0 <= r.reward <= 1 and r.observation.startswith("Thank you for shopping with us!")


def test_parse_action():
    assert parse_action("Thought: x\nAction: search[red shoes]") == ("search", "red shoes")
    assert parse_action("Action: I will click[Buy Now] now") == ("click", "Buy Now")
    assert parse_action("Action: buy it") is None


def test_turn_limit():
    env = make_env("webshop", max_turns=2)
    env.reset(1)
    assert not env.step("x").done and env.step("x").done


def test_oracle_solves_all_test_tasks():
    env = make_env("webshop")
    demos = generate_demonstrations("webshop", env.test_task_ids())
    assert len(demos) == 200 and all(d.reward == 1.0 for d in demos)


def test_oracle_with_webshops_own_page_size():
    demos = generate_demonstrations("webshop", range(200), results_per_page=10)
    assert len(demos) == 200
