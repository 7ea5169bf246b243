"""chexfound_jax.eval."""
