"""dwise_jax: DwiseNeuro, the Sensorium 2023 winning model, in JAX and Flax NNX."""

__version__ = "0.1.0"
