"""`python -m glom_mnist export RUN/last.pt OUT.pt`: ship a run's checkpoint, finished or not.

Writes OUT.pt (weights, config, provenance, and metrics saying how many of the scheduled
iterations ran) without the optimiser state, and OUT.log.csv, the run's whole training history
(with every run it was initialised from), which `figures` draws.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run's checkpoint, e.g. runs/consensus/last.pt")
    parser.add_argument("out", help="the model file to write, e.g. best_models/glom_consensus.pt")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT (and OUT.log.csv) if they exist")


def run(args: argparse.Namespace) -> int:
    from .files import check_new_file
    from .train import export_run

    out, checkpoint = Path(args.out), Path(args.checkpoint)
    if out.resolve() == checkpoint.resolve():
        raise ValueError(f"OUT is the checkpoint being exported ({out}); choose another path")
    check_new_file(out, force=args.force, flag="OUT", also=(out.with_suffix(".log.csv"),))
    history = export_run(checkpoint, out)
    print(f"wrote {out} and its training history {history}")
    return 0
