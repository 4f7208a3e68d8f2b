"""Combination methods: reshape W's subspaces and add new ones."""
