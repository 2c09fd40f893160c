"""One flat vector per client from named adapter tensors, and the shapes back after aggregation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedse_secure.secagg.masking.errors import SecureAggregationError


@dataclass(frozen=True)
class TensorLayout:
    """Names, shapes and offsets of the tensors packed into a flat vector (sorted by name)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> TensorLayout:
        names = tuple(sorted(tensors))
        return cls(names, tuple(tuple(np.shape(tensors[n])) for n in names))

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))

    def flatten(self, tensors: Mapping[str, np.ndarray], dtype=np.float32) -> np.ndarray:
        if set(tensors) != set(self.names):
            raise SecureAggregationError(
                f"adapter tensors {sorted(set(tensors) ^ set(self.names))} are not in every client's update; all "
                "institutions must train the same LoRA modules"
            )
        for n, s in zip(self.names, self.shapes):
            if tuple(np.shape(tensors[n])) != s:
                raise SecureAggregationError(f"adapter tensor {n} has shape {np.shape(tensors[n])}, expected {s}")
        if not self.names:
            return np.zeros(0, dtype=dtype)
        return np.concatenate([np.asarray(tensors[n], dtype=dtype).reshape(-1) for n in self.names])

    def unflatten(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        if vec.size != self.size:
            raise SecureAggregationError(f"flat vector has {vec.size} values, the layout needs {self.size}")
        out, pos = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = int(np.prod(s, dtype=np.int64))
            out[n] = vec[pos : pos + k].reshape(s)
            pos += k
        return out
