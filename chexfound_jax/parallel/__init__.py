"""chexfound_jax.parallel."""
