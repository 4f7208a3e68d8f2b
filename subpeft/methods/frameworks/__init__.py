"""Frameworks on top of methods: combinations of several methods in one model (UniPELT)."""
