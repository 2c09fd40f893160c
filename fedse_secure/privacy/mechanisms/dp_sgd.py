"""``dp-sgd``: record-level DP-SGD (Opacus) on the institution's trajectories; one trajectory = one record."""

from __future__ import annotations

from fedse_secure.privacy.mechanisms import MECHANISMS, PrivacyMechanism


@MECHANISMS.register("dp-sgd")
class DpSgd(PrivacyMechanism):
    name = "dp-sgd"
    private = True
    #: Poisson sample rate of the last round trained (reported; it reveals the record count, see SECURITY.md).
    last_sample_rate: float | None = None

    @classmethod
    def check(cls, experiment) -> None:
        if experiment.model.history_turns is not None:
            raise ValueError(
                "model.history_turns trains one example per turn, so a trajectory would be several DP-SGD records "
                "and the privacy unit (one trajectory) would not hold; unset model.history_turns or use "
                "privacy.mode client-dp"
            )
        if experiment.training.gradient_checkpointing:
            raise ValueError("training.gradient_checkpointing cannot be used with privacy.mode dp-sgd: Opacus's "
                             "per-sample hooks miss the layers it recomputes, so those gradients would not be clipped; "
                             "set it to false and lower training.micro_batch_size to save memory")
        if experiment.model.dtype == "float16":
            raise ValueError("model.dtype float16 cannot be used with privacy.mode dp-sgd (per-sample clipping would "
                             "need loss scaling); use bfloat16 or float32")

    @classmethod
    def project(cls, privacy, training, num_records):
        from fedse_secure.privacy.dpsgd import dp_sgd_event

        return dp_sgd_event(num_records, training, privacy)

    def train(self, round_id, model, examples, training, pad_token_id, seed, progress, label):
        from fedse_secure.privacy.dpsgd import train_dp_sgd

        if not examples:
            # Nothing to train on: no release of private data, so no privacy is spent and nothing is recorded.
            return {"examples": 0, "steps": 0, "loss": None}
        self.ensure_affordable(self.project(self.privacy, training, len(examples)))
        bar = progress.task(f"{label}: DP-SGD train", total=None)
        model.train()
        try:
            result = train_dp_sgd(model, examples, training, self.privacy, pad_token_id, seed)
        finally:
            model.eval()
        bar.close()
        self.record(round_id, result.event)
        self.last_sample_rate = result.sample_rate
        return {"examples": len(examples), "steps": result.steps, "loss": result.mean_loss}

    def report(self):
        return {**super().report(), "noise_multiplier": self.privacy.noise_multiplier,
                "sample_rate": self.last_sample_rate}
