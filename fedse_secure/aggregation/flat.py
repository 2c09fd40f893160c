"""Adapter tensors as one flat float vector (what secure aggregation sums) and back."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch


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
