"""WebShop (Yao et al. 2022) re-implemented over a synthetic catalogue (``catalogue``: ``realistic`` by default,
``webshop_families``; or ``simple``, ``webshop_catalog``).

Kept from WebShop / AgentGym:
- Pages and their text form with ``[SEP]`` separators: the search page ("WebShop [SEP] Instruction: [SEP] ... [SEP]
  Search"), result pages ("Page 1 (Total results: 50)", "Next >", "< Prev", "Back to Search", then ASIN, title and
  price per hit, from the top 50 BM25 hits), item pages (option groups and values, title, price, rating, Description,
  Features, Reviews, "Buy Now") and the description/features/reviews sub-pages.
- Actions ``search[keywords]`` and ``click[value]`` (a clickable of the current page, case-insensitive).
- The reward on "Buy Now" (WebShop's ``get_reward``): r_type * (attribute matches + option matches + price ok) /
  (attributes + options + 1), with r_type from WebShop's type rule (query match, category-path match with at
  least 2 levels in common, or title-noun overlap; 0.5 / 0.1 / 0 otherwise). Attributes match when the product has
  the attribute or its title contains it; options match the values selected on the item page. The item page
  adds "Selected: ..." once options are clicked (WebShop's HTML shows the selection; its text mode drops it).
  Success (as AgentGym counts it) = reward 1.
- 10 turns (AgentGym's default for WebShop); AgentGym's instruction turn (answered "Ok.") in our own words.

Parsing. ``agentgym``: AgentGym's client keeps everything after the last ``Action:`` (without the marker, the whole
reply if it mentions ``search[`` or ``click[``), and WebShop reads ``name[argument]`` at the start of it; anything
else, or a click on something not on the page, does nothing and the same page is shown again. ``lenient``: the
first ``search[...]``/``click[...]`` after the last ``Action:``, anywhere on the line; an invalid action is
answered "Invalid action." above the page.

Differences: a search is accepted on the search page only (WebShop also runs one typed on another page; the
instruction tells the agent to search where search is available). Page size: WebShop shows 10 hits per page;
the default here is 5 so that a results page stays near 250 tokens for a 1k-token model
(``results_per_page=10`` restores WebShop's page; the oracle solves every task either way).

Tasks: task id -> a goal generated from the catalogue with a per-task seed. Test = ids 0..199 (the paper's 200),
train = ids 200..4129 (3,930, AgentTraj's WebShop count). ``heuristic_episode`` plays WebShop's rule baseline
(search the instruction, open the first hit, click the option values the instruction names, buy):
``benchmarks/webshop_heuristic.py`` reports its success rate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fedse_secure.envs import register_env
from fedse_secure.envs.base import (
    ActionSpace,
    Oracle,
    Prompt,
    StepResult,
    TextEnv,
    agentgym_react_tail,
    extract_action,
    react,
)
from fedse_secure.envs.webshop_catalog import CATALOGUES, Goal, Product, SearchIndex, tokenize
from fedse_secure.envs.webshop_catalog import catalogue as load_catalogue

N_TEST = 200
N_TRAIN = 3930
RESULTS = 50

INSTRUCTION = (
    "You are shopping on a website.\nI will give you instructions about what to do.\nYou have to follow them.\n"
    "Each turn I give you an observation and the actions you can take, and you reply with one action based on the "
    "page and the instruction.\nYou can search when search is available.\nYou can click one of the buttons on the "
    "page.\nAn action has one of these forms:\nsearch[keywords]\nclick[value]\nAn action that is not valid does "
    "nothing.\nThe search keywords are up to you, but the value you click must be one of the clickable values on "
    "the page.\nChoose your search keywords carefully.\nReply in this format:\n\nThought:\nI think ... \n\n"
    "Action: \nclick[something]"
)
_AGENTGYM_ACTION_RE = re.compile(r"(.+)\[(.+)\]")
_ACTION_RE = re.compile(r"^(search|click)\s*\[(.*)\]\s*\.?$", re.IGNORECASE | re.DOTALL)
#: How an invalid action is answered under lenient parsing (AgentGym's client says this when it cannot parse).
INVALID_PREFIX = "Invalid action.\n\n"


def parse_action(action_text: str, parsing: str = "lenient") -> tuple[str, str] | None:
    """(action name, argument) from the model's reply, or None.

    ``agentgym``: ``name[argument]`` at the start of the text after the last ``Action:`` (WebShop's
    ``parse_action``; the name is returned as written, so only "search" and "click" act). ``lenient``: the first
    ``search[...]``/``click[...]`` after the last ``Action:``, name lower-cased, spaces in the argument collapsed.
    """
    if parsing == "agentgym":
        m = _AGENTGYM_ACTION_RE.match(agentgym_react_tail(action_text))
        return (m.group(1), m.group(2)) if m else None
    action = extract_action(action_text)
    m = _ACTION_RE.match(action.strip())
    if not m:
        # Lenient: the first search[...]/click[...] anywhere in the text after "Action:".
        m = re.search(r"(search|click)\s*\[([^\]]*)\]", action, re.IGNORECASE)
        if not m:
            return None
    return m.group(1).lower(), " ".join(m.group(2).split())


def type_reward(product: Product, goal: Goal) -> float:
    query_match = product.product_type == goal.product_type
    category_match = len(set(product.category) & set(goal.category)) >= 2
    desired = set(tokenize(goal.product_type))
    title_score = len(set(tokenize(product.product_type)) & desired) / len(desired) if desired else 0.2
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type


def purchase_reward(product: Product, goal: Goal, selected: dict[str, str]) -> float:
    title = product.title.lower()
    attr_matches = sum(1 for a in goal.attributes if a in product.attributes or a in title)
    chosen = {v.lower() for v in selected.values()}
    option_matches = sum(1 for _, value in goal.options if value.lower() in chosen)
    price_ok = 1 if product.price <= goal.price_upper else 0
    total = (attr_matches + option_matches + price_ok) / (len(goal.attributes) + len(goal.options) + 1)
    return round(total * type_reward(product, goal), 4)


class WebShopEnv(TextEnv):
    name = "webshop"
    max_turns = 10
    default_prompt = Prompt(INSTRUCTION, reply="Ok.")
    option_choices = {**TextEnv.option_choices, "catalogue": CATALOGUES}

    def __init__(
        self,
        max_turns: int | None = None,
        results_per_page: int = 5,
        parsing: str = "agentgym",
        prompt_file: str | None = None,
        catalogue: str = "realistic",
    ):
        self._configure(max_turns, parsing, prompt_file)
        if not isinstance(results_per_page, int) or not 1 <= results_per_page <= RESULTS:
            raise ValueError(f"results_per_page must be an integer in 1..{RESULTS}, got {results_per_page!r}")
        self.validate_options({"catalogue": catalogue})
        self.per_page = results_per_page
        self.catalogue_name = catalogue
        self.catalogue: SearchIndex = load_catalogue(catalogue)
        self.goal: Goal | None = None
        self.done = True

    def reset(self, task_id: int) -> str:
        if not isinstance(task_id, int) or not 0 <= task_id < N_TEST + N_TRAIN:
            raise ValueError(f"webshop task id {task_id!r} out of range: valid ids are 0..{N_TEST + N_TRAIN - 1}")
        self.task_id = task_id
        self.goal = self.catalogue.goal(task_id)
        self.page = "search"
        self.results: list[Product] = []
        self.page_no = 1
        self.item: Product | None = None
        self.subpage = ""
        self.selected: dict[str, str] = {}
        self.turns = 0
        self.done = False
        return self.render()

    # -- pages ------------------------------------------------------------------------------------------------

    def clickables(self) -> list[str]:
        if self.page == "search":
            return []
        if self.page == "results":
            clicks = ["back to search"]
            if self.page_no > 1:
                clicks.append("< prev")
            if self.page_no * self.per_page < len(self.results):
                clicks.append("next >")
            return clicks + [p.asin.lower() for p in self._page_items()]
        if self.page == "item":
            assert self.item is not None
            values = [v for _, vs in self.item.options for v in vs]
            return ["back to search", "< prev", *values, "description", "features", "reviews", "buy now"]
        return ["back to search", "< prev"]  # sub-page

    def valid_actions(self) -> list[str]:
        """Literal actions (for scoring them by likelihood). Search keywords are free text, so on the search page
        the one offered search uses the instruction's own words without the price clause."""
        if self.page == "search":
            assert self.goal is not None
            words = self.goal.instruction.split(", and price lower than")[0]
            words = re.sub(r"^(i am looking for|i need|i want to buy|find me|i would like|get me)\s+(an?\s+)?", "",
                           words)
            return [f"search[{' '.join(re.sub(r'[,:]', ' ', words).split())}]"]
        return [f"click[{c}]" for c in self.clickables()]

    def action_space(self) -> ActionSpace:
        """On the search page any ``search[keywords]``; elsewhere a click on each clickable."""
        if self.page == "search":
            return ActionSpace(slots=(("search[", "]"),))
        return ActionSpace(literals=tuple(self.valid_actions()))

    def _page_items(self) -> list[Product]:
        start = (self.page_no - 1) * self.per_page
        return self.results[start : start + self.per_page]

    def render(self) -> str:
        assert self.goal is not None
        head = f"Instruction: [SEP] {self.goal.instruction} [SEP] "
        if self.page == "search":
            return f"WebShop [SEP] {head}Search"
        if self.page == "results":
            parts = ["Back to Search", f"Page {self.page_no} (Total results: {len(self.results)})"]
            if self.page_no > 1:
                parts.append("< Prev")
            if self.page_no * self.per_page < len(self.results):
                parts.append("Next >")
            for p in self._page_items():
                parts += [p.asin, p.title, f"${p.price:.2f}"]
            return head + " [SEP] ".join(parts)
        assert self.item is not None
        p = self.item
        if self.page == "item":
            parts = ["Back to Search", "< Prev"]
            for group, values in p.options:
                parts += [group, *values]
            parts += [p.title, f"Price: ${p.price:.2f}", "Rating: N.A."]
            parts += ["Description", "Features", "Reviews", "Buy Now"]
            text = head + " [SEP] ".join(parts)
            if self.selected:
                text += " [SEP] Selected: " + ", ".join(f"{g}: {v}" for g, v in self.selected.items())
            return text
        body = {"description": p.description, "features": " ".join(p.features), "reviews": "No reviews yet."}
        return head + " [SEP] ".join(["Back to Search", "< Prev", body[self.subpage]])

    # -- step -------------------------------------------------------------------------------------------------

    def step(self, action_text: str) -> StepResult:
        if self.goal is None:
            raise RuntimeError("WebShopEnv.step called before reset(task_id)")
        if self.done:
            return StepResult("The episode is over; call reset(task_id).", 0.0, True, False, {"invalid": True})
        self.turns += 1
        parsed = parse_action(action_text, self.parsing)
        reward, bought, invalid = 0.0, False, False
        if parsed is None:
            invalid = True
        elif parsed[0] == "search":
            if self.page == "search" and parsed[1].strip():
                self.results = self.catalogue.search(parsed[1].lower(), RESULTS)
                self.page, self.page_no = "results", 1
            else:
                invalid = True
        elif parsed[0] == "click":
            value = parsed[1].lower()
            if value not in self.clickables():
                invalid = True
            else:
                reward, bought = self._click(value)
        else:
            invalid = True
        if bought:
            self.done = True
            observation = (
                f"Thank you for shopping with us! [SEP] Purchased [SEP] {self.item.asin} [SEP] "
                f"Your score (min 0.0, max 1.0) [SEP] {reward}"
            )
        else:
            self.done = self.turns >= self.max_turns
            prefix = INVALID_PREFIX if invalid and self.parsing == "lenient" else ""
            observation = prefix + self.render()
        info = {"turns": self.turns}
        if invalid:
            info["invalid"] = True
        success = bought and reward >= 1.0 - 1e-9
        return StepResult(observation, reward, self.done, success, info)

    def _click(self, value: str) -> tuple[float, bool]:
        if value == "back to search":
            self.page, self.results, self.item, self.selected = "search", [], None, {}
        elif self.page == "results":
            if value == "next >":
                self.page_no += 1
            elif value == "< prev":
                self.page_no -= 1
            else:
                self.item = self.catalogue.by_asin[value.upper()]
                self.page, self.selected = "item", {}
        elif self.page == "item":
            assert self.item is not None and self.goal is not None
            if value == "< prev":
                self.page, self.item, self.selected = "results", None, {}
            elif value in ("description", "features", "reviews"):
                self.page, self.subpage = "sub", value
            elif value == "buy now":
                return purchase_reward(self.item, self.goal, self.selected), True
            else:
                for group, values in self.item.options:
                    if value in values:
                        self.selected[group] = value
                        break
        elif self.page == "sub" and value == "< prev":
            self.page = "item"
        return 0.0, False

    def train_task_ids(self) -> Sequence[int]:
        return range(N_TEST, N_TEST + N_TRAIN)

    def test_task_ids(self) -> Sequence[int]:
        return range(N_TEST)


# ---------------------------------------------------------------------------------------------------------------
# Oracle: a planner over the catalogue


def satisfies(product: Product, goal: Goal) -> bool:
    """Buying ``product`` with the goal's options selected would earn reward 1."""
    offered = {v for _, vs in product.options for v in vs}
    if any(v not in offered for _, v in goal.options):
        return False
    return purchase_reward(product, goal, dict(goal.options)) >= 1.0 - 1e-9


class WebShopOracle(Oracle):
    """Searches with keywords from the instruction, opens a product that satisfies every requirement (checked
    against the catalogue), selects the requested options and buys it. Among a few candidate queries it uses the
    one that puts a satisfying product highest, so the product is on the first result page.
    """

    def __init__(self):
        self.script: list[tuple[str, str]] = []

    def reset(self, env: TextEnv, task_id: int) -> None:
        if not isinstance(env, WebShopEnv) or env.goal is None:
            raise TypeError(f"WebShopOracle plays a reset WebShopEnv, got {type(env).__name__}")
        goal, cat = env.goal, env.catalogue
        option_words = " ".join(v for _, v in goal.options)
        queries = [
            f"{' '.join(goal.attributes)} {goal.product_type}",
            f"{' '.join(goal.attributes)} {goal.product_type} {option_words}",
            f"{goal.product_type} {option_words}",
            goal.product_type,
        ]
        best = None
        for q in queries:
            results = cat.search(q, RESULTS)
            for rank, p in enumerate(results):
                if satisfies(p, goal):
                    if best is None or rank < best[0]:
                        best = (rank, q, p)
                    break
        if best is None:  # every goal's own target satisfies it, so this means a catalogue/search bug
            raise RuntimeError(f"webshop task {task_id}: no query surfaces a product that satisfies the goal")
        rank, query, product = best
        budget = f"under ${goal.price_upper:.0f}"
        script = [
            ("search", query, f"I need a {goal.product_type} that is {' and '.join(goal.attributes)}, {budget}. "
             f"I search for it."),
        ]
        for _ in range(rank // env.per_page):
            script.append(("click", "next >", "No result on this page fits; I look at the next page."))
        script.append(
            ("click", product.asin.lower(), f"{product.asin} is a {goal.product_type} with what I need at "
             f"${product.price:.2f}, {budget}.")
        )
        for group, value in goal.options:
            script.append(("click", value, f"I select {value} for {group}."))
        script.append(("click", "buy now", "Everything matches the instruction, so I buy it."))
        self.script = script

    def act(self, env: TextEnv, observation: str) -> str:
        if not self.script:
            return react("I go back to the search page.", "click[back to search]")
        kind, arg, thought = self.script.pop(0)
        return react(thought, f"{kind}[{arg}]")


def heuristic_episode(env: WebShopEnv, task_id: int) -> float:
    """WebShop's rule baseline on one task: search the whole instruction, open the first hit, click every option
    value of the item page that the instruction names (the first per group), buy. Returns the reward."""
    env.reset(task_id)
    assert env.goal is not None
    instruction = env.goal.instruction.lower()
    env.step(react("", f"search[{env.goal.instruction}]"))
    if not env.results:
        return 0.0
    env.step(react("", f"click[{env.results[0].asin.lower()}]"))
    assert env.item is not None
    for _, values in env.item.options:
        named = [v for v in values if re.search(rf"(?<![a-z0-9]){re.escape(v.lower())}(?![a-z0-9])", instruction)]
        if named:
            env.step(react("", f"click[{named[0]}]"))
    return env.step(react("", "click[buy now]")).reward


register_env("webshop", WebShopEnv, WebShopOracle)
