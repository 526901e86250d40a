"""Convert a LLaVA-OneVision safetensors checkpoint (directory or hub id) into an ov_jax orbax directory.

    python -m convert.convert_checkpoint SRC DST [--dtype bfloat16] [--quantize int8|int4 [--group-size N]]
        [--int8-weights v,o|none] [--quantize-vision] [--overwrite]

Thin wrapper around :func:`ov_jax.checkpoint.convert`; ``ov-jax convert`` reuses :func:`add_arguments` and
:func:`run`.
"""

from __future__ import annotations

import argparse
import sys

from ov_jax.config import INT4_INT8_WEIGHTS, LM_LINEARS


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="checkpoint directory (config.json + safetensors) or Hugging Face Hub id")
    parser.add_argument("dst", help="output directory: new, empty, or an earlier convert output (--overwrite)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="cast the weights (default: keep the file's dtype)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="store the language model's weights quantized: int8 per output channel, int4 per "
                             "group (default: float)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="int4 group size: input features per scale; must divide every input size (default 128)")
    parser.add_argument("--int8-weights", default=None, metavar="NAMES",
                        help="int4 only: language-model linears stored int8 instead, comma-separated among "
                             f"{','.join(LM_LINEARS)}, or 'none' for int4 everywhere "
                             f"(default {','.join(INT4_INT8_WEIGHTS)}: the attention values, see README)")
    parser.add_argument("--quantize-vision", action="store_true",
                        help="also quantize the vision tower's linears and the projector")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is an earlier convert output (nothing else is ever replaced)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    from ov_jax.checkpoint import convert
    from ov_jax.config import QuantConfig

    try:
        options = {}  # the quantization options given, by QuantConfig field; the rest take its defaults
        if args.group_size is not None:
            options["group_size"] = args.group_size
        if args.int8_weights is not None:
            names = args.int8_weights
            options["int8_weights"] = () if names == "none" else tuple(n.strip() for n in names.split(","))
        if args.quantize_vision:
            options["vision"] = True
        if args.quantize is None and options:
            flags = {"group_size": "--group-size", "int8_weights": "--int8-weights", "vision": "--quantize-vision"}
            raise ValueError(f"{' and '.join(flags[k] for k in options)} apply only with --quantize int8|int4")
        quantization = None if args.quantize is None else QuantConfig(args.quantize, **options)
        report = convert(args.src, args.dst, args.dtype, overwrite=args.overwrite, progress=args.progress,
                         quantization=quantization)
    except (ValueError, OSError) as err:  # CheckpointError and ConfigError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.convert_checkpoint", description=__doc__.split("\n")[0])
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
