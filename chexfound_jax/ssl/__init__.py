"""chexfound_jax.ssl."""
