"""Attacks on erased models: adversarial prompts and tokens that try to bring an erased concept back."""
