"""Aggregation of LoRA adapters: flat-vector packing (``flat``) and rules defined over sums (``rules``),
secure-aggregation ready. Adapter files and the adapter's bytes form live with the model: ``models.adapters``."""
