"""Fine-tuning runs: a run directory that can be stopped and resumed with exactly the same losses.

A run directory (created through `ov_jax.outputs`, kind ``"finetune"``) holds::

    run.json        the run's settings (:class:`RunConfig`), written once
    metrics.jsonl   one line per step: step, loss, learning_rate, grad_norm, tokens, tokens_per_second
    checkpoints/    orbax CheckpointManager steps, every ``save_every`` steps and at the end, the last
                    ``keep`` kept; each holds ``params``, ``train`` (step, optimizer state, RNG) and
                    ``data`` (the grain iterator's position)

:func:`finetune` is the library entry point (``ov-jax finetune`` parses arguments into it); :func:`export`
writes a run's latest params as a transformers checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable

from ov_jax import outputs

RUN_KIND = "finetune"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
# Batch fields the train step reads (the data pipeline also yields counters for the metrics).
STEP_FIELDS = ("input_ids", "attention_mask", "position_ids", "labels", "tower_inputs", "tap_index", "tap_weight",
               "is_media")
# Settings a resumed run may change. save_every and keep do not alter the losses, attention only their rounding
# (and "auto" resolves per platform anyway); a new ``steps`` does from the resumed step on, since the cosine decay
# is recomputed to end at the new total.
RESUMABLE = ("steps", "save_every", "keep", "attention", "remat")


class RunError(ValueError):
    """A run directory or run setting that cannot be used (the message names it)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's losses (saved as ``run.json``).

    model: checkpoint directory or hub id; data: the training jsonl (`ov_jax.train.data`); media_root: folder
    relative media paths are taken from (default: the jsonl's folder). steps: optimizer steps; batch_size:
    rows per micro-batch; grad_accum: micro-batches per step; learning_rate / warmup: AdamW peak rate and
    linear warm-up steps before the cosine decay to 0 at ``steps``; weight_decay, max_grad_norm: AdamW decay
    and global-norm clipping. freeze: presets or regexes over params paths (`ov_jax.train.freeze`).
    lora_rank / lora_alpha / lora_targets / lora_dropout: train LoRA adapters of that rank (update scaled by
    alpha / rank) on ``lora_targets`` (presets ``language_model``, ``projector``, ``vision_tower`` or regexes
    over weight paths, `ov_jax.train.lora`; default ``language_model``) and nothing else; export merges them.
    max_length: token budget per row (vision tokens included); num_frames: frames sampled per video;
    packing: several samples per row. mesh: device mesh spec (`ov_jax.sharding`); compute_dtype: activation
    dtype (params stay float32); attention: the attention backend (`ov_jax.train.make_train_step`; ``auto``,
    ``xla``, ``cpu``, ``cudnn``, ``splash``); remat: activation checkpointing policy for both layer scans
    (`ov_jax.modeling.layers.REMAT_POLICIES`: ``none``, ``full``, ``dots_saveable``, …); seed: data order and RNG. save_every / keep: checkpoint interval
    and count.
    """

    model: str
    data: str
    media_root: str | None = None
    steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-5
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    freeze: str | None = None
    lora_rank: int | None = None
    lora_alpha: float = 16.0
    lora_targets: str | None = None
    lora_dropout: float = 0.0
    max_length: int = 4096
    num_frames: int = 8
    packing: bool = False
    mesh: str | None = None
    compute_dtype: str = "float32"
    attention: str = "auto"
    remat: str = "none"
    seed: int = 0
    save_every: int = 50
    keep: int = 3

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "max_length", "num_frames", "save_every", "keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RunError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup <= self.steps:
            raise RunError(f"warmup must be an integer in [0, steps={self.steps}], got {self.warmup!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise RunError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        from ov_jax.train.optim import OptimizerError, check_decay_and_clipping

        try:
            check_decay_and_clipping(self.weight_decay, self.max_grad_norm)
        except OptimizerError as err:
            raise RunError(str(err)) from None
        if self.lora_rank is not None:
            from ov_jax.params import LoraSpec

            try:
                LoraSpec(self.lora_rank, self.lora_alpha, self.lora_targets or ".")
            except (ValueError, TypeError) as err:
                raise RunError(str(err)) from None
        elif self.lora_targets is not None or self.lora_dropout:
            raise RunError("lora_targets and lora_dropout need lora_rank")
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise RunError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise RunError(f"compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")
        from ov_jax.nn.backends import CHOICES

        if self.attention not in CHOICES:
            raise RunError(f"attention must be one of {', '.join(CHOICES)}, got {self.attention!r}")
        from ov_jax.modeling.layers import REMAT_POLICIES

        if self.remat not in REMAT_POLICIES:
            raise RunError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise RunError(f"unknown run setting(s) {unknown}")
        return cls(**values)


@dataclasses.dataclass
class RunResult:
    """What :func:`finetune` returns: the run directory, the final train state and this call's step metrics."""

    directory: pathlib.Path
    state: Any
    metrics: list[dict]


# ---------------------------------------------------------------------------------------- run directory


def _read_run_config(directory: pathlib.Path) -> RunConfig:
    try:
        return RunConfig.from_dict(json.loads((directory / RUN_FILE).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise RunError(f"{directory / RUN_FILE} cannot be read as a run's settings: {err}") from None


def open_run(directory: str | os.PathLike, config: RunConfig | None, *, resume: bool = False,
             overwrite: bool = False, create: bool = True) -> tuple[pathlib.Path, RunConfig]:
    """The run directory and its settings. A new run creates ``directory`` through `ov_jax.outputs` (never
    replacing anything but an earlier fine-tuning run, and that only with ``overwrite``) and writes
    ``run.json``; ``create=False`` only checks that it could. ``resume`` takes the saved settings; ``config``,
    if given, may differ only in :data:`RESUMABLE` fields (which it then overrides)."""
    path = pathlib.Path(directory)
    if resume:
        if outputs.output_kind(path) != RUN_KIND or not (path / RUN_FILE).is_file():
            raise RunError(f"cannot resume: {path} is not a fine-tuning run directory")
        saved = _read_run_config(path)
        if config is None:
            return path.resolve(), saved
        changed = [f.name for f in dataclasses.fields(RunConfig)
                   if getattr(config, f.name) != getattr(saved, f.name) and f.name not in RESUMABLE]
        if changed:
            raise RunError(f"cannot resume {path} with different {', '.join(changed)} (saved in {RUN_FILE}); "
                           f"only {', '.join(RESUMABLE)} may change")
        merged = dataclasses.replace(saved, **{name: getattr(config, name) for name in RESUMABLE})
        (path / RUN_FILE).write_text(json.dumps(dataclasses.asdict(merged), indent=2) + "\n")
        return path.resolve(), merged
    if config is None:
        raise RunError("a new run needs its settings")
    if create:
        path = outputs.prepare_output_dir(path, kind=RUN_KIND, overwrite=overwrite, sources=_sources(config),
                                          entries=(RUN_FILE, METRICS_FILE, CHECKPOINTS))
        (path / RUN_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    else:
        path = outputs.check_output_dir(path, kind=RUN_KIND, overwrite=overwrite, sources=_sources(config))
    return path, config


def _sources(config: RunConfig) -> list[str]:
    return [p for p in (config.model, config.data, config.media_root) if p is not None and os.path.exists(p)]


def run_settings(directory: str | os.PathLike, *, resume: bool = False, **given: Any) -> RunConfig:
    """Settings from explicitly given values: a new run's are ``RunConfig(**given)`` (``model`` and ``data``
    required); a resumed run's are the saved ones with ``given`` applied (:func:`open_run` then refuses changes
    outside :data:`RESUMABLE`)."""
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise RunError(f"unknown run setting(s) {unknown}")
    if resume:
        path = pathlib.Path(directory)
        if outputs.output_kind(path) != RUN_KIND or not (path / RUN_FILE).is_file():
            raise RunError(f"cannot resume: {path} is not a fine-tuning run directory")
        return dataclasses.replace(_read_run_config(path), **given)
    missing = [name for name in ("model", "data") if given.get(name) is None]
    if missing:
        raise RunError(f"a new run needs {' and '.join(missing)} (--{' and --'.join(missing)})")
    return RunConfig(**given)


def checkpoint_manager(directory: pathlib.Path, config: RunConfig):
    """The run's orbax ``CheckpointManager`` (synchronous saves: the train step donates its state)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, save_interval_steps=1, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory / CHECKPOINTS, options=options, item_names=("params", "train", "data"))


def _save(manager, state, data_state: dict) -> None:
    import orbax.checkpoint as ocp

    manager.save(int(state.step), args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng}),
        data=ocp.args.JsonSave(data_state)))


def _restore(manager, state):
    """``(state, data_state)`` from the latest checkpoint, arrays placed like those of ``state``."""
    import jax
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return state, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        train=ocp.args.StandardRestore({"step": abstract.step, "opt_state": abstract.opt_state,
                                        "rng": abstract.rng}),
        data=ocp.args.JsonRestore()))
    train = restored["train"]
    return state.replace(step=train["step"], params=restored["params"], opt_state=train["opt_state"],
                         rng=train["rng"]), restored["data"]


def _keep_metrics_through(path: pathlib.Path, step: int) -> None:
    """Drop metric lines past ``step`` (steps run after the checkpoint a resume starts from)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(kept))


# ------------------------------------------------------------------------------------------ training


def finetune(output: str | os.PathLike, config: RunConfig | None = None, *, resume: bool = False,
             overwrite: bool = False, until: int | None = None, progress: bool = True,
             log: Callable[[str], Any] | None = print) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` into the run directory ``output``.

    ``resume``: continue the run in ``output`` from its latest checkpoint (params, optimizer state, step, RNG
    and data position restored, so the losses equal an uninterrupted run's; a changed ``config.steps``
    re-spans the cosine decay to the new total, so from there the learning rates and losses differ). ``until``: stop after this step
    (saving a checkpoint there) so that a later ``resume`` continues; the schedule still spans
    ``config.steps``. ``progress``: a tqdm bar; ``log``: where the data report and the trainable-parameter
    table go. Every setting is checked before the run directory is created. Raises :class:`RunError`,
    `ov_jax.train.data.DataError`, `ov_jax.outputs.OutputPathError` (all ``ValueError`` / ``OSError``).
    Metrics: the first step's tokens/s includes compiling the step.
    """
    import jax

    from ov_jax.model import LlavaOnevision
    from ov_jax.processing.processor import LlavaOnevisionProcessor
    from ov_jax.train import data as train_data
    from ov_jax.train import make_train_step, optimizer, stack_micro_batches
    from ov_jax.train.optim import lr_schedule

    directory, config = open_run(output, config, resume=resume, overwrite=overwrite, create=False)
    from ov_jax.nn.backends import resolve_attention

    resolve_attention(config.attention, jax.default_backend(), config.compute_dtype)  # before anything loads
    say = log or (lambda _: None)
    processor = LlavaOnevisionProcessor.from_pretrained(config.model)
    dataset = train_data.scan(config.data, processor, max_length=config.max_length, num_frames=config.num_frames,
                              media_root=config.media_root)
    say(dataset.report())
    model = LlavaOnevision.from_pretrained(config.model, dtype="float32", mesh=config.mesh)
    spec = train_data.BatchSpec(batch_size=config.batch_size, max_length=config.max_length, packing=config.packing)
    batches = train_data.make_batches(dataset, processor, model.config, spec, seed=config.seed,
                                      num_frames=config.num_frames)
    transform = optimizer(config.learning_rate, warmup_steps=config.warmup, total_steps=config.steps,
                          weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)
    schedule = lr_schedule(config.learning_rate, config.warmup, config.steps)
    params, lora = model.params, None
    if config.lora_rank is not None:
        from ov_jax.train.lora import add_lora

        params, lora = add_lora(params, model.config, config.lora_rank, config.lora_alpha,
                                config.lora_targets or "language_model", seed=config.seed)
    step_fn = make_train_step(model.config, transform, mesh=config.mesh, freeze=config.freeze, lora=lora,
                              lora_dropout=config.lora_dropout, grad_accum=config.grad_accum,
                              compute_dtype=config.compute_dtype, attention=config.attention,
                              remat=config.remat, log=log)
    state = step_fn.init(params, seed=config.seed)
    del params
    if config.mesh is None:  # committed like the step's outputs, so the second step does not compile again
        state = jax.device_put(state, jax.devices()[0])
    del model
    if not resume:  # every setting has been checked: only now is the run directory created
        directory, _ = open_run(output, config, overwrite=overwrite)

    manager = checkpoint_manager(directory, config)
    data_state = None
    if resume:
        state, data_state = _restore(manager, state)
    start = int(state.step)
    stop = config.steps if until is None else min(until, config.steps)
    metrics_path = directory / METRICS_FILE
    _keep_metrics_through(metrics_path, start)
    if start >= stop:
        say(f"{directory} is already at step {start} (stopping at {stop} of {config.steps})")
        manager.close()
        return RunResult(directory, state, [])
    fields = STEP_FIELDS + (("segment_ids",) if config.packing else ())
    iterator = train_data.iterate(batches, data_state)
    history = []
    bar = _progress(config.steps, start, progress)
    try:
        with open(metrics_path, "a") as metrics_file:
            for step in range(start, stop):
                began = time.perf_counter()
                micro = [next(iterator) for _ in range(config.grad_accum)]
                stacked = stack_micro_batches([{k: b[k] for k in fields} for b in micro])
                state, out = step_fn(state, stacked)
                loss = float(out["loss"])
                seconds = time.perf_counter() - began
                tokens = int(sum(b["num_tokens"] for b in micro))
                record = {"step": step + 1, "loss": loss, "learning_rate": float(schedule(step)),
                          "grad_norm": float(out["grad_norm"]), "tokens": tokens,
                          "tokens_per_second": tokens / seconds if seconds > 0 else None,
                          "samples": int(sum(b["num_samples"] for b in micro))}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                history.append(record)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                bar.update()
                if not math.isfinite(loss):
                    raise RunError(f"the loss became {loss} at step {step + 1}; lower the learning rate")
                if (step + 1) % config.save_every == 0 or step + 1 == stop:
                    _save(manager, state, iterator.get_state())
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
    jax.block_until_ready(state)
    return RunResult(directory, state, history)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="finetune", unit="step", disable=not enabled, leave=False)


def read_metrics(directory: str | os.PathLike) -> list[dict]:
    """The run's metric records, one dict per step."""
    path = pathlib.Path(directory) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -------------------------------------------------------------------------------------------- export


def latest_params(directory: str | os.PathLike) -> tuple[int, dict]:
    """``(step, params)`` of the run's latest checkpoint (numpy arrays in the params layout)."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(directory).absolute()
    if outputs.output_kind(path) != RUN_KIND:
        raise RunError(f"{path} is not a fine-tuning run directory")
    manager = ocp.CheckpointManager(path / CHECKPOINTS, options=ocp.CheckpointManagerOptions(create=False),
                                    item_names=("params", "train", "data"))
    try:
        step = manager.latest_step()
        if step is None:
            raise RunError(f"{path} has no checkpoint yet")
        params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    finally:
        manager.close()
    return step, params


def export(run: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Write the run's latest params as a transformers checkpoint (`ov_jax.export.save_pretrained`, with the
    base model's tokenizer, processor and chat template files), LoRA adapters merged into their kernels.
    ``overwrite``: replace an earlier export in ``out``. Returns the output directory."""
    from ov_jax import export as exporting
    from ov_jax.config import load_config
    from ov_jax.hub import resolve_checkpoint
    from ov_jax.loading import checkpoint_config
    from ov_jax.model import _is_converted

    _, params = latest_params(run)
    config = _read_run_config(pathlib.Path(run))
    source = resolve_checkpoint(config.model)
    model_config = load_config(source) if _is_converted(source) else checkpoint_config(source)
    from ov_jax.nn.lora import merge_lora

    return exporting.save_pretrained(model_config, merge_lora(params), out, source=source, overwrite=overwrite)
