"""fedse-secure: privacy-hardened federated self-evolution of LLM agents (Fed-SE, arXiv 2512.08870)."""

import os as _os

__version__ = "0.1.0"

# torch's OpenMP pool spin-waits by default: when its threads share cores with other processes (institutions,
# CrypTen parties, Flower nodes, a test runner), a one-token forward pass was measured 100x slower (1.4 s vs
# 0.012 s on 2 cores). Passive waiting costs nothing measurable when the cores are free. It must be set before
# torch is first imported, which the package never does at import time.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# bitsandbytes (the optional 4-bit base model) looks, on CPUs with AVX512-BF16, for a fused kernel it would fetch
# from the Hugging Face hub through the `kernels` package; we never install that package (nothing is downloaded at
# run time) and its fallback computes the same thing, but the warning it logs at import lands on every command's
# stderr, where a bad-input error must be the only line. Silence that one logger, not bitsandbytes.
import logging as _logging  # noqa: E402

_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
