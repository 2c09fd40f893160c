"""LoRA adapter state: extraction from a peft model, flat vectors for secure aggregation, and peft-compatible
files written without the model (so a coordinator never needs the base model to publish a global adapter)."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

AdapterState = "OrderedDict[str, torch.Tensor]"
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


@dataclass(frozen=True)
class FlatSpec:
    """Names and shapes of the tensors packed into a flat vector, in order."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.entries)

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> FlatSpec:
        return cls(tuple((k, tuple(v.shape)) for k, v in state.items()))


def flatten(state: dict[str, torch.Tensor]) -> tuple[np.ndarray, FlatSpec]:
    spec = FlatSpec.of(state)
    if not state:
        return np.zeros(0, dtype=np.float64), spec
    vector = torch.cat([v.reshape(-1).to(torch.float64) for v in state.values()]).numpy()
    return vector, spec


def unflatten(vector: np.ndarray, spec: FlatSpec) -> OrderedDict[str, torch.Tensor]:
    if vector.size != spec.size:
        raise ValueError(f"vector has {vector.size} values, the adapter needs {spec.size}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    offset = 0
    for name, shape in spec.entries:
        n = int(np.prod(shape))
        out[name] = torch.from_numpy(np.ascontiguousarray(vector[offset : offset + n])).to(torch.float32).reshape(shape)
        offset += n
    return out


def state_delta(local: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    if local.keys() != base.keys():
        raise ValueError("local and global adapters have different tensors; were they built with the same LoRA config?")
    return OrderedDict((k, local[k] - base[k]) for k in local)


def save_adapter(state: dict[str, torch.Tensor], peft_config: dict, folder: str | Path) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` exactly as peft's save_pretrained does,
    atomically (temporary folder + rename), so ``PeftModel.from_pretrained(base, folder)`` loads it."""
    from safetensors.torch import save_file

    from fedse_secure.io_utils import atomic_folder

    def build(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
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
