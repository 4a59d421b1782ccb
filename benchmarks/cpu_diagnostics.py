"""Where the fast model's CPU time goes (docs/speed.md).

    python benchmarks/cpu_diagnostics.py --json benchmarks/results/cpu_diagnostics.json
    python benchmarks/cpu_diagnostics.py --parts profile --json benchmarks/results/cpu_profile_native_tail.json

- eval: evaluation throughput of a checkpoint on the first N test images, fed in batches of
  60 and 500 and rolled out whole or in chunks (`kernels.inference_chunk`), with the process's
  user and system (kernel) CPU time: a fresh child process per setting, one warm-up batch first.
- train: one seed-configuration training iteration (batch 60, dropout 0.1 as the seed has it),
  the rollout run whole or in chunks with the gradients accumulated (the same loss).
- profile: `torch.profiler` over one such training iteration, whole batch: each kind of
  operation's share of the CPU time (the profiler's own overhead inflates the total).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results_io import write_json  # noqa: E402  (benchmarks/, the script's own folder)


def cpu_times() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def eval_child(checkpoint: str, batch: int, chunk: int, images: int) -> dict:
    """Images/s of `checkpoint` on the first `images` test images; chunk 0: the whole batch."""
    import torch

    from glom_mnist import kernels, load_checkpoint
    from glom_mnist.data import load_split, normalise

    kernels.INFERENCE_CHUNK_VALUES = (chunk or 10**6) * 4 * 10 * 28 * 28
    model = load_checkpoint(checkpoint, device="cpu")
    x = normalise(load_split("mnist", str(ROOT / "data"), train=False)[0][:images], "mnist")
    torch.manual_seed(0)
    with torch.no_grad():
        model(x[:batch])                                               # warm-up
        (u0, s0), start = cpu_times(), time.perf_counter()
        for i in range(0, images, batch):
            model(x[i:i + batch])
        seconds = time.perf_counter() - start
    u1, s1 = cpu_times()
    return {"batch": batch, "chunk": chunk or "whole", "images_per_s": images / seconds,
            "user_s": u1 - u0, "sys_s": s1 - s0}


def train_iteration(chunk: int):
    """A function running one batch-60 seed-configuration training iteration, the rollout in
    chunks of `chunk` images with gradients accumulated (0: whole)."""
    import torch
    import torch.nn.functional as F

    from glom_mnist import Glom, GlomConfig

    torch.manual_seed(0)
    model = Glom(GlomConfig.preset("seed"))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(60, 1, 28, 28), torch.randint(0, 10, (60,))
    step = chunk or 60

    def iteration() -> None:
        optimizer.zero_grad()
        for i in range(0, 60, step):
            top = model(x[i:i + step])[:, -1]
            target = F.one_hot(y[i:i + step], 10).float()[:, :, None, None].expand_as(top)
            (F.mse_loss(top, target) * len(top) / 60).backward()
        optimizer.step()

    return iteration


def train_child(chunk: int) -> dict:
    iteration = train_iteration(chunk)
    iteration()                                                        # warm-up
    (u0, s0), start = cpu_times(), time.perf_counter()
    for _ in range(2):
        iteration()
    seconds = (time.perf_counter() - start) / 2
    u1, s1 = cpu_times()
    return {"chunk": chunk or "whole", "seconds": seconds, "user_s": (u1 - u0) / 2,
            "sys_s": (s1 - s0) / 2}


def profile_child() -> dict:
    from torch.profiler import ProfilerActivity, profile

    iteration = train_iteration(0)
    iteration()
    iteration()            # a second warm-up: the heap can still grow (page faults) in the second
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        iteration()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {e.key: e.self_cpu_time_total / total for e in events}
    top = dict(sorted(shares.items(), key=lambda kv: -kv[1])[:15])
    # the model's own autograd functions (and their backward), with the operations they call
    ours = {e.key: round(e.cpu_time_total / total, 4) for e in events if e.key.startswith("_")}
    return {"total_ms": total / 1e3, "self_cpu_share": {k: round(v, 4) for k, v in top.items()},
            "inclusive_share_of_model_functions": ours}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="best_models/glom_seed_hard.pt")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--parts", default="eval,train,profile",
                        help="which measurements, comma-separated (eval, train, profile)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"eval": lambda: eval_child(rest[0], int(rest[1]), int(rest[2]), int(rest[3])),
                  "train": lambda: train_child(int(rest[0])), "profile": profile_child}[kind]()
        print(json.dumps(result))
        return
    summary: dict = {"command": " ".join(["python", "benchmarks/cpu_diagnostics.py"] + sys.argv[1:]),
                     "checkpoint": args.checkpoint, "images": args.images,
                     "eval": [], "train": []}
    parts = set(args.parts.split(","))
    for batch in (500, 60) if "eval" in parts else ():
        for chunk in (0, 8):
            r = run_child("eval", args.checkpoint, str(batch), str(chunk), str(args.images))
            summary["eval"].append(r)
            print(f"eval  batch {batch:3d}, chunk {str(r['chunk']):5s}: {r['images_per_s']:6.1f} "
                  f"images/s, user {r['user_s']:5.1f} s, sys {r['sys_s']:5.1f} s", flush=True)
    for chunk in (0, 30, 10) if "train" in parts else ():
        r = run_child("train", str(chunk))
        summary["train"].append(r)
        print(f"train chunk {str(r['chunk']):5s}: {r['seconds']:5.2f} s/iteration, "
              f"user {r['user_s']:5.1f} s, sys {r['sys_s']:4.1f} s", flush=True)
    if "profile" in parts:
        summary["profile"] = run_child("profile")
        print(f"profile of one training iteration ({summary['profile']['total_ms']:.0f} ms with "
              "the profiler's overhead):")
        for name, share in summary["profile"]["self_cpu_share"].items():
            print(f"  {name:40s} {share:6.1%}")
        print("the model's autograd functions, with what they call:")
        for name, share in summary["profile"]["inclusive_share_of_model_functions"].items():
            print(f"  {name:40s} {share:6.1%}")
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    main()
