"""LoRA adapter state: extraction from a peft model, peft-compatible files written without the model (so a
coordinator never needs the base model to publish a global adapter), and the bytes form that travels in a
round (safetensors plus the key order, which the flat aggregation layout depends on)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def get_adapter_state(model) -> OrderedDict[str, torch.Tensor]:
    """The LoRA tensors of a peft model (keys as peft saves them), detached float32 CPU copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return OrderedDict((k, v.detach().to("cpu", torch.float32).clone()) for k, v in sorted(state.items()))


def set_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter state has keys the model does not: {unexpected[:3]}...; wrong LoRA config?")


def save_adapter(state: dict[str, torch.Tensor], peft_config: dict, folder: str | Path) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` exactly as peft's save_pretrained does,
    atomically (temporary folder + rename), so ``PeftModel.from_pretrained(base, folder)`` loads it."""
    from safetensors.torch import save

    from fedse_secure.io_utils import atomic_folder

    def build(tmp: Path) -> None:
        # Serialised in memory, written by Python: a failed write (a full disk) is then an OSError that names the
        # file, where safetensors' own writer raises its own error type.
        data = save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})
        (tmp / ADAPTER_WEIGHTS).write_bytes(data)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True))

    return atomic_folder(folder, build, replace=True)


def load_adapter_state(folder: str | Path) -> OrderedDict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    return OrderedDict(sorted(state.items()))


def peft_config_dict(model) -> dict:
    """The JSON peft writes for the model's active adapter (used when saving without the model)."""
    cfg = model.peft_config[model.active_adapter]
    d = cfg.to_dict()
    for k, v in list(d.items()):
        if isinstance(v, set):
            d[k] = sorted(v)
    return json.loads(json.dumps(d, default=str))


def state_to_bytes(state: OrderedDict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    """(safetensors bytes, JSON key order): safetensors does not keep insertion order, the flat layout needs it."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return save(tensors), json.dumps(list(state)).encode()


def state_from_bytes(data: bytes, order: bytes) -> OrderedDict[str, torch.Tensor]:
    """The inverse of :func:`state_to_bytes`; ``ValueError`` if the bytes are not a matching pair."""
    from safetensors.torch import load

    try:
        tensors = load(bytes(data))
        keys = json.loads(bytes(order).decode())
    except Exception as err:  # safetensors raises its own SafetensorError on malformed bytes
        raise ValueError(f"not an adapter in safetensors form ({err})") from None
    if not isinstance(keys, list) or sorted(keys) != sorted(tensors):
        raise ValueError("adapter tensor names do not match their declared order")
    return OrderedDict((k, tensors[k]) for k in keys)
