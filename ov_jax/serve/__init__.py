"""OpenAI-compatible serving: request schema and validation, the ASGI app, metrics (`ov_jax.serve.app`)."""
