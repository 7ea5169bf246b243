"""chexfound_jax.data."""
