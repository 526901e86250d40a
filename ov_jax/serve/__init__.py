"""OpenAI-compatible serving: request schema and validation, the ASGI app, metrics (`ov_jax.serve.app`),
multi-host lockstep (`ov_jax.serve.lockstep`), and :func:`wait_until_healthy` for clients and launchers."""

from ov_jax.serve.health import wait_until_healthy

__all__ = ["wait_until_healthy"]
