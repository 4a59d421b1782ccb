"""Command line: `python -m glom_mnist <command> --help`.

Each command lives in its own module, which provides `add_arguments(parser)` and `run(args)`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "data": ("glom_mnist.data", "download or rebuild MNIST / Fashion-MNIST and verify its MD5s"),
    "import-seed": ("glom_mnist.seed", "convert the seed's published best_models/ to our checkpoint"),
    "train": ("glom_mnist.train", "train a GLOM state grid (resumable)"),
    "export": ("glom_mnist.export", "ship a run's checkpoint (finished or not) as a model file"),
    "evaluate": ("glom_mnist.evaluate", "metrics of a checkpoint on the test set"),
    "scenes": ("glom_mnist.scenes", "are a checkpoint's islands the objects? test scenes of "
                                    "several digits"),
    "figures": ("glom_mnist.figures", "regenerate imgs/ from the shipped checkpoints"),
}


def command_line(args: argparse.Namespace) -> str:
    """The command that parsed into `args`, written out to be run again: every option given a
    value, flags without values as flags, lists as their values; `--force`, which is about an
    existing output file rather than what is measured, left out."""
    def value(v: object) -> str:
        return "" if v is True else " " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))

    return f"python -m glom_mnist {args.command} " + " ".join(
        f"--{k.replace('_', '-')}{value(v)}" for k, v in vars(args).items()
        if v is not None and v is not False and k not in ("command", "module", "force"))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (so `--help` stays fast)."""
    parser = argparse.ArgumentParser(prog="python -m glom_mnist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(importlib.import_module(args.module).run(args) or 0)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:                     # a file system's refusal: disk full, I/O error
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                  # Ctrl-C: what had to be saved was saved
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
