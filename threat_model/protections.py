"""The protections a threat check can switch off (``fedse threats verify --disable NAME``), and what each is.

Kept apart from the harness, with no imports, so that the CLI can list them in its help without loading
numpy and the checks."""

PROTECTIONS: dict[str, str] = {
    "masking": "secure aggregation by pairwise masking (SecAgg+); off = secure_aggregation: none",
    "signatures": "Ed25519 signatures on key advertisements and survivor lists, verified against the registry",
    "aead": "AES-256-GCM on the Shamir shares, with setup digest, round, sender and receiver in the AD",
    "consistency": "signed survivor list + reveal-once rule at every client (SecAgg consistency round)",
    "requirements": "institutions pin the protocol: they refuse a setup weaker than Bell et al.'s parameters for "
                    "their declared colluder and dropout fractions (MaskingRequirements)",
    "input-auth": "masked inputs tagged (AES-GMAC bound to session, round, sender) and the released sum checked "
                  "against +-n x clip",
    "share-commitments": "dealer-signed commitments to every Shamir share: corrupted shares are identified and "
                         "outvoted",
    "dp": "differential privacy: DP-SGD (record level) or client-level DP noise",
    "ledger-chain": "hash-chained privacy ledger with sealed head, checked by PrivacyLedger.verify",
    "budget": "BudgetGuard refuses a round before training if it would exceed the epsilon budget",
    "tls": "TLS to the coordinator, certificate verified against the federation CA",
    "policy": "the institution's node policy: a request weaker than it is refused before any data is touched",
    "ledger-lock": "the ledger's lock held across the budget check, training and the append",
    "export-filter": "the node policy's export filter: no statistic computed from private data without DP leaves",
    "adapter-signature": "global adapters loaded only if the coordinator's Ed25519 signature verifies",
    "audit-chain": "hash-chained audit log with sealed head, checked by AuditLog.verify",
    "one-input-per-round": "an institution answers the input stage of a round of a run at most once (remembered in "
                           "memory and in its audit log): a re-run of the round is refused before training "
                           "(node policy secure_aggregation.one_input_per_round)",
}
