"""Prompt-kind methods: virtual tokens in the input (prompt tuning, P-tuning) or per-layer prefixes
in every attention layer (prefix tuning, P-tuning v2). One module per adapter for the whole model
(:class:`subpeft.core.prompt.PromptAdapter`), none mergeable; files in Hugging Face PEFT's format.
"""
