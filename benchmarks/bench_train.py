"""Train-step benchmark: the LLaVA-OneVision 0.5B architecture with random weights, ov_jax vs transformers + torch.

Full fine-tuning and LoRA (rank 16, alpha 32, every language-model linear) on identical batches: text rows plus
one 2-frame video row, float32, AdamW. Full fine-tuning checkpoints activations on both sides by default
(ov_jax ``remat="full"``, transformers ``gradient_checkpointing_enable()``): without it float32 AdamW on the
0.9B parameters plus every saved activation does not fit a 24 GiB host. LoRA keeps every activation
(``--remat`` changes both). Each (system, mode) runs in its own process, back to back, so peak RSS is per run;
the table gives train-step tokens/s (batch tokens / median step time after a compile/warm-up step) and peak RSS.
The CPU model and its SIMD flags are printed with the results.

    python benchmarks/bench_train.py                       # 0.5B: full and LoRA, both systems
    python benchmarks/bench_train.py --preset tiny         # seconds-long dry run of the whole script
    python benchmarks/bench_train.py --remat none          # no activation checkpointing in either mode

Not a test. Needs torch + transformers (the reference) besides ov_jax. transformers' LoRA here is a minimal
adapter module (y += scale * B(A(x))) on the same linears, so the comparison does not depend on peft.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from machine import cpu_info, cpu_line  # noqa: E402  (benchmarks/, the script's folder)

MODES = ("full", "lora")
SYSTEMS = ("ov_jax", "transformers")
LORA_RANK, LORA_ALPHA = 16, 32
LEARNING_RATE = 1e-5


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def bench_setup(preset: str) -> dict:
    """Config and batch shape: the 0.5B architecture, or the tiny test config for the dry run."""
    from ov_jax.config import OneVisionConfig
    from ov_jax.presets import preset as named

    if preset == "tiny":
        return {"config": named("tiny").replace(image_token_id=300, video_token_id=301), "rows": 2,
                "length": 256, "frames": 1, "steps": 2}
    return {"config": OneVisionConfig(), "rows": 2, "length": 512, "frames": 2, "steps": 3}


def batch(config, rows: int, length: int, frames: int) -> tuple[dict, np.ndarray]:
    """``rows`` rows of ``length`` tokens: row 0 holds a ``frames``-frame video, the others text; labels = ids."""
    from ov_jax.geometry import video_token_count

    rng = np.random.default_rng(0)
    ids = rng.integers(1, min(100000, config.image_token_id), (rows, length))
    n = video_token_count(frames)
    if n + 8 > length:
        raise ValueError(f"length {length} cannot hold a {frames}-frame video ({n} tokens)")
    ids[0, 4:4 + n] = config.video_token_id
    labels = np.where(ids == config.video_token_id, -100, ids)
    videos = rng.standard_normal((1, frames, 3, 384, 384)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values_videos": videos}, labels


def checkpointed(mode: str, remat: str) -> bool:
    """Whether ``mode`` runs with activation checkpointing under the ``--remat`` choice."""
    return remat == "both" or (remat == "full-only" and mode == "full")


def run_ov_jax(setup: dict, mode: str, remat: str) -> list[float]:
    import jax

    from ov_jax import train
    from ov_jax.params import random_params
    from ov_jax.train import lora

    config = setup["config"]
    params, spec = random_params(config), None
    if mode == "lora":
        params, spec = lora.add_lora(params, config, LORA_RANK, LORA_ALPHA)
    step = train.make_train_step(config, train.optimizer(LEARNING_RATE), lora=spec, compute_dtype="float32",
                                 remat="full" if checkpointed(mode, remat) else None, log=None)
    state = step.init(params)
    del params
    inputs, labels = batch(config, setup["rows"], setup["length"], setup["frames"])
    micro = [train.make_batch(config, labels=labels, **inputs)]
    times = []
    for _ in range(setup["steps"] + 1):
        start = time.perf_counter()
        state, metrics = step(state, micro)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return times


def run_transformers(setup: dict, mode: str, remat: str) -> list[float]:
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from ov_jax.presets import to_hf_dict

    config = setup["config"]
    torch.manual_seed(0)
    hf_config = LlavaOnevisionConfig(**to_hf_dict(config))
    model = LlavaOnevisionForConditionalGeneration(hf_config).train()
    if checkpointed(mode, remat):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        model.requires_grad_(False)
        for name, module in list(model.model.language_model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear) and child_name in (
                        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                    setattr(module, child_name, _TorchLora(child, LORA_RANK, LORA_ALPHA))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    inputs, labels = batch(config, setup["rows"], setup["length"], setup["frames"])
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    times = []
    for _ in range(setup["steps"] + 1):
        start = time.perf_counter()
        loss = model(**tensors, labels=torch.from_numpy(labels)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def _TorchLora(base, rank: int, alpha: float):
    """``base(x) + alpha / rank * B(A(x))`` with the base frozen and B zero (PEFT's initialisation)."""
    import torch

    class TorchLora(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.scale = base, alpha / rank
            self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False)
            self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False)
            torch.nn.init.zeros_(self.lora_b.weight)

        def forward(self, x):
            return self.base(x) + self.scale * self.lora_b(self.lora_a(x))

    return TorchLora()


def child(system: str, mode: str, preset: str, remat: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", system, "--modes", mode, "--preset", preset,
               "--remat", remat]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{system} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = ["| mode | activation checkpointing | system | tokens/s | step s (median) | first step s | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for mode, runs in results["runs"].items():
        remat = "yes" if checkpointed(mode, results["remat"]) else "no"
        for system, run in runs.items():
            lines.append(f"| {mode} | {remat} | {system} | {run['tokens_per_s']:.1f} | {run['step_s']:.3f} | "
                         f"{run['first_step_s']:.2f} | {run['peak_rss_gb']:.2f} |")
        if set(SYSTEMS) <= set(runs):
            ratio = runs["ov_jax"]["tokens_per_s"] / runs["transformers"]["tokens_per_s"]
            lines.append(f"| {mode} | {remat} | ov_jax / transformers | {ratio:.2f}x | | | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--preset", choices=("0.5b", "tiny"), default="0.5b",
                        help="tiny: a quick dry run of the script on the tiny test architecture")
    parser.add_argument("--remat", choices=("full-only", "both", "none"), default="full-only",
                        help="activation checkpointing (both systems): full fine-tuning only, both modes, or none")
    parser.add_argument("--out", default=None, help="write the results as json here")
    parser.add_argument("--child", choices=SYSTEMS)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    systems = [s for s in args.systems.split(",") if s]
    if set(modes) - set(MODES) or set(systems) - set(SYSTEMS):
        parser.error(f"modes are {MODES}, systems {SYSTEMS}")
    setup = bench_setup(args.preset)
    if args.child:
        times = (run_ov_jax if args.child == "ov_jax" else run_transformers)(setup, modes[0], args.remat)
        step_s = statistics.median(times[1:])
        print(json.dumps({"tokens_per_s": setup["rows"] * setup["length"] / step_s, "step_s": step_s,
                          "first_step_s": times[0], "peak_rss_gb": peak_rss_gb()}))
        return
    results = {"preset": args.preset, "remat": args.remat, "cpu": cpu_info(), "batch": {k: setup[k] for k in ("rows", "length", "frames")},
               "load_avg_at_start": os.getloadavg(), "runs": {}}
    print(cpu_line(results["cpu"]), flush=True)
    for mode in modes:
        results["runs"][mode] = {s: child(s, mode, args.preset, args.remat) for s in systems}  # back to back
    results["load_avg_at_end"] = os.getloadavg()
    print(table(results), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
