"""The agent: an HF causal LM with a peft LoRA adapter, acting through an environment's chat prompt."""

from __future__ import annotations

from dataclasses import dataclass

from fedse_secure.models.adapters import get_adapter_state, peft_config_dict, set_adapter_state
from fedse_secure.config import LoraSettings, ModelConfig


@dataclass
class AgentModel:
    """One base model + one LoRA adapter. In simulation all institutions share it and swap adapter states, so
    the base weights are loaded once (they are frozen and identical everywhere)."""

    model: object
    tokenizer: object
    model_path: str
    #: torch.device and torch.dtype of the base model (the LoRA adapter is float32 on the same device).
    device: object = None
    dtype: object = None

    @classmethod
    def load(cls, model_cfg: ModelConfig, lora: LoraSettings, seed: int) -> AgentModel:
        import torch
        from peft import LoraConfig, get_peft_model

        from fedse_secure.models import load_model_and_tokenizer
        from fedse_secure.models.device import check_single_device

        if model_cfg.num_threads:
            torch.set_num_threads(model_cfg.num_threads)
        loaded = load_model_and_tokenizer(model_cfg.name_or_path, model_cfg.dtype, model_cfg.device,
                                          model_cfg.quantization)
        # The initial A matrices are random: seed them so every institution (and every rerun) starts from the
        # same global adapter. peft draws them on the CPU and then moves them next to their base layer, so the
        # initial adapter is the same whatever the device.
        torch.manual_seed(seed)
        layers = None
        targets = lora.target_modules
        if lora.top_layers is not None:
            from fedse_secure.config import ConfigError, lora_layers_problem

            blocks = loaded.model.config.num_hidden_layers
            problem = lora_layers_problem(model_cfg.name_or_path, lora.top_layers, blocks)
            if problem:
                raise ConfigError(problem)
            layers = list(range(blocks - lora.top_layers, blocks))
            if targets == "all-linear":
                # peft takes layers_to_transform only with named targets: all-linear spelled out as the leaf names
                # of the linear layers inside the transformer blocks (the LM head is outside them, as in all-linear).
                output = loaded.model.get_output_embeddings()
                targets = sorted({name.rsplit(".", 1)[-1] for name, module in loaded.model.named_modules()
                                  if isinstance(module, torch.nn.Linear) and module is not output
                                  and ".layers." in name})
                if not targets:
                    raise ConfigError(f"lora.top_layers: found no linear layer under '.layers.' in "
                                      f"{model_cfg.name_or_path}; name lora.target_modules explicitly")
        lora_cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            layers_to_transform=layers,
            task_type="CAUSAL_LM",
            bias="none",
        )
        # The base model is on its device before peft wraps it, so each adapter is created beside its layer
        # (opacus#820: adapters left behind on the CPU corrupted DP-SGD updates silently).
        try:
            peft_model = get_peft_model(loaded.model, lora_cfg)
        except ValueError as err:  # peft: a target module that is missing or of a type LoRA cannot wrap
            from fedse_secure.config import ConfigError

            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise ConfigError(f"lora.target_modules {lora.target_modules}: peft cannot apply LoRA there ({reason}); "
                              "name linear layers such as q_proj, or all-linear") from None
        check_single_device(peft_model)
        peft_model.eval()
        return cls(model=peft_model, tokenizer=loaded.tokenizer, model_path=loaded.path, device=loaded.device,
                   dtype=loaded.dtype)

    def adapter_state(self):
        return get_adapter_state(self.model)

    def load_adapter_state(self, state) -> None:
        set_adapter_state(self.model, state)

    def peft_config(self) -> dict:
        cfg = peft_config_dict(self.model)
        cfg["base_model_name_or_path"] = self.model_path
        return cfg

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
