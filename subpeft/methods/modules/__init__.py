"""Module-level adapters: bottlenecks inserted into transformer blocks (Houlsby, Pfeiffer, AdaMix).

Each sits on a block's output projection (attention output, FFN output) and adds ``f(h)`` to that
projection's output ``h`` before the residual add and LayerNorm. Where in a block they go comes from
the architecture description (:mod:`subpeft.core.arch`); explicit ``targets`` put them on any Linear.
"""
