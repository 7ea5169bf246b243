"""chexfound_jax.train."""
