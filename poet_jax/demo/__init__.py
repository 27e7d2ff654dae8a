"""The embedded synthetic demo (`poet-jax demo`): task, tokenizer, SFT, runs."""
