"""The train step: freezing, AdamW against torch, gradient accumulation, mixed precision, 8-device sharding."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ov_jax import train
from ov_jax.model import LlavaOnevision
from ov_jax.train import freeze as freezing
from train_helpers import mixed_batch, norm_relative

# SigLIP has no RoPE: softmax ignores the key bias, its exact gradient is 0 and Adam turns the rounding noise
# there into +-lr steps that differ between any two summation orders. It changes no output; tests that compare
# params across orders skip it.
NOISE_ONLY = "vision.layers.k.bias"


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return LlavaOnevision.from_pretrained(tiny_ckpt)


def _batch(config, seed, rows=("video", "text")):
    inputs, labels = mixed_batch(config, np.random.default_rng(seed), padding="right", rows=rows)
    return train.make_batch(config, labels=labels, **inputs)


def _flat(tree):
    return {freezing.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _quiet_step(config, **kwargs):
    return train.make_train_step(config, train.optimizer(1e-3), compute_dtype="float32", log=None, **kwargs)


def test_frozen_towers_get_no_update_and_the_table_counts_them(model):
    tables = []
    step = train.make_train_step(model.config, train.optimizer(1e-2), freeze="vision_tower,projector",
                                 compute_dtype="float32", log=tables.append)
    state = step.init(model.params)
    before = _flat(model.params)
    state, metrics = step(state, [_batch(model.config, 0)])
    after = _flat(state.params)
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        frozen = name.startswith(("vision.", "projector."))
        assert changed != frozen or name == "vision.post_ln.scale" or name == "vision.post_ln.bias", name
    # no optimizer moments for frozen leaves
    moments = _flat(state.opt_state)
    assert moments and not any(k.startswith(("vision", "projector")) or ".vision." in k for k in moments)
    lines = {line.split()[0]: line.split()[1:] for line in tables[0].splitlines()[1:]}
    counts = {t: sum(int(np.prod(v.shape)) for k, v in before.items() if k.startswith(p))
              for t, p in (("vision", "vision."), ("projector", "projector."), ("LM", "text."))}
    assert lines["vision"][:2] == ["0", f"{counts['vision']:,}"]
    assert lines["projector"][:2] == ["0", f"{counts['projector']:,}"]
    assert lines["LM"][:2] == [f"{counts['LM']:,}", f"{counts['LM']:,}"]
    assert lines["newline"][0] == lines["newline"][1] == f"{model.config.text.hidden_size:,}"
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_freeze_patterns_are_checked(model):
    step = _quiet_step(model.config, freeze=["vision_tower", r"text\.layers\.nope"])
    with pytest.raises(train.FreezeError, match=r"'text\\\\.layers\\\\.nope' matches no parameter"):
        step.init(model.params)
    with pytest.raises(train.FreezeError, match="nor a valid regular expression"):
        _quiet_step(model.config, freeze="text.(").init(model.params)
    with pytest.raises(train.FreezeError, match="every parameter is frozen"):
        _quiet_step(model.config, freeze="vision_tower,projector,language_model,image_newline").init(model.params)
    mask = _quiet_step(model.config, freeze=r"\.(q|k)\.").trainable_mask(model.params)
    assert not mask["text"]["layers"]["q"]["kernel"] and mask["text"]["layers"]["v"]["kernel"]


def test_adamw_steps_equal_torch_adamw(model):
    """Three steps of our optimizer (warm-up 1, cosine to step 4, decay 0.1, clipping at 1.0) on fixed gradients
    against torch.optim.AdamW after clip_grad_norm_, with transformers' cosine schedule and its no-decay groups."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    params = {k: v for k, v in model.params.items() if k != "vision"}  # keep it small; every leaf kind stays
    grads = [jax.tree.map(lambda x: (rng.standard_normal(x.shape) * (0.5 + i)).astype(np.float32), params)
             for i in range(3)]
    opt = train.optimizer(1e-2, warmup_steps=1, total_steps=4, weight_decay=0.1, b1=0.8, b2=0.95, eps=1e-6)
    state = opt.init(params)
    ours = params
    for g in grads:
        updates, state = opt.update(g, state, ours)
        ours = jax.tree.map(jnp.add, ours, updates)
    flat = _flat(params)
    tensors = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in flat.items()}
    no_decay = [t for k, t in tensors.items() if k.endswith((".bias", ".scale"))]
    decay = [t for k, t in tensors.items() if not k.endswith((".bias", ".scale"))]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    sched = transformers.get_cosine_schedule_with_warmup(topt, num_warmup_steps=1, num_training_steps=4)
    for g in grads:
        for k, v in _flat(g).items():
            tensors[k].grad = torch.from_numpy(v)
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), 1.0)
        topt.step()
        sched.step()
    for k, v in _flat(ours).items():
        expected = tensors[k].detach().numpy()
        assert np.abs(v - expected).max() <= 1e-6, k
        assert not np.array_equal(v, flat[k]), k  # every leaf moved (step 0 has lr 0 under warm-up)


def test_grad_accumulation_equals_one_big_batch(model):
    """K=2 micro-batches of 2 rows (unequal token counts) == one batch of the 4 rows. Plain SGD with rate 1 makes
    the param change the (accumulated) gradient itself, compared per tensor (norm-relative)."""
    import optax

    config = model.config
    (i1, l1) = mixed_batch(config, np.random.default_rng(1), padding="right", rows=("video", "text"))
    (i2, l2) = mixed_batch(config, np.random.default_rng(2), padding="right", rows=("text", "video"))
    l2[1, 200:] = -100  # unequal label counts: a plain mean of micro-batch means would be wrong
    micro = [train.make_batch(config, labels=l1, **i1), train.make_batch(config, labels=l2, **i2)]
    big = train.make_batch(config, labels=np.concatenate([l1, l2]), input_ids=np.concatenate([i1["input_ids"],
                           i2["input_ids"]]), attention_mask=np.concatenate([i1["attention_mask"],
                           i2["attention_mask"]]), pixel_values_videos=np.concatenate(
                           [i1["pixel_values_videos"], i2["pixel_values_videos"]]))
    runs = []
    for k, batches in ((2, micro), (1, [big])):
        step = train.make_train_step(config, optax.sgd(1.0), grad_accum=k, compute_dtype="float32", log=None)
        state, metrics = step(step.init(model.params), batches)
        runs.append((metrics, jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), model.params, state.params)))
    (m_k, g_k), (m_1, g_1) = runs
    assert int(m_k["tokens"]) == int(m_1["tokens"]) == train.token_count(big) > 0
    assert abs(float(m_k["loss"]) - float(m_1["loss"])) <= 1e-6 * float(m_1["loss"])  # float32 sums reordered
    ga, gb = _flat(g_k), _flat(g_1)
    worst = max((norm_relative(ga[k], gb[k]), k) for k in ga if k != NOISE_ONLY)
    assert worst[0] <= 1e-5, worst
    assert np.linalg.norm(ga["text.layers.q.kernel"]) > 1e-3 and np.linalg.norm(ga["vision.layers.fc1.kernel"]) > 1e-3


def test_bfloat16_compute_keeps_float32_master_params(model):
    config = model.config
    batch = _batch(config, 3, rows=("text", "text"))  # bfloat16 matmuls are slow on CPU: text only
    step = train.make_train_step(config, train.optimizer(1e-3), compute_dtype="bfloat16", log=None)
    state, metrics = step(step.init(model.params), [batch])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    loss32, _ = jax.jit(lambda p, b: train.accumulated_grads(p, p, b, config=config, compute_dtype=jnp.float32)[:2])(
        model.params, train.stack_micro_batches([batch]))
    assert abs(float(metrics["loss"]) - float(loss32)) <= 0.05 * float(loss32)
    assert int(state.step) == 1


def test_sharded_train_step_equals_unsharded(model):
    """data=2, fsdp=2, tensor=2 on 8 simulated CPU devices vs one device: loss and params after 3 steps.

    AdamW here has eps=1e-4: with eps=1e-8 its first steps are ~lr*sign(g), which turns gradient elements at
    float32 noise level (another summation order gives another sign) into lr-sized differences."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    config = model.config
    batches = [_batch(config, 10 + i, rows=("video", "text", "text", "text")) for i in range(3)]
    runs = {}
    for name, mesh in (("single", None), ("mesh", "data=2,fsdp=2,tensor=2")):
        step = train.make_train_step(config, train.optimizer(1e-3, eps=1e-4), mesh=mesh, compute_dtype="float32",
                                     log=None)
        state = step.init(model.params)
        losses = []
        for b in batches:
            state, metrics = step(state, [b])
            losses.append(float(metrics["loss"]))
        runs[name] = losses, _flat(state.params), state
    sharded = runs["mesh"][2].params["text"]["layers"]["gate"]["kernel"]
    assert len(sharded.sharding.device_set) == 8 and not sharded.sharding.is_fully_replicated
    np.testing.assert_allclose(runs["mesh"][0], runs["single"][0], rtol=2e-6)
    pa, pb = runs["mesh"][1], runs["single"][1]
    worst = max((float(np.abs(pa[k] - pb[k]).max()), k) for k in pa if k != NOISE_ONLY)
    assert worst[0] <= 1e-6, worst  # lr 1e-3: the steps agree to 0.1%
    moved = max(float(np.abs(pa[k] - _flat(model.params)[k]).max()) for k in pa)
    assert moved > 1e-3


def test_attention_backends_train_alike_and_bad_ones_are_named(model, monkeypatch):
    """cpu and splash (Pallas, interpret mode on CPU) give the xla loss and gradients within float32 rounding;
    the train step runs the backend it is given; a backend this platform / dtype cannot run, or an unknown
    name, is refused naming the option."""
    from ov_jax.nn.backends import AttentionBackendError, splash

    config = model.config
    batch = train.stack_micro_batches([_batch(config, 4, rows=("video", "text"))])  # media, right padding
    results = {}
    for name in ("xla", "cpu", "splash"):
        loss, grads, _ = jax.jit(lambda p, b, a=name: train.accumulated_grads(
            p, p, b, config=config, compute_dtype=jnp.float32, attention=a))(model.params, batch)
        results[name] = float(loss), _flat(grads)
    loss, grads = results["xla"]
    for name in ("cpu", "splash"):
        other_loss, other_grads = results[name]
        assert abs(other_loss - loss) <= 1e-5 * loss, (name, other_loss, loss)
        worst = max((norm_relative(other_grads[k], grads[k]), k) for k in grads if k != NOISE_ONLY)
        assert worst[0] <= 1e-4, (name, worst)
        assert max(float(np.abs(other_grads[k] - grads[k]).max()) for k in grads) > 0  # really another kernel

    original, calls = splash.self_attention, []

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(splash, "self_attention", spy)
    step = _quiet_step(config, attention="splash")
    assert step.attention == "splash"
    _, metrics = step(step.init(model.params), batch)
    assert len(calls) == 2  # traced once in the vision tower's layer scan, once in the decoder's
    assert float(metrics["loss"]) == pytest.approx(results["splash"][0], rel=1e-6)
    norm = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in results["splash"][1].values()))
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    assert _quiet_step(config).attention == "cpu"  # "auto" on CPU
    with pytest.raises(AttentionBackendError, match="attention='cudnn' needs an NVIDIA GPU"):
        _quiet_step(config, attention="cudnn")
    with pytest.raises(AttentionBackendError, match=r"attention must be one of \['auto', 'xla', .*got 'flash'"):
        _quiet_step(config, attention="flash")


@pytest.mark.parametrize("bad, message", [
    ({"labels": [[5, 6, 10 ** 6]]}, r"labels hold 1 value\(s\) outside \[0, "),
    ({"labels": [[5, 6]]}, r"labels shape \(1, 2\) != input_ids shape \(1, 3\)"),
    ({"position_ids": [[0.0, 1.0, 2.0]]}, "position_ids must hold integers, got dtype float64"),
    ({"position_ids": [[0, 1]]}, r"position_ids shape \(1, 2\) != input_ids shape"),
    ({"attention_mask": [[1, 1]]}, r"attention_mask shape \(1, 2\) != input_ids shape"),
    ({"input_ids": [[1.0, 2.0, 3.0]]}, "input_ids must hold integers"),
])
def test_the_model_and_make_batch_refuse_the_same_inputs(model, bad, message):
    """One check (`ov_jax.inputs.model_inputs`) for a forward with labels and for a training batch."""
    from ov_jax.inputs import InputError

    inputs = {"input_ids": [[11, 12, 13]], "labels": [[-100, 12, 13]]} | bad
    with pytest.raises(InputError, match=message):
        model(**inputs)
    with pytest.raises(InputError, match=message):
        train.make_batch(model.config, **inputs)


def test_clipped_adamw_update_needs_no_gradient_sized_temporary():
    """The clipped AdamW update of donated params, moments and gradients compiles with no temporary the size
    of the gradients (optax's select-based clipping needed one: 3.6 GB on the 0.5B architecture). Compiled
    from shapes only: 8 leaves of 4 MiB."""
    params = {f"w{i}": jax.ShapeDtypeStruct((1024, 1024), jnp.float32) for i in range(8)}
    opt = train.optimizer(1e-3)
    state = jax.eval_shape(opt.init, params)

    def update(p, s, g):
        u, s = opt.update(g, s, p)
        return jax.tree.map(jnp.add, p, u), s

    memory = jax.jit(update, donate_argnums=(0, 1, 2)).lower(params, state, params).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 4 * 1024 * 1024  # less than one leaf; the gradients are 32 MiB
