"""Where the model runs and in which precision: ``model.device`` / ``model.dtype`` resolved on this machine.

``auto`` means the first CUDA device if there is one, else the CPU; a ``dtype`` of ``auto`` means bfloat16 on a
GPU that computes in it natively (Ampere and later), float32 everywhere else. Only the model (the policy, its
rollouts, SFT, DP-SGD and evaluation) lives there: adapter states leave it as float32 CPU tensors
(``models.adapters.get_adapter_state``), so secure aggregation and the privacy ledger never see a device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATION_CHOICES = ("none", "nf4")
_DEVICE_RX = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def parse_device(spec: str) -> str:
    """``spec`` if it is a device setting this project accepts; ``ValueError`` naming the choices otherwise."""
    if not isinstance(spec, str) or not _DEVICE_RX.match(spec):
        raise ValueError(f"{spec!r} is not a device; use one of {', '.join(DEVICE_CHOICES)}")
    return spec


def cuda_devices() -> list[str]:
    """Names of the CUDA devices torch can use here (empty on a CPU build or without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def check_device(spec: str) -> None:
    """``ValueError`` (one line) if ``spec`` asks for a CUDA device this machine does not have."""
    if not spec.startswith("cuda"):
        return
    import torch

    found = cuda_devices()
    if not found:
        why = "this torch is the CPU build" if not torch.version.cuda else f"torch {torch.__version__} finds no GPU"
        raise ValueError(f"no CUDA device on this machine ({why}); use auto or cpu here (fedse doctor shows what "
                         "this machine has)")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= len(found):
        raise ValueError(f"this machine has {len(found)} CUDA device(s), cuda:0..cuda:{len(found) - 1}; use one of "
                         "those or auto")


def resolve_device(spec: str = "auto"):
    """The ``torch.device`` a setting means here (``check_device`` first for a one-line error)."""
    import torch

    check_device(parse_device(spec))
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cuda":
        return torch.device("cuda", 0)
    return torch.device(spec)


def bf16_native(device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (not emulated): CUDA compute capability 8.0+."""
    import torch

    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_dtype(spec: str, device):
    """The ``torch.dtype`` a ``model.dtype`` setting means on ``device``."""
    import torch

    if spec == "auto":
        return torch.bfloat16 if bf16_native(device) else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]
    except KeyError:
        raise ValueError(f"{spec!r} is not a dtype; use one of {', '.join(DTYPE_CHOICES)}") from None


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Placement:
    """Where a model config puts the model on this machine."""

    device: object
    dtype: object

    def describe(self) -> str:
        return f"{self.device} {dtype_name(self.dtype)}"


def placement(device: str = "auto", dtype: str = "auto") -> Placement:
    dev = resolve_device(device)
    return Placement(dev, resolve_dtype(dtype, dev))


def model_device(model):
    """The device of a model's trainable (LoRA) parameters, else of its first parameter."""
    first = None
    for p in model.parameters():
        if p.requires_grad:
            return p.device
        first = first if first is not None else p
    return first.device


def check_single_device(model) -> None:
    """``RuntimeError`` if the model's parameters are spread over devices.

    A LoRA adapter left on the CPU while its base layer sits on the GPU trains without an error on some paths and
    silently corrupts the update on others (Opacus + peft, opacus#820); one device for every parameter rules
    that out before any training or rollout.
    """
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        where = {}
        for name, p in model.named_parameters():
            where.setdefault(p.device, name)
        spread = ", ".join(f"{d}: e.g. {n}" for d, n in where.items())
        raise RuntimeError(f"model parameters are on several devices ({spread}); this is a bug in model placement")


def accelerator_memory(device) -> dict[str, float] | None:
    """Free and total memory (GiB) of a CUDA device; None for the CPU."""
    import torch

    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return {"free_gib": free / 2**30, "total_gib": total / 2**30}
