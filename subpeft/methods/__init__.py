"""Every PEFT method, one file each, sorted by the subspace view's families.

Importing :mod:`subpeft` registers them all (see :func:`subpeft.core.registry.list_methods`).
"""
