from __future__ import annotations

import pytest

from fedse_secure.envs import generate_demonstrations, make_env
from fedse_secure.envs.webshop import heuristic_episode, parse_action, purchase_reward, satisfies, type_reward
from fedse_secure.envs.webshop_catalog import catalogue


@pytest.mark.parametrize("name", ["realistic", "simple"])
def test_catalogue_and_goals_deterministic(name):
    c = catalogue(name)
    assert len(c.products) == len({p.asin for p in c.products}) >= 900
    g1, g2 = c.goal(7), c.goal(7)
    assert g1 == g2 and g1.instruction.endswith("dollars")
    assert satisfies(c.by_asin[g1.target_asin], g1)


def test_realistic_goals_have_real_webshops_shape():
    """2-15 attributes per goal, hundreds of distinct ones, every option group asked for, and near-duplicates
    that miss the goal by an option value or the price."""
    c = catalogue("realistic")
    goals = [c.goal(t) for t in range(4130)]
    counts = [len(g.attributes) for g in goals]
    assert min(counts) == 2 and max(counts) == 15 and sum(counts) / len(counts) < 5
    assert len({a for g in goals for a in g.attributes}) >= 350
    for g in goals[:200]:
        target = c.by_asin[g.target_asin]
        assert [group for group, _ in g.options] == [group for group, _ in target.options]
        siblings = [c.by_asin[a] for a in c.families[c.family_of[target.asin]].members if a != target.asin]
        assert len(siblings) >= 8 and all(set(g.attributes) <= set(s.attributes) for s in siblings)
        assert not any(satisfies(s, g) for s in siblings)  # each fails on an option value or the price


def test_bm25_ranks_matching_products_first():
    c = catalogue("simple")
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


@pytest.mark.parametrize("parsing", ["agentgym", "lenient"])
def test_page_flow_and_invalid_actions(parsing):
    env = make_env("webshop", parsing=parsing)
    obs = env.reset(0)
    assert obs.startswith("WebShop [SEP] Instruction: [SEP] ") and obs.endswith("[SEP] Search")
    assert env.conversation_start()[1]["content"] == "Ok."  # AgentGym's WebShop client answers "Ok."
    r = env.step("Action: click[buy now]")
    # WebShop shows the same page again; lenient parsing says why.
    expected = ("Invalid action.\n\n" if parsing == "lenient" else "") + obs
    assert r.observation == expected and r.info["invalid"] and not r.done
    r = env.step("Thought:\ngo\n\nAction:\nsearch[shampoo]")
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
    # WebShop reads name[argument] at the start of what follows the last "Action:" (AgentGym's client).
    assert parse_action("Thought:\nx\n\nAction:\nsearch[red shoes]", "agentgym") == ("search", "red shoes")
    assert parse_action("Action: I will click[Buy Now] now", "agentgym") == ("I will click", "Buy Now")
    assert parse_action("click[buy now]", "agentgym") == ("click", "buy now")  # no marker: the reply itself
    assert parse_action("Action: buy it", "agentgym") is None


def test_search_page_action_space_is_free_text():
    env = make_env("webshop")
    env.reset(3)
    space = env.action_space()
    assert space.slots == (("search[", "]"),) and not space.literals
    assert space.accepts("search[red shoes]") and not space.accepts("search[]") and not space.accepts("search[a]b]")
    assert env.valid_actions()[0].startswith("search[")  # score mode's one literal search


def test_turn_limit():
    env = make_env("webshop", max_turns=2)
    env.reset(1)
    assert not env.step("x").done and env.step("x").done


@pytest.mark.parametrize("name", ["realistic", "simple"])
def test_oracle_solves_all_test_tasks(name):
    env = make_env("webshop", catalogue=name)
    demos = generate_demonstrations("webshop", env.test_task_ids(), catalogue=name)
    assert len(demos) == 200 and all(d.reward == 1.0 and d.num_turns <= 10 for d in demos)


def test_oracle_with_webshops_own_page_size():
    demos = generate_demonstrations("webshop", range(200), results_per_page=10)
    assert len(demos) == 200


def test_crude_heuristic_rarely_succeeds_on_the_realistic_catalogue():
    """WebShop's rule baseline reaches 9.6% on the real site; the simple catalogue let it solve 60% (the
    benchmark, benchmarks/webshop_heuristic.py, prints both)."""
    env = make_env("webshop")
    rewards = [heuristic_episode(env, t) for t in env.test_task_ids()]
    assert sum(r >= 1.0 for r in rewards) / len(rewards) <= 0.15
    assert sum(rewards) / len(rewards) > 0.5  # it buys plausible products: partial credit, rarely full


def test_catalogue_option_errors():
    with pytest.raises(ValueError, match="catalogue must be one of realistic, simple"):
        make_env("webshop", catalogue="amazon")
