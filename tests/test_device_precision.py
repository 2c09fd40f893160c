"""model.device / model.dtype / model.quantization and the training memory options, on the CPU.

The CUDA branches of the resolution logic are exercised by replacing torch.cuda's queries (there is no GPU in
CI); the training paths run for real on the tiny Llama: bfloat16, micro-batches, gradient checkpointing, an NF4
base (bitsandbytes 0.50 quantises on the CPU), DP-SGD's micro-batches and its LoRA-update sanity check.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedse_secure.config import (
    ConfigError,
    ExperimentConfig,
    LoraSettings,
    ModelConfig,
    PrivacyConfig,
    TrainingConfig,
    parse_config,
)
from fedse_secure.models import device as dev

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def _smoke() -> dict:
    return yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())


# -- resolution --------------------------------------------------------------------------------------------------
@pytest.fixture()
def fake_gpus(monkeypatch):
    """torch.cuda answering as a machine with the given compute capabilities would (queries only)."""

    def install(*capabilities):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"GPU{i}")
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda d=None: capabilities[getattr(d, "index", None) or 0])

    return install


def test_auto_is_the_cpu_in_float32_without_a_gpu(fake_gpus):
    fake_gpus()
    where = dev.placement("auto", "auto")
    assert (where.device, where.dtype) == (torch.device("cpu"), torch.float32)
    assert dev.placement("cpu", "bfloat16").dtype == torch.bfloat16


def test_auto_is_the_first_gpu_in_bfloat16_where_it_is_native(fake_gpus):
    fake_gpus((9, 0), (7, 0))
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert dev.resolve_dtype("auto", torch.device("cuda", 1)) == torch.float32  # Volta: bf16 would be emulated
    assert dev.resolve_dtype("float16", torch.device("cuda", 1)) == torch.float16
    with pytest.raises(ValueError, match=r"2 CUDA device\(s\), cuda:0..cuda:1"):
        dev.check_device("cuda:2")


def test_device_strings_are_checked(fake_gpus):
    fake_gpus()
    for bad in ("gpu", "cuda:", "cuda:x", "CUDA", "mps", ""):
        with pytest.raises(ValueError, match="is not a device"):
            dev.parse_device(bad)
    with pytest.raises(ValueError, match="no CUDA device on this machine"):
        dev.check_device("cuda")
    dev.check_device("cpu")
    dev.check_device("auto")


# -- configuration -----------------------------------------------------------------------------------------------
def test_defaults_follow_the_machine():
    cfg = parse_config(_smoke())
    assert (cfg.model.device, cfg.model.dtype, cfg.model.quantization) == ("auto", "auto", "none")
    assert cfg.training.micro_batch_size is None and cfg.training.gradient_checkpointing is False


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_one_fails_validation_naming_model_device(device):
    data = _smoke()
    data["model"]["device"] = device
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="x.yaml")
    message = str(err.value)
    assert message.startswith("x.yaml: model.device: no CUDA device on this machine") and "\n" not in message
    # A coordinator validates for the institutions' machines, not its own.
    cfg = ExperimentConfig.model_validate(data, context={"check_local_device": False})
    assert cfg.model.device == device


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
def test_simulate_with_cuda_on_a_cpu_machine_exits_before_any_work(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedse_cli.main", "simulate", str(REPO / "configs" / "smoke.yaml"),
                           "--set", "model.device=cuda", "--out", str(out), "-q"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.device" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_bad_device_and_dtype_values_name_the_field():
    data = _smoke()
    data["model"]["device"] = "gpu"
    with pytest.raises(ConfigError, match=r"x.yaml: model.device: 'gpu' is not a device; use one of auto, cpu"):
        parse_config(data, source="x.yaml")
    data["model"]["device"] = "cpu"
    data["model"]["dtype"] = "float8"
    with pytest.raises(ConfigError, match="x.yaml: model.dtype:"):
        parse_config(data, source="x.yaml")


def test_nf4_without_bitsandbytes_is_a_one_line_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    data = _smoke()
    data["model"]["quantization"] = "nf4"
    with pytest.raises(ConfigError, match=r"model.quantization: nf4 needs bitsandbytes; install the extra with "
                                          r"`make venv EXTRAS=quant`"):
        parse_config(data, source="x.yaml")


@pytest.mark.parametrize("override, message", [
    ({"training": {"gradient_checkpointing": True}},
     "training.gradient_checkpointing cannot be used with privacy.mode dp-sgd"),
    ({"model": {"dtype": "float16"}}, "model.dtype float16 cannot be used with privacy.mode dp-sgd"),
])
def test_dp_sgd_refuses_what_would_skip_or_break_clipping(override, message):
    data = _smoke()
    data["privacy"] = {"mode": "dp-sgd"}
    for section, values in override.items():
        data[section].update(values)
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


# -- the model on its device -------------------------------------------------------------------------------------
def test_a_bfloat16_base_keeps_a_float32_adapter_on_one_device():
    from fedse_secure.agent.policy import AgentModel

    agent = AgentModel.load(ModelConfig(name_or_path="tiny-llama", device="cpu", dtype="bfloat16"), LoraSettings(), 0)
    assert agent.device == torch.device("cpu") and agent.dtype == torch.bfloat16
    frozen = {p.dtype for p in agent.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in agent.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    state = agent.adapter_state()  # what secure aggregation sees: float32 on the CPU
    assert {(v.dtype, v.device.type) for v in state.values()} == {(torch.float32, "cpu")}


def test_parameters_on_two_devices_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    dev.check_single_device(model)
    model[1].to("meta")
    with pytest.raises(RuntimeError, match="several devices"):
        dev.check_single_device(model)


# -- training memory options -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def agent():
    from fedse_secure.agent.policy import AgentModel

    return AgentModel.load(ModelConfig(name_or_path="tiny-llama"), LoraSettings(), seed=0)


@pytest.fixture(scope="module")
def examples(agent):
    from fedse_secure.agent.sft import encode_for_training
    from fedse_secure.envs import generate_demonstrations

    demos = generate_demonstrations("maze", [0, 1, 2, 3]) + generate_demonstrations("wordle", [0, 1])
    # AgentGym's openings (rules, worked example, vocabulary) run to ~630 tokens: room for them and the replies.
    return encode_for_training(agent.tokenizer, demos, 1024)


def _train(agent, examples, **options):
    from fedse_secure.agent.sft import train_lora

    start = agent.adapter_state()
    cfg = TrainingConfig(learning_rate=1e-3, epochs_per_round=1, batch_size=4, max_steps_per_round=2, **options)
    stats = train_lora(agent.model, examples, cfg, agent.tokenizer.pad_token_id, seed=3)
    after = agent.adapter_state()
    agent.load_adapter_state(start)
    return after, stats


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("options", [
    {"micro_batch_size": 1}, {"micro_batch_size": 3}, {"gradient_checkpointing": True},
    {"gradient_checkpointing": True, "micro_batch_size": 2},
])
def test_micro_batches_and_checkpointing_give_the_whole_batch_update(agent, examples, options):
    reference, ref_stats = _train(agent, examples)
    after, stats = _train(agent, examples, **options)
    assert _max_diff(reference, after) < 1e-6
    assert stats.losses == pytest.approx(ref_stats.losses, rel=1e-5)
    assert _max_diff(reference, agent.adapter_state()) > 1e-5, "training must move the adapter"
    assert not agent.model.training and not agent.model.is_gradient_checkpointing  # rollouts get the plain model


@pytest.mark.filterwarnings("ignore:DP-SGD noise derived from the seed")
def test_dp_sgd_micro_batches_are_one_noisy_step(agent, examples):
    """Split Poisson batches are clipped per record and summed, and noised once: the same update as one pass."""
    from fedse_secure.privacy import train_dp_sgd

    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=0.5, max_grad_norm=0.5, expected_batch_size=3)
    start = agent.adapter_state()
    results = {}
    for micro in (None, 1, 2):
        agent.load_adapter_state(start)
        agent.model.train()
        cfg = TrainingConfig(learning_rate=1e-3, epochs_per_round=1, max_steps_per_round=3, micro_batch_size=micro)
        res = train_dp_sgd(agent.model, examples, cfg, privacy, agent.tokenizer.pad_token_id, seed=5,
                           reproducible_noise=True)
        agent.model.eval()
        results[micro] = (agent.adapter_state(), res)
    agent.load_adapter_state(start)
    ref_state, ref = results[None]
    assert max(ref.batch_sizes) >= 2, "the sampled batches must be big enough to split"
    for micro in (1, 2):
        state, res = results[micro]
        assert _max_diff(ref_state, state) < 1e-6
        assert res.batch_sizes == ref.batch_sizes and res.event == ref.event
        assert res.round_epsilon == ref.round_epsilon  # one accounted step per logical step


def test_dp_sgd_refuses_gradient_checkpointing_at_run_time(agent, examples):
    from fedse_secure.privacy import DPTrainingError, train_dp_sgd

    agent.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    agent.model.train()
    try:
        with pytest.raises(DPTrainingError, match="gradient checkpointing is on"):
            train_dp_sgd(agent.model, examples, TrainingConfig(max_steps_per_round=1), PrivacyConfig(mode="dp-sgd"),
                         agent.tokenizer.pad_token_id, seed=0)
    finally:
        agent.model.gradient_checkpointing_disable()
        agent.model.eval()


def test_the_lora_update_sanity_check_catches_a_lost_update(agent, examples, monkeypatch):
    """opacus#820: an optimiser step that never reaches the adapter must not pass as a trained round."""
    from fedse_secure.privacy import DPTrainingError, train_dp_sgd

    start = agent.adapter_state()
    cfg = TrainingConfig(learning_rate=1e-3, max_steps_per_round=2)
    privacy = PrivacyConfig(mode="dp-sgd", expected_batch_size=3)
    agent.model.train()
    try:
        train_dp_sgd(agent.model, examples, cfg, privacy, agent.tokenizer.pad_token_id, seed=1)  # passes when moved
        agent.load_adapter_state(start)
        monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
        with pytest.raises(DPTrainingError, match="no LoRA weight changed"):
            train_dp_sgd(agent.model, examples, cfg, privacy, agent.tokenizer.pad_token_id, seed=1)
    finally:
        agent.load_adapter_state(start)
        agent.model.eval()


def test_the_lora_update_sanity_check_catches_non_finite_weights():
    from fedse_secure.privacy.dpsgd import DPTrainingError, _check_lora_update

    before = [torch.zeros(3)]
    _check_lora_update(before, [torch.ones(3)], moved_expected=True)
    _check_lora_update(before, [torch.zeros(3)], moved_expected=False)  # σ = 0 and only empty batches
    with pytest.raises(DPTrainingError, match="no LoRA weight changed"):
        _check_lora_update(before, [torch.zeros(3)], moved_expected=True)
    with pytest.raises(DPTrainingError, match="non-finite"):
        _check_lora_update(before, [torch.tensor([1.0, float("nan"), 0.0])], moved_expected=True)


# -- a 4-bit base ------------------------------------------------------------------------------------------------
def test_an_nf4_base_trains_its_adapter_with_sft_and_dp_sgd(examples):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.agent.sft import train_lora
    from fedse_secure.privacy import train_dp_sgd

    agent = AgentModel.load(ModelConfig(name_or_path="tiny-llama", quantization="nf4"), LoraSettings(), seed=0)
    layer = agent.model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Linear4bit)
    start = agent.adapter_state()
    train_lora(agent.model, examples, TrainingConfig(learning_rate=1e-3, max_steps_per_round=2,
                                                     gradient_checkpointing=True), agent.tokenizer.pad_token_id, 0)
    assert _max_diff(start, agent.adapter_state()) > 1e-5
    agent.load_adapter_state(start)
    agent.model.train()
    res = train_dp_sgd(agent.model, examples, TrainingConfig(learning_rate=1e-3, max_steps_per_round=2),
                       PrivacyConfig(mode="dp-sgd", expected_batch_size=3), agent.tokenizer.pad_token_id, 0)
    assert res.steps == 2 and _max_diff(start, agent.adapter_state()) > 1e-5


def test_a_float16_base_trains_with_loss_scaling(examples):
    from fedse_secure.agent.policy import AgentModel
    from fedse_secure.agent.sft import train_lora

    agent = AgentModel.load(ModelConfig(name_or_path="tiny-llama", device="cpu", dtype="float16"), LoraSettings(), 0)
    start = agent.adapter_state()
    stats = train_lora(agent.model, examples, TrainingConfig(learning_rate=1e-3, batch_size=2, max_steps_per_round=2,
                                                             micro_batch_size=1), agent.tokenizer.pad_token_id, 0)
    after = agent.adapter_state()
    assert all(torch.isfinite(torch.tensor(stats.losses))) and _max_diff(start, after) > 1e-5
    assert all(bool(torch.isfinite(v).all()) for v in after.values())
