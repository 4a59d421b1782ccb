"""Speed and memory of the fast Glom against the naive oracle (tests/oracle.py), side by side.

Seed configuration, batch 60, 30 steps. Measures one training iteration (rollout, MSE,
backward, Adam step) and one forward-only evaluation pass for each implementation. Every
measurement runs in a fresh child process (so its peak memory is its own), and the children
alternate oracle / fast within each repeat, so machine noise hits both alike. Prints seconds per
iteration, images/s, peak memory (CUDA: max allocated; CPU: growth of the process's peak RSS
beyond what imports, model and data took) and the ratios; `--json` writes them.

    python benchmarks/bench_model.py [--repeats 2] [--batch 60] [--steps 30] [--json out.json]
    python benchmarks/bench_model.py --device cuda --only-fast --amp   # fp32 vs bf16 autocast
    python benchmarks/bench_model.py --only-fast --patch   # the patch presets beside the seed's

`--patch` adds the `patch` and `patch_small` presets (their own 8 steps and cross-entropy over
the last steps' columns, glom_mnist/patch_glom.py) at the same batch, compared with `fast`.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from results_io import write_json  # noqa: E402  (benchmarks/, the script's own folder)


def child(impl: str, mode: str, batch: int, steps: int, iterations: int, warmup: int,
          dropout: float, device: str) -> dict:
    """One measurement: the median of `iterations` timed runs after `warmup` untimed ones, in
    this process."""
    import os

    if impl == "fast-torch":  # the fast model with its pure-torch networks (see native.py)
        os.environ["GLOM_NATIVE"] = "0"
    import torch
    import torch.nn.functional as F

    from glom_mnist import Glom, GlomConfig, native
    from oracle import OracleGlom, oracle_loss

    torch.manual_seed(0)
    dev = torch.device(device)
    images = torch.randn(batch, 1, 28, 28, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)
    if impl == "oracle":
        if dev.type != "cpu":
            raise SystemExit("the oracle is CPU-only (it creates its tensors on the CPU)")
        model = OracleGlom(steps=steps, dropout=dropout)

        def loss_fn():
            return oracle_loss(model, images, labels)

        def forward():
            return model(images)
    elif impl in ("patch", "patch_small"):  # the patch presets, their own steps and loss
        from glom_mnist.config import model_config
        from glom_mnist.patch_glom import PatchGlom

        model = PatchGlom(model_config(impl)).to(dev)

        def loss_fn():
            return model.loss(images, labels)[0]

        def forward():
            return model(images)
    else:  # "fast"; "fast-torch": its pure-torch networks; "fast-bf16": under bfloat16
        # autocast (CUDA only); "fast-compiled": its steps through torch.compile (the warm-up
        # run compiles)
        model = Glom(GlomConfig.preset("seed", steps=steps, dropout=dropout)).to(dev)
        if impl == "fast-compiled":
            model.compile_steps()
        if impl == "fast-bf16" and dev.type != "cuda":
            raise SystemExit("fast-bf16 (autocast) is measured on CUDA only")

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16, enabled=impl == "fast-bf16")

        def loss_fn():
            with autocast():
                top = model(images)[:, -1].float()
            return F.mse_loss(top, F.one_hot(labels, 10).float()[:, :, None, None].expand_as(top))

        def forward():
            with autocast():
                return model(images)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def train_once():
        model.train()
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()

    @torch.no_grad()
    def eval_once():
        model.eval()
        forward()

    run = train_once if mode == "train" else eval_once

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # after setup, in KiB
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):  # the first iterations also grow the heap (page faults): untimed
        run()
    sync()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # growth of the process's peak RSS over what setup (imports, model, data) used
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"impl": impl, "mode": mode, "seconds": statistics.median(times), "peak_mb": peak_mb,
            # whether the fast model's networks ran compiled (glom_mnist/native.py) or in torch
            "networks": "compiled" if native._module is not None else "torch"}


def measure(args: argparse.Namespace, impl: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, mode, "--batch", str(args.batch),
           "--steps", str(args.steps), "--iterations", str(args.iterations),
           "--warmup", str(args.warmup), "--dropout", str(args.dropout), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(summary: dict, base: str, new: str, key: str) -> None:
    """Speed and peak-memory ratios of `new` over `base`, into summary and printed."""
    for mode in ("train", "eval"):
        b, n = summary[f"{base}_{mode}"], summary[f"{new}_{mode}"]
        speed = summary[f"{key}speedup_{mode}"] = b["seconds"] / n["seconds"]
        memory = summary[f"{key}memory_ratio_{mode}"] = n["peak_mb"] / b["peak_mb"]
        print(f"{mode}: {new} runs at {speed:.2f}x the speed of {base}, with {memory:.2f}x its "
              "peak memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    parser.add_argument("--iterations", type=int, default=3, help="timed runs per child (median)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed runs per child first: on the 2-core CPU measured, a "
                             "process's second training iteration was still several times the "
                             "steady state (the C library growing its heap, page faults), the "
                             "third no longer")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="the seed's 0.1 (on both sides), or 0 to compare without dropout")
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the oracle is CPU-only)")
    parser.add_argument("--only-fast", action="store_true", help="skip the oracle (e.g. on GPU)")
    parser.add_argument("--amp", action="store_true",
                        help="also the fast model under bfloat16 autocast (CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="also the fast model with its steps compiled (torch.compile)")
    parser.add_argument("--torch-networks", action="store_true",
                        help="also the fast model with its pure-torch networks (GLOM_NATIVE=0) "
                             "instead of the compiled ones")
    parser.add_argument("--patch", action="store_true",
                        help="also measure the patch and patch_small presets")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.steps, args.iterations, args.warmup,
                               args.dropout, args.device)))
        return

    impls = ((["fast"] if args.only_fast else ["oracle", "fast"])
             + (["fast-torch"] if args.torch_networks else [])
             + (["fast-bf16"] if args.amp else []) + (["fast-compiled"] if args.compile else [])
             + (["patch", "patch_small"] if args.patch else []))
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.repeats):
        for mode in ("train", "eval"):
            for impl in impls:
                m = measure(args, impl, mode)
                results.setdefault((impl, mode), []).append(m)
                print(f"round {r + 1}: {impl:13s} {mode:5s} {m['seconds']:8.3f} s  "
                      f"peak {m['peak_mb']:8.0f} MB", flush=True)

    import torch  # for the summary only; each child measures its own time and memory

    summary: dict = {"batch": args.batch, "steps": args.steps, "dropout": args.dropout,
                     "iterations": args.iterations, "warmup": args.warmup, "device": args.device,
                     "machine": platform.processor() or platform.machine(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                     "threads": torch.get_num_threads(),  # the children's too: same environment
                     "torch": torch.__version__,
                     "repeats": args.repeats, "command": " ".join(sys.argv)}
    print(f"\nbatch {args.batch}, {args.steps} steps, dropout {args.dropout}, {args.device}; "
          f"median over {args.repeats} alternating rounds of {args.iterations} runs")
    print(f"{'':20s}{'s/iter':>10s}{'images/s':>10s}{'peak MB':>10s}")
    for (impl, mode), ms in results.items():
        sec = statistics.median(m["seconds"] for m in ms)
        peak = max(m["peak_mb"] for m in ms)
        summary[f"{impl}_{mode}"] = {"seconds": sec, "images_per_s": args.batch / sec,
                                     "peak_mb": peak, "networks": ms[0]["networks"],
                                     "rounds_seconds": [m["seconds"] for m in ms]}
        print(f"{impl + ' ' + mode:20s}{sec:10.3f}{args.batch / sec:10.1f}{peak:10.0f}")
    if not args.only_fast:
        compare(summary, "oracle", "fast", "")
    if args.torch_networks:
        compare(summary, "fast-torch", "fast", "native_")
        if not args.only_fast:
            compare(summary, "oracle", "fast-torch", "torch_")
    if args.amp:
        compare(summary, "fast", "fast-bf16", "amp_")
    if args.compile:
        compare(summary, "fast", "fast-compiled", "compile_")
        if not args.only_fast:
            compare(summary, "oracle", "fast-compiled", "compiled_")
    if args.patch:
        compare(summary, "fast", "patch", "patch_")
        compare(summary, "fast", "patch_small", "patch_small_")
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    main()
