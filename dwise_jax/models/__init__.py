"""DwiseNeuro in Flax NNX: the core, the cortex and the per-mouse readouts."""
