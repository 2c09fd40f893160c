"""Cross-organisation deployment over Flower 1.42 (SuperLink = coordinator, SuperNode = institution).

Flower is only the transport here: our coordinator and institution code, and our secure-aggregation state
machines, run unchanged inside a Flower ``ServerApp``/``ClientApp``; each secure-aggregation stage becomes
one round of Flower messages. Keep this package's top level free of heavy imports (``fedse --help``).

Modules:
    pki         local CA, TLS certificates, node-authentication keys and Ed25519 identity keys
    processes   command lines and environment for flower-superlink / flower-supernode / flwr run
"""
