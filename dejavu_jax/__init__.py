"""dejavu_jax: fast, fault-tolerant generative LLM serving through KV-cache streaming, in JAX."""

__version__ = "0.1.0"
