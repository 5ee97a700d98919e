"""idm_jax: Improved Distribution Matching for dataset condensation, in JAX."""
