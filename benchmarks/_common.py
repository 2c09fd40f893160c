"""What the model benchmarks share: the options each takes, and torch set up offline and quiet.

Run as scripts (``python benchmarks/<name>.py``), so this file is importable from beside them.
"""

from __future__ import annotations

import argparse
import os
import warnings


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); use 1 on a loaded machine, oversubscribed threads spin")
    parser.add_argument("--device", default="auto", help="model.device: auto, cpu, cuda, cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="model.dtype: auto, float32, bfloat16, float16 (default: auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def model_config(args):
    """The ModelConfig the benchmark's options describe (validated: a CUDA device that is not here is refused)."""
    from fedse_secure.config import ModelConfig

    return ModelConfig(name_or_path=args.model, device=args.device, dtype=args.dtype)


def offline_torch(threads: int | None):
    """Import torch with the hub switched off (models come from local paths only) and library chatter muted."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    return torch
