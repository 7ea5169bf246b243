"""chexfound_jax: the CheXFound chest X-ray foundation model in JAX/Flax."""

__version__ = "0.1.0"
