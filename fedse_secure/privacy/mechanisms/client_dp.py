"""``client-dp``: each round update clipped to L2 norm C and a share of Gaussian noise added before secure
aggregation, so the released sum carries noise of std sigma*C (``privacy.client_dp`` has the trust model)."""

from __future__ import annotations

from fedse_secure.privacy.mechanisms import MECHANISMS, PrivacyMechanism, ReleaseRefused


@MECHANISMS.register("client-dp")
class ClientDp(PrivacyMechanism):
    name = "client-dp"
    private = True

    @classmethod
    def check(cls, experiment) -> None:
        from fedse_secure.aggregation.rules import RULES
        from fedse_secure.config import FEDERATED_MODES

        fed = experiment.federation
        if fed.mode not in FEDERATED_MODES:
            raise ValueError(
                f"privacy.mode client-dp noises the update that secure aggregation sums, but federation.mode "
                f"{fed.mode} never aggregates; use privacy.mode dp-sgd or none, or a federated mode (fedse, fedit)"
            )
        if not fed.backend().capabilities.hides_inputs:
            raise ValueError(
                "privacy.mode client-dp adds noise in shares that only cancel into a private sum under secure "
                "aggregation; set federation.secure_aggregation to a backend that hides inputs (masking or crypten)"
            )
        if not RULES.get(fed.aggregation).payload_is_update:
            raise ValueError(
                f"privacy.mode client-dp clips each institution's update as one vector; with federation.aggregation "
                f"{fed.aggregation} the payload is not that update. Use fedavg or ffa"
            )

    @classmethod
    def project(cls, privacy, training, num_records):
        from fedse_secure.privacy.client_dp import client_event

        return client_event(privacy)

    def open_round(self, round_id: int) -> None:
        # The release happens after training, but its cost is known now: refuse before any data is touched.
        self.ensure_affordable(self.project(self.privacy, None, 0))

    def release(self, round_id, payload):
        from fedse_secure.privacy.client_dp import privatize_update

        from fedse_secure.privacy.noise import SecureRandom

        # The noise share must be unpredictable to everyone else (whoever can regenerate it can subtract it from
        # the sum), so it comes from a CSPRNG keyed from OS entropy, never from the experiment seed.
        noisy, info = privatize_update(payload, self.privacy, self.terms.min_contributors, SecureRandom())
        bound = self.terms.value_bound
        if bound is not None and info.max_abs_value > bound:
            raise ReleaseRefused(
                f"{self.institution}: the noised update reaches {info.max_abs_value:.3g}, outside the secure-"
                f"aggregation clip range {bound:g}, so clipping it would change the noise the ledger records; raise "
                "federation.secure_aggregation.clip_range or lower privacy.max_grad_norm"
            )
        self.record(round_id, info.event)
        return noisy, {"clip_norm": self.privacy.max_grad_norm, "update_norm": info.original_norm,
                       "clipped": info.clipped, "noise_std": info.noise_std,
                       "contributors_assumed": self.terms.min_contributors}
