"""Shared test set-up: 8 simulated CPU devices (set before jax starts) and tiny checkpoints."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- tiny random checkpoints (ov_jax.tiny), built once per test session -------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Path to a tiny random LLaVA-OneVision checkpoint (transformers layout, separate lm_head)."""
    from ov_jax.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def tiny_ckpt_tied(tmp_path_factory):
    """Like ``tiny_ckpt`` but with ``tie_word_embeddings=True`` (no lm_head in the file, as the 0.5B)."""
    from ov_jax.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_ckpt_tied"), tie_word_embeddings=True)


# --- fault injection -------------------------------------------------------------------------------------


@pytest.fixture
def fail_next_call(monkeypatch):
    """``arm(engine, name)``: the next call of the engine executable ``name`` (``"_decode"``, ``"_insert"``,
    ``"_prefill"``, …) runs and then raises ``RuntimeError("injected <name> failure")``, as a device error
    after the donated buffers were consumed would. Returns a one-item list, ``[True]`` until it fired."""
    def arm(engine, name):
        original, armed = getattr(engine, name), [True]

        def executable(*key):
            exe = original(*key)

            def call(*args):
                out = exe(*args)
                if armed[0]:
                    armed[0] = False
                    raise RuntimeError(f"injected {name} failure")
                return out
            return call

        monkeypatch.setattr(engine, name, executable)
        return armed

    return arm
