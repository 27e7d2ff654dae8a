"""poet_jax."""
