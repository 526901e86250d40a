"""Convert a LLaVA-OneVision safetensors checkpoint (directory or hub id) into an ov_jax orbax directory.

    python -m convert.convert_checkpoint SRC DST [--dtype bfloat16] [--overwrite]

Thin wrapper around :func:`ov_jax.checkpoint.convert`; ``ov-jax convert`` reuses :func:`add_arguments` and
:func:`run`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="checkpoint directory (config.json + safetensors) or Hugging Face Hub id")
    parser.add_argument("dst", help="output directory: new, empty, or an earlier convert output (--overwrite)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="cast the weights (default: keep the file's dtype)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is an earlier convert output (nothing else is ever replaced)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    from ov_jax.checkpoint import convert
    from ov_jax.config import ConfigError
    from ov_jax.loading import CheckpointError

    try:
        report = convert(args.src, args.dst, args.dtype, overwrite=args.overwrite, progress=args.progress)
    except (CheckpointError, ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.convert_checkpoint", description=__doc__.split("\n")[0])
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
