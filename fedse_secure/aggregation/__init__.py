"""Aggregation of LoRA adapters: flat-vector packing and rules defined over sums (secure-aggregation ready)."""

from fedse_secure.aggregation.adapter_state import (
    FlatSpec,
    flatten,
    get_adapter_state,
    load_adapter_state,
    peft_config_dict,
    save_adapter,
    set_adapter_state,
    state_delta,
    unflatten,
)
from fedse_secure.aggregation.rules import RULES, AggregationRule, get_rule

__all__ = [
    "RULES",
    "AggregationRule",
    "FlatSpec",
    "flatten",
    "get_adapter_state",
    "get_rule",
    "load_adapter_state",
    "peft_config_dict",
    "save_adapter",
    "set_adapter_state",
    "state_delta",
    "unflatten",
]
