"""A deployed institution holds the coordinator to its own secure-aggregation requirements (its node policy's
``secure_aggregation`` section, else the defaults), never to the coordinator's settings, and refuses a weaker
setup with one line naming the parameter, before it trains for the round."""

from __future__ import annotations

import pytest
import yaml

from fedse_secure.config import load_config
from fedse_secure.federation.deploy_config import InstitutionDeployConfig
from fedse_secure.federation.wire import REFUSED, StageRequest, run_key
from fedse_secure.secagg.backends.masking import MaskingBackend
from fedse_secure.secagg.masking import IdentityKey, MaskingRequirements, MaskingSettings, PublicKeyRegistry


@pytest.fixture
def deployment(repo_root, tmp_path):
    """The smoke experiment as a coordinator sends it (it claims the default setup, t = 3 of 3), a server that
    proposes a weaker one (no colluders assumed, t = 2 of 3), and maze-clinic's worker session with its identity
    key, registry and node policy on disk."""
    exp = load_config(repo_root / "configs" / "smoke.yaml")
    weak = MaskingSettings(colluder_fraction=0.0, threshold=2)
    names = [c.name for c in exp.clients]
    ids = {n: IdentityKey.generate() for n in names}
    ids["maze-clinic"].save(tmp_path / "identity.pem")
    (tmp_path / "registry.json").write_text(PublicKeyRegistry.from_identities(ids).to_json())

    def config(**secure_aggregation) -> InstitutionDeployConfig:
        policy = {"privacy": {"mechanisms": ["none"]}}
        if secure_aggregation:
            policy["secure_aggregation"] = secure_aggregation
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
        return InstitutionDeployConfig.model_validate({
            "name": "maze-clinic", "env": "maze", "seed_demos": 2, "data_dir": str(tmp_path / "data"),
            "superlink": {"ca_cert": str(tmp_path / "ca.pem")},
            "runtime_api": {"cert": str(tmp_path / "rt.pem"), "key": str(tmp_path / "rt.key")},
            "identity_key": str(tmp_path / "identity.pem"), "node_auth_key": str(tmp_path / "node_auth"),
            "registry": str(tmp_path / "registry.json"),
            "policy": str(tmp_path / "policy.yaml"),
        })

    registry = PublicKeyRegistry.from_identities(ids)
    server = MaskingBackend(weak).server(1, names, 16, registry)
    return exp, config, server


@pytest.mark.slow
def test_a_deployed_institution_refuses_a_weak_setup_before_training(deployment):
    from fedse_secure.federation.flower.worker import InstitutionSession

    exp, config, server = deployment
    setup = server.start()["maze-clinic"]
    assert server.machine.setup.threshold == 2  # what the coordinator proposes
    session = InstitutionSession(config())
    exp_json = exp.model_dump_json()
    reply = session.handle(StageRequest("advertise_keys", 1, run_key(exp_json), exp_json, train=True,
                                        blobs={"request": setup}))
    assert reply.refusal == REFUSED and not reply.blobs
    assert reply.error.startswith("UnsafeSetupError: maze-clinic refuses the setup of round 1: threshold: 2 is below 3")
    assert len(reply.error.splitlines()) == 1
    # It refused before the local round: no training report, nothing spent.
    assert reply.report == {}
    # The backend it built holds it to its own requirements (the defaults), not to what the coordinator sent, and
    # counts the colluders among the institutions of the experiment it approved.
    backend = session.endpoint.backend
    assert backend.requirements == MaskingRequirements().for_roster(c.name for c in exp.clients)
    assert backend.settings == exp.federation.secure_aggregation


def test_an_institution_states_its_own_requirements_in_its_node_policy(deployment):
    from fedse_secure.federation.endpoint import institution_backend
    from fedse_secure.federation.flower.worker import InstitutionSession
    from fedse_secure.policy import PolicyError

    exp, config, server = deployment
    session = InstitutionSession(config(colluder_fraction=0.0, min_participants=3))
    assert session.policy.secure_aggregation.masking_requirements() == MaskingRequirements(colluder_fraction=0.0)
    backend = institution_backend(exp, session.policy)
    assert backend.requirements == MaskingRequirements(colluder_fraction=0.0).for_roster(c.name for c in exp.clients)
    # With no colluders assumed it accepts the coordinator's t = 2 of 3.
    client = backend.client("maze-clinic", session.identity, session.registry)
    client.screen(server.start()["maze-clinic"])
    with pytest.raises(PolicyError, match="colluder_fraction"):
        InstitutionSession(config(colluder_fraction=0.7))


def test_the_weak_coordinator_settings_are_themselves_consistent():
    """The coordinator's own config check accepts t = 2 of 3 only when it assumes no colluders."""
    MaskingBackend(MaskingSettings(colluder_fraction=0.0, threshold=2)).check(3)
    with pytest.raises(ValueError, match="threshold=2 is below 3"):
        MaskingBackend(MaskingSettings(threshold=2)).check(3)
