"""How `Glom` runs fast: every network's layers at once, their dropout and their backward passes.

model.py says what a GLOM step computes; this module computes the networks' part of it quickly,
behind one call (`Networks`, which the model holds as `model.kernels`), and supplies the
rollout's noise, its inference chunks and `torch.compile`. None of it changes the maths:
tests/test_model.py checks every path here against the seed's formulation (tests/oracle.py),
value by value and gradient by gradient. docs/speed.md tells how each piece was measured.

Every network is `Q = tanh(A x + a)`, `K = tanh(B Q + b) + Q`, `V = tanh(C K + c) + Q + K`, x the
k x k torus neighbourhood of its source level, with dropout on x, Q and K while training. Which
implementation runs:

| first layer (Q)                  | CPU, compiled module built | CPU otherwise, GPU           |
|----------------------------------|----------------------------|------------------------------|
| no dropout (evaluation)          | one grouped convolution    | one grouped convolution      |
| the seed's per-network dropout   | `_NativeMaskedTaps`        | `_MaskedTaps`                |
| **10x10 layers (K, V)**          | `_NativeNetworkTail`       | `_NetworkTail`               |

The seed drops out each network's 90 inputs of each column with a mask of its own, so a state
value that 9 neighbourhoods and up to 3 networks read is dropped independently in each: the
first layer then cannot be one convolution. `_MaskedTaps` unfolds the neighbourhoods a few
images at a time and zeroes the dropped values before one matrix product per network; the
compiled module (glom_mnist/native.py, csrc/networks.cpp) does the same one (image, network)
tile at a time in the core's cache. All dropout is drawn as the positions it zeroes (geometric
gaps, `_drop_positions`), and the backward passes find them again instead of keeping masks.
On a CPU tanh is computed as 2 sigmoid(2u) - 1, the 2 of 2u folded into the weights, as is
dropout's 1/(1-p).
"""
from __future__ import annotations

import functools
import math
import os
import shutil
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

from . import native

# `compile_step` checked equal to the eager model (gradients too) from this torch version
COMPILE_MIN_TORCH = (2, 14)
# inference on a CPU rolls out this many state values at a time (`inference_chunk`)
INFERENCE_CHUNK_VALUES = 8 * 4 * 10 * 28 * 28
# `_MaskedTaps` unfolds this many values at a time on a CPU: 6 images' 8 networks' 3x3
# neighbourhoods, 13.5 MB, which fit the measured CPU's 32 MB cache (chunks of 3 and 6 images
# trained equally fast; 12 slower)
MASKED_TAPS_CHUNK_VALUES = 6 * 8 * 90 * 28 * 28


class Networks(nn.Module):
    """Every network of a GLOM model at once: `V` `(B, R, D, H, W)`, network r in route order.

    Holds no weights (they are the model's, passed in, so its checkpoints keep their keys), only
    the layout of the first layers as one convolution: the state `(B, L*D, H, W)` convolved with
    L groups, one per source level, each with S*D outputs (S slots per level, S the most networks
    reading one level; network r in slot `slot[r]`, the unused slots with zero weights). Measured
    on a CPU, this beat one convolution per network (each level copied once per reader) and one
    dense convolution whose weight is zero outside each network's source level.
    """

    def __init__(self, sources: list[int], levels: int) -> None:
        super().__init__()
        rank = [sources[:r].count(src) for r, src in enumerate(sources)]
        self.slots = max((sources.count(l) for l in range(levels)), default=0)
        slot = [src * self.slots + i for src, i in zip(sources, rank)]
        self.register_buffer("sources", torch.tensor(sources, dtype=torch.long), persistent=False)
        self.register_buffer("slot", torch.tensor(slot, dtype=torch.long), persistent=False)

    def forward(self, levels: torch.Tensor, A: torch.Tensor, a: torch.Tensor, B: torch.Tensor,
                b: torch.Tensor, C: torch.Tensor, c: torch.Tensor, p: float) -> torch.Tensor:
        """V of every network `(B, R, D, H, W)` from the state `(B, L, D, H, W)`, with dropout
        probability p (0 in evaluation). A `(R, D, D, k, k)`, a, b, c `(R, D)`, B, C `(R, D, D)`."""
        n, _, D, H, W = levels.shape
        R = len(self.sources)
        Q = self.first_layer(levels, A, a, p).view(n, R, D, H * W)         # (B, R, D, H*W)
        w = 2.0 * dropout_scale(p)                                          # see _NetworkTail
        weights = (w * B, 2.0 * b, w * C, 2.0 * c)
        module = _compiled_networks(Q)
        if module is not None:
            seed = _mask_seed() if p > 0 else 0
            V = _NativeNetworkTail.apply(Q, *weights, p, seed, module)
        else:
            drops = [None, None]                                             # on Q and on K
            if p > 0:
                drops = [_drop_positions(Q.numel(), p, device=Q.device) for _ in drops]
            V = _NetworkTail.apply(Q, *weights, *drops)
        return V.view(n, R, D, H, W)

    def first_layer(self, levels: torch.Tensor, A: torch.Tensor, a: torch.Tensor,
                    p: float) -> torch.Tensor:
        """Every network's `Q = tanh(A x + a)` `(B, R, D, H, W)`, x its source level's k x k torus
        neighbourhood, each of its values dropped with probability p on its own (the seed's)."""
        if p > 0:
            return self.masked_taps(levels, A * dropout_scale(p), a, p)
        n, L, D, H, W = levels.shape
        R, S, k = len(self.sources), self.slots, A.shape[-1]
        A = A.new_zeros(L * S, D, D, k, k).index_copy(0, self.slot, A)
        a = a.new_zeros(L * S, D).index_copy(0, self.slot, a)
        x = _circular_pad(levels.reshape(n, L * D, H, W), k // 2)
        Q = F.conv2d(x, A.reshape(L * S * D, D, k, k), a.reshape(-1), groups=L)  # (B, L*S*D, H, W)
        return _tanh(Q.view(n, L * S, D, H, W).index_select(1, self.slot)).view(n, R, D, H, W)

    def masked_taps(self, levels: torch.Tensor, A: torch.Tensor, a: torch.Tensor,
                    p: float) -> torch.Tensor:
        """`first_layer` with the seed's dropout, A already scaled by 1/(1-p): compiled on a CPU
        (`_NativeMaskedTaps`) where it could be built, `_MaskedTaps` otherwise."""
        n, _, D, H, W = levels.shape
        R = len(self.sources)
        seed = _mask_seed()
        module = _compiled_networks(levels)
        if module is not None:
            Q = _NativeMaskedTaps.apply(levels, self.sources, A, a, p, seed, module)
        else:
            k = A.shape[-1]
            chunk = n if levels.device.type != "cpu" else max(
                1, MASKED_TAPS_CHUNK_VALUES // (R * k * k * D * H * W))
            Q = _MaskedTaps.apply(levels, self.sources, A, a, p, seed, chunk)
        return Q.view(n, R, D, H, W)


def dropout_scale(p: float) -> float:
    """Inverted dropout's 1/(1-p), applied to the weights that read a dropped-out tensor rather
    than to the tensor (1 without dropout)."""
    return 1.0 / (1.0 - p) if p > 0 else 1.0


def uniform_like(x: torch.Tensor, high: float) -> torch.Tensor:
    """Noise uniform over [0, high), shaped like x, from 16-bit fields: the midpoints of 65536
    equal bins. The rollout adds it (high = 1e-4) to a state of order 0.1 to 1, whose float32
    spacing is coarser than the bins (1.5e-9), so the sum is distributed as with torch.rand
    (which draws 32 bits per value: two of these per draw)."""
    bins = 2**16
    return _random_fields(x).to(x.dtype).mul_(high / bins).add_(high * (2**15 + 0.5) / bins)


def _random_fields(x: torch.Tensor) -> torch.Tensor:
    """Independent uniform 16-bit integers in [-2**15, 2**15), int16, shaped like x: four per
    64-bit draw of x's device's generator."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
    return words.view(torch.int16)[:n].view(x.shape)


def inference_chunk(levels: torch.Tensor, training: bool) -> int:
    """How many images to roll out at once: all of them, except for inference (eval mode, no
    gradient) on a CPU, where chunks of about INFERENCE_CHUNK_VALUES state values (8 images of
    28x28) ran 2.2x and 5.3x faster than whole batches of 60 and 500 on the 2-core machine
    measured: their tensors stay in the CPU's cache, and below the size at which the C library
    hands every new tensor fresh pages from the kernel, whose page faults took over half of a
    batch-500 evaluation's time. Each image's rollout is its own in eval mode: the same result."""
    if training or torch.is_grad_enabled() or levels.device.type != "cpu":
        return levels.shape[0]
    return max(1, INFERENCE_CHUNK_VALUES // levels[0].numel())


def compile_step(step: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 **options) -> Callable[[torch.Tensor], torch.Tensor]:
    """`step` through `torch.compile` (its elementwise work fused into a few loops; the
    convolutions stay library calls), or a clear error where that is known not to work. The first
    call compiles, taking a minute or so on a CPU, where it needs a C++ compiler."""
    if TorchVersion(torch.__version__) < COMPILE_MIN_TORCH:
        raise RuntimeError(
            f"compile_steps needs torch {'.'.join(map(str, COMPILE_MIN_TORCH))} or newer "
            f"(requirements.lock pins it), found {torch.__version__}: on torch 2.11 the "
            "compiled steps' gradients differed from the eager model's; run without compiling")
    if device.type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c):
        raise RuntimeError("compiling on a CPU needs a C++ compiler (g++ or clang++, or $CXX) "
                           "and none was found: install one (`apt-get install g++`), or run "
                           "without compiling")
    return torch.compile(step, dynamic=False, **options)


# ---- tanh ------------------------------------------------------------------------------------
def _tanh_of_half_(u: torch.Tensor) -> torch.Tensor:
    """tanh(u / 2) as 2 sigmoid(u) - 1, in place: the callers put the 2 of tanh(x) =
    2 sigmoid(2x) - 1 into the weights that make u (see _SigmoidTanh)."""
    return u.sigmoid_().mul_(2.0).sub_(1.0)


class _SigmoidTanh(torch.autograd.Function):
    """tanh(x) computed as 2 * sigmoid(2x) - 1, with tanh's own backward: the same function (to
    float rounding), but on the CPUs measured torch.tanh took several times longer than these
    three passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = _tanh_of_half_(x * 2.0)                   # one new tensor, the rest in place
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """torch.tanh, through `_SigmoidTanh` on a CPU (on a GPU both are memory-bound, and one pass
    beats three)."""
    return _SigmoidTanh.apply(x) if x.device.type == "cpu" else torch.tanh(x)


# ---- the 10x10 layers ------------------------------------------------------------------------
class _NetworkTail(torch.autograd.Function):
    """Every network's second and third layers at once, from its first layer's output Q:
    `K = tanh(B drop1(Q) + b) + Q`, `V = tanh(C drop2(K) + c) + Q + K`, returning V `(N, R, D, P)`.

    Written out with its own backward: it saves only what the gradients read and zeroes the
    dropped gradients in place, fewer passes over the network activations per step than
    autograd's graph of the same expression. tanh(u) is computed as 2 sigmoid(2u) - 1, with
    the 2 of 2u in the weights: the caller passes `W1 = 2 B`, `b1 = 2 b`, `W2 = 2 C`, `b2 = 2 c`
    (dropout's 1/(1-p) folded in as well), so that each layer is one product, a bias, an in-place
    sigmoid and one fused add.
    drop1, drop2: the positions in Q and in K (flattened) that dropout zeroes (`_drop_positions`),
    or None. Q `(N, R, D, P)`, W `(R, D, D)`, b `(R, D)`.
    """

    @staticmethod
    def forward(ctx, Q, W1, b1, W2, b2, drop1, drop2):
        Qm = _zeroed(Q, drop1)
        s1 = torch.matmul(W1, Qm).add_(b1[..., None]).sigmoid_()        # sigmoid(2 (B Qm + b))
        K = torch.add(Q, s1, alpha=2.0).sub_(1.0)                        # Q + tanh(B Qm + b)
        Km = _zeroed(K, drop2)
        s2 = torch.matmul(W2, Km).add_(b2[..., None]).sigmoid_()
        V = torch.add(Q, K).add_(s2, alpha=2.0).sub_(1.0)               # Q + K + tanh(C Km + c)
        drops = [_compact(d) for d in (drop1, drop2)]
        ctx.save_for_backward(Qm, Km, s1, s2, W1, W2, *(d for d in drops if d is not None))
        ctx.dropped = [d is not None for d in drops]
        ctx.weight_dtype = W1.dtype
        return V

    @staticmethod
    def backward(ctx, gV):
        Qm, Km, s1, s2, W1, W2, *drops = ctx.saved_tensors
        drop1, drop2 = (drops.pop(0) if dropped else None for dropped in ctx.dropped)
        # under autocast the activations (and gV) are bfloat16 and the weights float32: the
        # products run in the activations' dtype, as autocast ran the forward's
        W1, W2 = W1.to(gV.dtype), W2.to(gV.dtype)
        # V = Q + K + 2 sigmoid(a2) - 1 with a2 = W2 Km + b2: dV/da2 = 2 g2 below
        g2 = torch.ops.aten.sigmoid_backward(gV, s2)
        gW2, gb2 = _weight_grads(g2, Km)
        gKm = torch.matmul(W2.transpose(-1, -2) * 2.0, g2)
        gK = _zeroed(gKm, drop2, inplace=True).add_(gV)
        g1 = torch.ops.aten.sigmoid_backward(gK, s1)                    # K = Q + 2 sigmoid(a1) - 1
        gW1, gb1 = _weight_grads(g1, Qm)
        gQm = torch.matmul(W1.transpose(-1, -2) * 2.0, g1)
        gQ = _zeroed(gQm, drop1, inplace=True).add_(gV).add_(gK)        # Q's three paths
        weights = (g.to(ctx.weight_dtype) for g in (gW1, gb1, gW2, gb2))
        return gQ, *weights, None, None


def _zeroed(x: torch.Tensor, positions: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
    """x with its (flattened) elements at `positions` set to 0 (dropout without the scale): a
    copy, or x itself when `inplace`; x unchanged when positions is None."""
    if positions is None:
        return x
    out = x if inplace else x.clone(memory_format=torch.contiguous_format)
    out.view(-1).index_fill_(0, positions.long(), 0.0)
    return out


def _compact(positions: torch.Tensor | None) -> torch.Tensor | None:
    """Dropped positions as kept for a backward pass: int32 where they fit (half the memory)."""
    if positions is None or positions.numel() == 0 or positions[-1] >= 2**31:
        return positions
    return positions.int()


def _weight_grads(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of W and b in `a = W x + b`, given half the gradient of a (`_NetworkTail`)."""
    return (torch.matmul(g, x.transpose(-1, -2)).sum(0).mul_(2.0),
            g.sum((0, 3)).mul_(2.0))


# ---- dropout as the positions it zeroes ------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _gap_table(p: float, device: torch.device) -> torch.Tensor:
    """The gap between successive dropped elements for each 16-bit uniform v, int64 `(65536,)`:
    geometric(p) by inversion, floor(log(1 - u) / log(1 - p)) + 1 with 1 - u = (v + 1) / 2**16,
    so that each gap length's probability is a multiple of 2**-16 within 2**-16 of geometric's
    (an element is dropped with probability round(p * 2**16) / 2**16, 0.100006 for the seed's
    0.1) and no gap is longer than floor(16 log(2) / -log(1 - p)) + 1 (106 for p = 0.1, longer
    with probability 1.5e-5)."""
    one_minus_u = torch.arange(1, 2**16 + 1, dtype=torch.float64) / 2**16
    return (one_minus_u.log() / math.log1p(-p)).floor().to(torch.int64).add(1).to(device)


def _drop_positions(n: int, p: float, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu", draw: int | None = None) -> torch.Tensor:
    """Where dropout with probability p strikes among n elements: the dropped positions, sorted
    (int64, all < n), each element dropped with probability p (to 2**-16, see `_gap_table`).

    The gaps between successive drops are geometric(p), looked up in `_gap_table` for 16-bit
    uniforms: 16 random bits per dropped element instead of at least 16 per element, a tenth of
    the random bits at p = 0.1, and no arithmetic but a table look-up and a cumulative sum (the
    dropout of the seed's first layer drops 3.4 million values per step of a training batch).
    `draw`: how many gaps to draw at a time, by default enough to cover n but for a chance of
    about 1e-15."""
    draw = draw or int(n * p + 8 * math.sqrt(n * p * (1 - p))) + 16
    table = _gap_table(p, torch.device(device))
    parts, covered = [], 0
    while covered < n:
        words = torch.empty((draw + 3) // 4, dtype=torch.int64, device=device)
        words.random_(-2**63, None, generator=generator)
        # four 16-bit fields per 64-bit word, as 0 .. 2**16 - 1 (int16 views work on every device)
        fields = words.view(torch.int16)[:draw].int().add_(2**15)
        parts.append(table.index_select(0, fields))
        covered += int(parts[-1].sum())
    positions = (torch.cat(parts) if len(parts) > 1 else parts[0]).cumsum_(0).sub_(1)
    return positions[:int(torch.searchsorted(positions, n))]                   # those < n


def _mask_seed() -> int:
    """A seed for a step's dropout positions, from the global CPU generator: deterministic under
    torch.manual_seed."""
    return int(torch.randint(0, 2**62, ()))


# ---- the first layer with the seed's dropout -------------------------------------------------
class _MaskedTaps(torch.autograd.Function):
    """Every network's first layer, with the seed's dropout on its inputs:
    `Q = tanh(A (x times its own mask) + a)`, `(B, R, D, H*W)`, x the k x k torus neighbourhood
    of the network's source level at each column (k*k*D values, tap-major: tap (i, j), channel c at
    (i*k + j)*D + c; tap (i, j) reads the neighbour at offset (i - k//2, j - k//2)), one mask
    per network, column and value, as when the seed drops out each network's concatenated
    neighbourhood.

    levels `(B, L, D, H, W)`; sources `(R,)`, each network's source level; A `(R, D, D, k, k)`
    (dropout's 1/(1-p) folded in); a `(R, D)`. The neighbourhoods are unfolded `chunk` images at
    a time (9x the state per network: a chunk of them stays in a CPU's cache), their dropped
    values zeroed (`_drop_positions`, drawn chunk by chunk from a generator seeded with `seed`)
    and multiplied with A, one product per chunk, its bias and tanh added while the chunk is
    still in the cache. The backward pass unfolds them again from the levels and keeps only the
    dropped positions (int32: 4 bytes per dropped value, a tenth of a mask's 4 bytes per value)
    and the output, not the masks or the unfolded values."""

    @staticmethod
    def forward(ctx, levels, sources, A, a, p, seed, chunk):
        B, _, D, H, W = levels.shape
        generator = torch.Generator(device=levels.device)
        generator.manual_seed(seed)
        Y = levels.new_empty(B, len(sources), D, H * W)
        cpu = levels.device.type == "cpu"
        # tanh(u) as 2 sigmoid(2u) - 1 on a CPU (see _SigmoidTanh), the 2 of 2u in the weights
        scale = 2.0 if cpu else 1.0
        A_matrix, bias = _MaskedTaps.matrix(A) * scale, a[:, :, None] * scale  # (R, D, k*k*D)
        dropped = []
        for s, e, X in _MaskedTaps.unfolded(levels, sources, A.shape[-1], chunk):
            zeroed = _drop_positions(X.numel(), p, generator, X.device)
            _zeroed(X, zeroed, inplace=True)
            # the chunk's activations, finished while they are still in the cache
            Yc = torch.matmul(A_matrix, X, out=Y[s:e]).add_(bias)
            _tanh_of_half_(Yc) if cpu else Yc.tanh_()
            dropped.append(_compact(zeroed))
        ctx.save_for_backward(levels, sources, A, Y, *dropped)
        ctx.chunk = chunk
        return Y

    @staticmethod
    def backward(ctx, gY):
        levels, sources, A, Y, *dropped = ctx.saved_tensors
        k = A.shape[-1]
        A = _MaskedTaps.matrix(A)                                      # (R, D, k*k*D)
        gA, ga = torch.zeros_like(A), torch.zeros_like(A[..., 0])
        g_levels = torch.zeros_like(levels)
        chunks = _MaskedTaps.unfolded(levels, sources, k, ctx.chunk)
        for (s, e, X), zeroed in zip(chunks, dropped):
            zeroed = zeroed.long()
            _zeroed(X, zeroed, inplace=True)
            gU = torch.ops.aten.tanh_backward(gY[s:e], Y[s:e])         # before the tanh
            ga += gU.sum((0, 3))
            gA += torch.matmul(gU, X.transpose(-1, -2)).sum(0)
            gX = torch.matmul(A.transpose(-1, -2), gU, out=X)          # (n, R, k*k*D, H*W)
            _zeroed(gX, zeroed, inplace=True)
            g_levels[s:e].index_add_(1, sources, _MaskedTaps.fold(gX, k, *levels.shape[2:]))
        R, D, _ = A.shape
        gA = gA.view(R, D, k, k, D).permute(0, 1, 4, 2, 3)             # (R, D, D, k, k)
        return g_levels, None, gA, ga, None, None, None

    @staticmethod
    def matrix(A):
        """`(R, D, D, k, k)` -> `(R, D, k*k*D)`, the columns in the unfolded values' order."""
        R, D, _, k, _ = A.shape
        return A.permute(0, 1, 3, 4, 2).reshape(R, D, k * k * D)

    @staticmethod
    def unfolded(levels, sources, k, chunk):
        """(s, e, X) for each chunk of images s:e, X `(e-s, R, k*k*D, H*W)` their networks'
        unfolded neighbourhoods: one buffer, overwritten chunk after chunk."""
        B, _, D, H, W = levels.shape
        R = len(sources)
        buffer = levels.new_empty(min(chunk, B), R, k * k * D, H * W)
        for s in range(0, B, chunk):
            e = min(s + chunk, B)
            X = buffer[:e - s]
            padded = _circular_pad(levels[s:e], k // 2).index_select(1, sources)
            # every k x k window as a view (n, R, D, H, W, i, j), copied tap-major in one pass
            windows = padded.unfold(3, k, 1).unfold(4, k, 1)
            X.view(e - s, R, k, k, D, H, W).copy_(windows.permute(0, 1, 5, 6, 2, 3, 4))
            yield s, e, X

    @staticmethod
    def fold(gX, k, D, H, W):
        """The unfolding's gradient: `(n, R, k*k*D, H*W)` -> `(n, R, D, H, W)`, each tap's part
        added back where it was read from."""
        n, R = gX.shape[:2]
        g = gX.new_zeros(n, R, D, H + k - 1, W + k - 1)                # the padded source's
        for t in range(k * k):
            i, j = divmod(t, k)
            g[..., i:i + H, j:j + W] += gX[:, :, t * D:(t + 1) * D].view(n, R, D, H, W)
        return _unpad_circular(g, k // 2)


def _circular_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """`(..., C, H, W)` -> `(..., C, H + 2r, W + 2r)`, wrapping around (the torus)."""
    *lead, C, H, W = x.shape
    return F.pad(x.reshape(-1, C, H, W), (r,) * 4, mode="circular").view(*lead, C, H + 2 * r,
                                                                          W + 2 * r)


def _unpad_circular(g: torch.Tensor, r: int) -> torch.Tensor:
    """The gradient of `_circular_pad(x, r)` with respect to x, from the padded one's g (which
    it overwrites): each halo row and column added to the one it copied, then the halo cut off.
    `(..., H + 2r, W + 2r)` -> `(..., H, W)`."""
    H, W = g.shape[-2] - 2 * r, g.shape[-1] - 2 * r
    g[..., r:2 * r, :] += g[..., H + r:, :]       # the halo below copied the first r rows
    g[..., H:H + r, :] += g[..., :r, :]           # the halo above, the last r rows
    g[..., :, r:2 * r] += g[..., :, W + r:]       # then the columns (the corners come along)
    g[..., :, W:W + r] += g[..., :, :r]
    return g[..., r:H + r, r:W + r]


# ---- the compiled CPU path (glom_mnist/native.py) --------------------------------------------
class _NativeMaskedTaps(torch.autograd.Function):
    """`_MaskedTaps` on a CPU through the compiled first layer: the same function of
    (levels, sources, A, a) with dropout p, each (image, network) tile's dropped positions drawn
    from its own random stream seeded with `seed` and the tile's index, and drawn again by the
    backward pass. `module`: the compiled module."""

    @staticmethod
    def forward(ctx, levels, sources, A, a, p, seed, module):
        table = _native_gap_table(p)
        A_matrix = _MaskedTaps.matrix(A)                               # (R, D, k*k*D)
        levels = levels.contiguous()
        # tanh(u) as 2 sigmoid(2u) - 1 (see _SigmoidTanh), the 2 of 2u in the weights
        U = module.forward(levels, sources, A_matrix * 2.0, a * 2.0, True, seed, table)
        Y = _tanh_of_half_(U)
        ctx.save_for_backward(levels, sources, A_matrix, Y, table)
        ctx.seed, ctx.module, ctx.k = seed, module, A.shape[-1]
        return Y

    @staticmethod
    def backward(ctx, gY):
        levels, sources, A_matrix, Y, table = ctx.saved_tensors
        gU = torch.ops.aten.tanh_backward(gY, Y)                       # before the tanh
        g_levels, gA, ga = ctx.module.backward(levels, sources, A_matrix, gU, True, ctx.seed,
                                               table)
        R, D, _ = gA.shape
        gA = gA.view(R, D, ctx.k, ctx.k, D).permute(0, 1, 4, 2, 3)     # (R, D, D, k, k)
        return g_levels, None, gA, ga, None, None, None


class _NativeNetworkTail(torch.autograd.Function):
    """`_NetworkTail` on a CPU through the compiled module, the same arguments but for the
    dropout: probability p (0: none), each (image, network) tile's dropped positions in Q and K
    drawn from its own random streams seeded with `seed`. Its backward pass computes each tile's
    activations again instead of keeping them: it saves only Q (which the first layer keeps
    anyway) and the weights."""

    @staticmethod
    def forward(ctx, Q, W1, b1, W2, b2, p, seed, module):
        table = _native_gap_table(p)
        Q, *weights = (x.contiguous() for x in (Q, W1, b1, W2, b2))
        V = module.tail_forward(Q, *weights, p > 0, seed, table)
        ctx.save_for_backward(Q, *weights, table)
        ctx.dropout, ctx.seed, ctx.module = p > 0, seed, module
        return V

    @staticmethod
    def backward(ctx, gV):
        Q, W1, b1, W2, b2, table = ctx.saved_tensors
        grads = ctx.module.tail_backward(Q, W1, b1, W2, b2, gV, ctx.dropout, ctx.seed, table)
        return *grads, None, None, None


def _native_gap_table(p: float) -> torch.Tensor:
    """`_gap_table` as the compiled module reads it (int32, on the CPU); zeros for p = 0, when
    it draws nothing."""
    return _gap_table(p, torch.device("cpu")).int() if p > 0 else torch.zeros(2**16,
                                                                              dtype=torch.int32)


def _compiled_networks(x: torch.Tensor):
    """The compiled module (glom_mnist/native.py) where it serves x: float32 or float64 on a
    CPU, and built; None otherwise (then the pure-torch functions run)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or torch.compiler.is_compiling()):  # torch.compile fuses the pure-torch functions
        return None
    return native.module()
