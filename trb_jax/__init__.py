"""trb_jax: Trust-Region Behavior Blending for on-policy distillation, in JAX."""

__version__ = "0.1.0"
