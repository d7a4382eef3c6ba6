"""TCVM (Temporal Contrasting Video Montage) in JAX/Flax."""

__version__ = "0.1.0"
