"""Mechanisms that several methods share, each in its own module with public names.

- :mod:`~subpeft.mechanisms.low_rank`: ΔW = s·B·G·A (:class:`LowRank`, :class:`LowRankAdapter`), behind
  LoRA, TriLoRA, FLoRA, AdaLoRA, LoRA-Dash, DoRA and the parallel adapter;
- :mod:`~subpeft.mechanisms.scaling`: diagonal scaling of a frozen weight (IA³, SSB, SSL);
- :mod:`~subpeft.mechanisms.bottleneck`: the bottleneck adapter (Houlsby, Pfeiffer, AdaMix, UniPELT);
- :mod:`~subpeft.mechanisms.virtual`: virtual tokens (the prompt-kind methods' config and module);
- :mod:`~subpeft.mechanisms.prefix_kv`: per-layer prefix keys/values (prefix tuning, P-tuning v2, UniPELT);
- :mod:`~subpeft.mechanisms.fastpath`: when a fused fast path may replace the generic one.

Methods (``subpeft/methods/<family>/``) import from here; nothing here registers a method.
"""
