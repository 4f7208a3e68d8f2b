"""Reconstruction methods: φ re-weights or reshapes the subspaces W already has."""
