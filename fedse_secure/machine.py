"""What this machine offers a run (``fedse doctor``): torch build, devices, memory, extras, and what it means.

Everything here is read from the machine (torch, /proc, installed packages, safetensors headers); the one
estimate, the memory a model's weights take, is the exact element count of its safetensors files times the
bytes per element of the chosen precision, labelled as weights only (activations and the KV cache come on top).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import struct
import sys
from pathlib import Path
from typing import Any

#: Extras of pyproject.toml and the module that shows each is installed.
EXTRAS = {"mpc": ("crypten", "secure_aggregation: crypten"), "quant": ("bitsandbytes", "model.quantization: nf4"),
          "audit": ("dp_accounting", "fedse privacy verify --cross-check"), "dev": ("pytest", "the test suite")}
#: Bytes per weight of each precision; NF4 is 4 bits plus its block scales (double-quantised: ~0.127 bit each).
BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "nf4": 0.5 + 0.127 / 8}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def memory_gib() -> dict[str, float] | None:
    """Total and available RAM from /proc/meminfo (Linux); None elsewhere."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kib = {k: int(v.split()[0]) for k, v in fields.items() if k in ("MemTotal", "MemAvailable")}
        return {"total_gib": kib["MemTotal"] / 2**20, "available_gib": kib["MemAvailable"] / 2**20}
    except (OSError, KeyError, ValueError):
        return None


def inspect_machine() -> dict[str, Any]:
    """A JSON-ready description of this machine as a run sees it."""
    import torch

    from fedse_secure import torch_build
    from fedse_secure.models.device import dtype_name, placement
    from fedse_secure.models.loading import DEFAULT_MODEL, cache_dir

    smi = torch_build.nvidia_gpus()
    choice = torch_build.choose_variant(None, smi)
    installed = torch_build.installed_torch()
    gpus = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"index": i, "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                     "total_gib": round(total / 2**30, 2), "free_gib": round(free / 2**30, 2),
                     "bf16_native": props.major >= 8})
    auto = placement("auto", "auto")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count()
    models = cache_dir() / "models"
    return {
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": {"version": installed.version, "build": installed.variant, "cuda": installed.cuda,
                  "expected_build": choice.variant, "why": choice.reason,
                  "problem": torch_build.mismatch(installed, choice.variant, smi)},
        "cpu": {"cores": cores, "torch_threads": torch.get_num_threads(), "memory": memory_gib()},
        "nvidia_smi": smi,
        "gpus": gpus,
        "auto": {"device": str(auto.device), "dtype": dtype_name(auto.dtype)},
        "extras": {name: {"installed": importlib.util.find_spec(module) is not None,
                          "version": _version(module.replace("_", "-")), "for": purpose}
                   for name, (module, purpose) in EXTRAS.items()},
        "models_prepared": sorted(p.name for p in models.iterdir()) if models.is_dir() else [],
        "default_model": DEFAULT_MODEL,
        "secagg_kernel": secagg_kernel(),
    }


def secagg_kernel() -> dict[str, Any]:
    """Whether masking runs on the compiled kernels here (the masks on x86-64 with AES-NI and 64-bit ARM with
    its Cryptographic Extension, quantisation and the release with VAES and AVX-512), and why not where not."""
    from fedse_secure.secagg.masking.prg import KERNEL, MASK_KERNEL

    if KERNEL is not None:
        return {"active": True, "why": "compiled, and this CPU has VAES and AVX-512 (every masking kernel)"}
    if MASK_KERNEL is not None:
        return {"active": True, "why": "compiled; this CPU has AES instructions but not VAES/AVX-512, so masks "
                                       "take the 128-bit path and quantisation numpy (the same bytes)"}
    if importlib.util.find_spec("fedse_secure.secagg.masking._kernels") is None:
        why = "not compiled (no C compiler when the package was installed); reinstall with one (make venv)"
    else:
        why = "compiled, but this CPU lacks AES instructions"
    return {"active": False, "why": why + "; masking uses the numpy reference (the same bytes, 300-1,200x slower "
                                          "per mask, and table-based AES rounds: not constant-time)"}


def safetensors_weights(folder: Path) -> dict[str, int] | None:
    """Weights in a model folder's safetensors files (from their headers): ``{"linear": n, "other": m}``, where
    linear counts the 2-D matrices that 4-bit quantisation stores in NF4 (every linear layer but the LM head) and
    other the rest (embeddings, LM head, norms), which stay in the compute dtype. None without any file."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    counts = {"linear": 0, "other": 0}
    for f in files:
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in entry["shape"]:
                n *= d
            linear = len(entry["shape"]) == 2 and "embed" not in name and "lm_head" not in name
            counts["linear" if linear else "other"] += n
    return counts


def config_fit(cfg, machine: dict[str, Any]) -> dict[str, Any]:
    """Where an experiment's model would run here and whether its weights fit (the weights alone)."""
    from fedse_secure.models.device import dtype_name, placement
    from fedse_secure.models.loading import DEFAULT_MODEL, TINY_MODEL, cache_dir, tiny_model_dir

    where = placement(cfg.model.device, cfg.model.dtype)
    name = cfg.model.name_or_path
    if name == DEFAULT_MODEL:
        folder = cache_dir() / "models" / DEFAULT_MODEL
    elif name == TINY_MODEL:
        folder = tiny_model_dir()
    else:
        folder = Path(name).expanduser()
    counts = safetensors_weights(folder) if folder is not None and folder.is_dir() else None
    weights = sum(counts.values()) if counts else None
    compute = dtype_name(where.dtype)
    out: dict[str, Any] = {"model": name, "device": str(where.device), "dtype": dtype_name(where.dtype),
                           "quantization": cfg.model.quantization, "weights": weights, "weights_bytes": None,
                           "weights_gib": None,
                           "fits": None, "notes": []}
    if weights is None:
        out["notes"].append(f"no safetensors files found for {name}: weight memory not estimated (run `fedse model "
                            "prepare` for the built-in models, or point model.name_or_path at an HF model folder)")
        return out
    linear_bytes = BYTES_PER_WEIGHT["nf4" if cfg.model.quantization == "nf4" else compute]
    out["weights_bytes"] = int(counts["linear"] * linear_bytes + counts["other"] * BYTES_PER_WEIGHT[compute])
    gib = out["weights_bytes"] / 2**30
    out["weights_gib"] = round(gib, 2)
    if where.device.type == "cuda":
        free = next((g["free_gib"] for g in machine["gpus"] if g["index"] == (where.device.index or 0)), None)
        if free is not None:
            out["fits"] = gib < free
            if gib >= free:
                out["notes"].append(f"the weights alone ({gib:.1f} GiB) exceed the {free:.1f} GiB free on "
                                    f"{where.device}; use model.quantization: nf4 or a smaller model")
            elif gib > 0.6 * free:
                out["notes"].append(f"the weights take {gib:.1f} of {free:.1f} GiB free: turn on "
                                    "training.gradient_checkpointing and lower training.micro_batch_size")
    else:
        ram = (machine["cpu"]["memory"] or {}).get("available_gib")
        if ram is not None:
            out["fits"] = gib < ram
        if weights > 1e9:
            out["notes"].append(f"a {weights / 1e9:.1f}B-weight model on the CPU takes hours per round; run it "
                                "where a GPU is (model.device: cuda)")
    return out


def advice(machine: dict[str, Any]) -> list[str]:
    """What the findings mean for the configs, one line each."""
    lines = []
    torch_info = machine["torch"]
    if torch_info["problem"]:
        lines.append(torch_info["problem"])
    if machine["gpus"]:
        g = machine["gpus"][0]
        lines.append(f"model.device auto runs on cuda:0 ({g['name']}, {g['free_gib']:.1f} of {g['total_gib']:.1f} GiB "
                     f"free) in {machine['auto']['dtype']}")
        if g["free_gib"] < 20:
            lines.append("under 20 GiB free: a 7B model needs model.quantization: nf4 (configs/paper/README.md)")
    else:
        lines.append("no usable GPU: configs run on the CPU in float32; configs/paper/qwen2.5-7b-instruct.yaml and "
                     "one-gpu-small.yaml ask for model.device: cuda and are refused here")
        if machine["nvidia_smi"]:
            lines.append(f"nvidia-smi shows {machine['nvidia_smi'][0]} but torch cannot use it: "
                         f"{torch_info['problem'] or 'check the driver'}")
    if not machine["extras"]["quant"]["installed"]:
        lines.append("model.quantization nf4 needs the quant extra: make venv EXTRAS=quant")
    if machine["default_model"] not in machine["models_prepared"]:
        lines.append(f"the default model is not prepared yet: fedse model prepare {machine['default_model']}")
    return lines
