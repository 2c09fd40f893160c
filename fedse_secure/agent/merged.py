"""Rollouts on merged weights: the LoRA update folded into the base layers for as long as inference runs.

Unmerged, every adapted linear layer costs a cast, two thin matmuls, a scale and an add on top of its base matmul;
with LoRA on every linear layer that is a large share of a decode step's kernel launches. Measured on an H200 with
SmolLM2-135M (results/gpu/h200-2026-12-04): batch-16 decoding reached 161 tokens/s, and in a profiled run the
GPU's kernels took 121 ms of 2.7 s; the rest was launching them. Folded into the base weights, a forward is the
base model's forward: 316 against 184 tokens/s there, side by side (benchmarks/merged_rollouts.py), and a
decode step makes 1676 operator calls instead of 2726 (counted on the CPU by the same benchmark). On a CPU, where
decoding is FLOP-bound, the fold measured 1.00-1.07x, so ``run_episodes`` folds on GPUs only.

The fold is undone by restoring a copy of the original weights, not by subtracting the update: ``W + BA - BA`` is
not ``W`` after rounding (the tests see it even in float32), and training would drift a little every round. The
copy stays on the GPU where a second set of the adapted weights fits with room to spare (a device-to-device
copy); otherwise it waits in host memory, so that a large model on a small GPU is not asked for twice its
weights. Through the host, a 1-second score-mode run on the H200 took 1.07 s folded against 0.95 s unfolded. A
layer whose base is not a plain floating-point linear layer (a 4-bit base) or whose weight is tied to another
module (an output head tied to the embedding) keeps its LoRA path; disabled adapters are never folded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _foldable(module, shared: set[int]) -> bool:
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
        return False
    base = module.get_base_layer()
    return (type(base) is torch.nn.Linear and base.weight.dtype.is_floating_point
            and id(base.weight) not in shared)


def _shared_weights(model) -> set[int]:
    """Parameters that more than one module holds: a tied output head is the input embedding too, and folding an
    adapter of the head into it would change every input token's embedding."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


def _stash_device(layers) -> torch.device:
    """Where the original weights wait while the folded ones are in use."""
    weight = layers[0].get_base_layer().weight
    if weight.device.type != "cuda":
        return torch.device("cpu")
    need = sum(layer.get_base_layer().weight.nbytes for layer in layers)
    free, _ = torch.cuda.mem_get_info(weight.device)
    return weight.device if free > 2 * need else torch.device("cpu")


@contextmanager
def merged_adapter(model) -> Iterator[int]:
    """Inside the block, ``model``'s active LoRA adapters are folded into its base weights; yields how many layers.

    Only for inference: the merged layers no longer route gradients to the adapter. On exit (also on error) every
    folded layer gets its original weight and bias back bit for bit, and its LoRA path again.
    """
    shared = _shared_weights(model)
    layers = [m for m in model.modules() if _foldable(m, shared)]
    stash = _stash_device(layers) if layers else None
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                bias = None if base.bias is None else base.bias.detach().to(stash, copy=True)
                saved.append((layer, base.weight.detach().to(stash, copy=True), bias))
                layer.merge()
        yield len(layers)
    finally:
        with torch.no_grad():
            for layer, weight, bias in saved:
                base = layer.get_base_layer()
                base.weight.copy_(weight)  # in place: the parameter keeps its storage
                if bias is not None:
                    base.bias.copy_(bias)
                layer.merged_adapters.clear()
