"""Constrained action decoding: the agent writes its thought freely, its action only from the valid actions.

A reply in constrained mode is generated in two phases (``rollout.run_episodes``):

1. the thought, free text, until the model writes ``Action:`` (or ends its turn, or runs out of tokens: then
   ``\\n\\nAction:`` is appended);
2. the action, token by token, where every step may only pick a token that keeps the text a prefix of a valid
   action: a token trie over the environment's literal actions (``ActionSpace.literals``), and for a parametrised
   action (``ActionSpace.slots``, e.g. WebShop's ``search[...]``) the trie of its prefix followed by free text that
   may not contain the closing character or a line break, then the closing character.

So the reply keeps the paper's ReAct layout ("Thought:\\n...\\n\\nAction:\\n<action>") and its action is always one the
environment accepts. Each row's constraint depends only on that row, so batched and one-at-a-time decoding pick
the same tokens. Kept apart from the generation engine: it only hands ``_generate_cached`` a mask per row.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from fedse_secure.envs.base import ACTION_MARKER, ActionSpace

#: What follows the marker before the action in AgentGym's layout ("Action:\nmove up").
ACTION_LEAD = "\n"
#: The longest free-text argument of a slot, in tokens; then the closing character is forced.
SLOT_MAX_TOKENS = 24
_TRIE_CACHE_SIZE = 256


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    terminal: bool = False
    #: A slot starts here: free text follows, up to this closing character; the prefix ends in ``slot_open``.
    slot_close: str | None = None
    slot_open: str = ""
    #: At the root: the most tokens an action may take (with a closing end-of-turn token).
    depth: int = 0


class TokenVocabulary:
    """Per-tokenizer token texts and the masks slot decoding needs (computed once per tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.size = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        self.texts = [tokenizer.decode([i]) for i in range(self.size)]
        self.special = special
        marker = tokenizer(ACTION_MARKER, add_special_tokens=False)["input_ids"]
        self.marker_ids = marker
        self._slot_masks: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._tries: OrderedDict[ActionSpace, _Node] = OrderedDict()

    def action_ids(self, actions: list[str]) -> list[list[int]]:
        """Each action's tokens as they follow ``Action:`` (the marker's own tokens cut off)."""
        if not actions:
            return []
        n = len(self.marker_ids)
        encoded = self.tokenizer([ACTION_MARKER + ACTION_LEAD + a for a in actions], add_special_tokens=False)
        out = []
        for action, ids in zip(actions, encoded["input_ids"]):
            if ids[:n] != self.marker_ids:
                raise ValueError(f"the tokenizer merges {ACTION_MARKER!r} with the action {action!r}; constrained "
                                 "decoding needs the marker to stay whole")
            out.append(ids[n:])
        return out

    def trie(self, space: ActionSpace) -> _Node:
        cached = self._tries.get(space)
        if cached is not None:
            self._tries.move_to_end(space)
            return cached
        root = _Node()
        for ids in self.action_ids(list(space.literals)):
            node = root
            for tok in ids:
                node = node.children.setdefault(tok, _Node())
            node.terminal = True
            root.depth = max(root.depth, len(ids) + 1)
        for (prefix, close), ids in zip(space.slots, self.action_ids([prefix for prefix, _ in space.slots])):
            node = root
            for tok in ids:
                node = node.children.setdefault(tok, _Node())
            node.slot_close, node.slot_open = close, prefix[-1:]
            root.depth = max(root.depth, len(ids) + SLOT_MAX_TOKENS + 1)
        self._tries[space] = root
        if len(self._tries) > _TRIE_CACHE_SIZE:
            self._tries.popitem(last=False)
        return root

    def slot_masks(self, close: str, opener: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(tokens that continue a slot's text, tokens that end it, the token that is just ``close``).

        The text may contain neither bracket nor a line break: "search[a[b]]" is not WebShop's search."""
        if (close, opener) not in self._slot_masks:
            inner = torch.zeros(self.size, dtype=torch.bool)
            ends = torch.zeros(self.size, dtype=torch.bool)
            for i, t in enumerate(self.texts):
                if i in self.special or not t or "\n" in t or "\r" in t or opener in t:
                    continue
                if close not in t:
                    inner[i] = True
                elif t.endswith(close) and t.count(close) == 1:
                    ends[i] = True
            just = self.tokenizer(close, add_special_tokens=False)["input_ids"]
            if len(just) != 1:
                raise ValueError(f"constrained decoding needs {close!r} to be one token")
            self._slot_masks[(close, opener)] = (inner, ends, just[0])
        return self._slot_masks[(close, opener)]


_VOCABULARIES: dict[int, TokenVocabulary] = {}


def token_vocabulary(tokenizer) -> TokenVocabulary:
    vocab = _VOCABULARIES.get(id(tokenizer))
    if vocab is None or vocab.tokenizer is not tokenizer:
        vocab = _VOCABULARIES[id(tokenizer)] = TokenVocabulary(tokenizer)
    return vocab


class ActionConstraint:
    """One row's decoding state over an :class:`ActionSpace`; ``mask`` before a pick, ``advance`` after it."""

    def __init__(self, vocab: TokenVocabulary, space: ActionSpace, eos_id: int):
        self.vocab = vocab
        self.node: _Node | None = vocab.trie(space)
        self.max_tokens = self.node.depth
        self.eos_id = eos_id
        self.slot_close: str | None = None
        self.slot_open = ""
        self.slot_tokens = 0
        self.finished = False
        if not self.node.children:
            raise ValueError("constrained decoding needs at least one valid action")

    def mask(self) -> torch.Tensor:
        allowed = torch.zeros(self.vocab.size, dtype=torch.bool)
        if self.slot_close is not None:
            inner, ends, just = self.vocab.slot_masks(self.slot_close, self.slot_open)
            if self.slot_tokens >= SLOT_MAX_TOKENS:
                allowed[just] = True
            elif self.slot_tokens == 0:
                allowed |= inner  # an empty argument is not an action
            else:
                allowed |= inner | ends
            return allowed
        assert self.node is not None
        for tok in self.node.children:
            allowed[tok] = True
        if self.node.slot_close is not None:
            inner, _, _ = self.vocab.slot_masks(self.node.slot_close, self.node.slot_open)
            allowed |= inner
        if self.node.terminal:
            allowed[self.eos_id] = True  # the action may end here though a longer one continues it
        return allowed

    def advance(self, token: int) -> None:
        if self.slot_close is not None:
            self.slot_tokens += 1
            if self.vocab.texts[token].endswith(self.slot_close):
                self.finished = True
            return
        assert self.node is not None
        if token == self.eos_id and self.node.terminal:
            self.finished = True
            return
        child = self.node.children.get(token)
        if child is None:  # free text of the slot that starts at this node
            self.slot_close, self.slot_open, self.slot_tokens = self.node.slot_close, self.node.slot_open, 1
            self.node = None
            return
        self.node = child
        if child.terminal and not child.children and child.slot_close is None:
            self.finished = True


def thought_part(text: str) -> str:
    """The reply's thought up to and including its first ``Action:``; ``\\n\\nAction:`` appended when missing."""
    at = text.find(ACTION_MARKER)
    if at >= 0:
        return text[: at + len(ACTION_MARKER)]
    return text.rstrip() + "\n\n" + ACTION_MARKER
