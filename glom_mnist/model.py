"""GLOM as a state grid: one column of L level embeddings per pixel, updated T times.

Hinton, "How to represent part-whole hierarchies in a neural network" (arXiv:2102.12627): at
every step each level embedding receives a bottom-up message from the level below, a top-down
message from the level above, an attention-weighted average of the same level in nearby columns,
and keeps its previous value. This file follows the public GLOM-on-MNIST experiment
(`shared/docs/seed-experiment.md`): every message is computed by a small network that reads the
3x3 torus neighbourhood of one level, and the consensus attention uses Kilcher's similarity over
the level and the levels above it (weights lambda**k).

Speed: the seed concatenates 9 rolled copies of the state and runs 8 separate Linear(90->10)
networks. Here all networks run at once: their first layer is one 3x3 convolution with circular
padding and a group per source level (the same linear map; `seed_linear_to_conv` gives the
weight layout and tests/test_model.py proves the equality), their 10x10 layers batched matrix
products with a hand-written backward (`_NetworkTail`); tanh is computed from a sigmoid, measured
faster on a CPU. Noise (and the `shared` input dropout's masks) come from 16-bit random fields
(`_random_fields`); the networks' own dropout is drawn as the positions it zeroes, geometric
gaps looked up for 16-bit uniforms (`_drop_positions`), a tenth of the random bits at p = 0.1.
Dropout on the networks' inputs, in training: the seed draws a separate mask for every network's
90 inputs of every column, which `input_dropout="per_network"` (the default) reproduces: the
neighbourhoods unfolded a few images at a time, their dropped values zeroed at positions drawn
as geometric gaps, one matrix product per network (`_MaskedTaps`). On a CPU both layers run
compiled where they can be built (`_NativeMaskedTaps`, `_NativeNetworkTail`,
glom_mnist/native.py): the same functions one image and network at a time, in the cache (a
training iteration in 0.55x the pure-torch time: benchmarks/results/cpu_2core_native_tail.json).
`input_dropout="shared"`
drops each state value once for all the networks and neighbourhoods that read it, and keeps the
one convolution (GlomConfig).
Axes everywhere: B batch, L levels, D dim, H, W pixels, T steps, R networks ("routes").
"""
from __future__ import annotations

import functools
import math
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

from . import native
from .config import GlomConfig


# Glom.compile_steps checked equal to the eager model (gradients too) from this torch version
COMPILE_MIN_TORCH = (2, 14)
# inference on a CPU rolls out this many state values at a time (Glom.inference_chunk)
INFERENCE_CHUNK_VALUES = 8 * 4 * 10 * 28 * 28
# the seed's per-network input dropout unfolds this many values at a time on a CPU (_MaskedTaps):
# 6 images' 8 networks' 3x3 neighbourhoods, 13.5 MB, which fit the measured CPU's 32 MB cache
# (chunks of 3 and 6 images trained alike in a scratch A/B, not kept; 12 slower)
MASKED_TAPS_CHUNK_VALUES = 6 * 8 * 90 * 28 * 28


def seed_linear_to_conv(weight: torch.Tensor, dim: int, kernel: int = 3) -> torch.Tensor:
    """Lay out a seed `Linear(k*k*D -> D)` weight as a conv weight `(D, D, k, k)`.

    The seed's input is the concatenation over shifts (dy, dx) in row-major order of
    `roll(state, (dy, dx))`, which reads the neighbour at offset (-dy, -dx); a convolution
    (cross-correlation) tap (i, j) reads offset (i - k//2, j - k//2). Hence the flip.
    """
    out = weight.shape[0]
    return weight.reshape(out, kernel, kernel, dim).permute(0, 3, 1, 2).flip(2, 3).contiguous()


def conv_to_seed_linear(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of `seed_linear_to_conv`: `(D, D, k, k)` -> `(D, k*k*D)`."""
    out = weight.shape[0]
    return weight.flip(2, 3).permute(0, 2, 3, 1).reshape(out, -1).contiguous()


def _uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): nn.Linear's default initialisation."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


def _random_fields(x: torch.Tensor) -> torch.Tensor:
    """Independent uniform 16-bit integers in [-2**15, 2**15), int16, shaped like x: four per
    64-bit draw of x's device's generator. The rollout's dropout masks and noise need ~11
    million random numbers per step of a seed training batch; a keep-mask made from these took
    a third of the time of one from torch.rand (one 32-bit draw per element) and a fifth of
    bernoulli_'s on the 2-core CPU (benchmarks/step_variants.py)."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
    return words.view(torch.int16)[:n].view(x.shape)


def _keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's mask for `x`: 1 where an element is kept, 0 where it is dropped, in x's dtype.
    An element is dropped when its 16-bit field falls in the lowest round(p * 2**16) values, so
    with probability round(p * 65536) / 65536 (0.100006 for the seed's 0.1)."""
    keep = torch.empty_like(x, memory_format=torch.contiguous_format)  # written as 0s and 1s
    return torch.ge(_random_fields(x), round(p * 2**16) - 2**15, out=keep)  # no bool


def _uniform_like(x: torch.Tensor, high: float) -> torch.Tensor:
    """Noise uniform over [0, high), shaped like x, from 16-bit fields: the midpoints of 65536
    equal bins. The rollout adds it (high = 1e-4) to a state of order 0.1 to 1, whose float32
    spacing is coarser than the bins (1.5e-9), so the sum is distributed as with torch.rand."""
    bins = 2**16
    return _random_fields(x).to(x.dtype).mul_(high / bins).add_(high * (2**15 + 0.5) / bins)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout without inverted dropout's 1/(1-p): the caller folds that factor into the weights
    of the layer that reads the result (`Glom.dropout_scale`), a tiny tensor instead of x."""
    if not training or p == 0.0:
        return x
    return x * _keep_mask(x, p)


def _tanh_of_half_(u: torch.Tensor) -> torch.Tensor:
    """tanh(u / 2) as 2 sigmoid(u) - 1, in place: the callers put the 2 of tanh(x) =
    2 sigmoid(2x) - 1 into the weights that make u (see _SigmoidTanh)."""
    return u.sigmoid_().mul_(2.0).sub_(1.0)


class _SigmoidTanh(torch.autograd.Function):
    """tanh(x) computed as 2 * sigmoid(2x) - 1, with tanh's own backward.

    The same function (to float rounding), but on the CPUs measured torch.tanh took several times
    longer than these three passes (see README, "Speed and memory")."""

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


class _NetworkTail(torch.autograd.Function):
    """Every network's second and third layers at once, from its first layer's output Q:
    `K = tanh(B drop1(Q) + b) + Q`, `V = tanh(C drop2(K) + c) + Q + K`, returning V `(N, R, D, P)`.

    Written out with its own backward: it saves only what the gradients read and zeroes the
    dropped gradients in place, fewer passes over the network activations per step than
    autograd's graph of the same expression. tanh(u) is computed as 2 sigmoid(2u) - 1, with
    the 2 of 2u in the weights: the caller passes `W1 = 2 B`, `b1 = 2 b`, `W2 = 2 C`, `b2 = 2 c`
    (dropout's 1/(1-p) folded in as well), so that each layer is one product, a bias, an in-place
    sigmoid and one fused add (on a CPU torch.tanh took several times as long as these passes).
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


@functools.lru_cache(maxsize=8)
def _gap_table(p: float, device: torch.device) -> torch.Tensor:
    """The gap between successive dropped elements for each 16-bit uniform v, int64 `(65536,)`:
    geometric(p) by inversion, floor(log(1 - u) / log(1 - p)) + 1 with 1 - u = (v + 1) / 2**16,
    so that each gap length's probability is a multiple of 2**-16 within 2**-16 of geometric's
    (P(1) = round(p * 2**16) / 2**16, as for `_keep_mask`'s 16-bit fields) and no gap is longer
    than floor(16 log(2) / -log(1 - p)) + 1 (106 for p = 0.1, longer with probability 1.5e-5)."""
    one_minus_u = torch.arange(1, 2**16 + 1, dtype=torch.float64) / 2**16
    return (one_minus_u.log() / math.log1p(-p)).floor().to(torch.int64).add(1).to(device)


def _drop_positions(n: int, p: float, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu", draw: int | None = None) -> torch.Tensor:
    """Where dropout with probability p strikes among n elements: the dropped positions, sorted
    (int64, all < n), each element dropped with probability p (to 2**-16, see `_gap_table`).

    The gaps between successive drops are geometric(p), looked up in `_gap_table` for 16-bit
    uniforms: 16 random bits per dropped element instead of 16 per element (`_keep_mask`), a
    tenth of the random bits at p = 0.1, and no arithmetic but a table look-up and a cumulative
    sum (the dropout of the seed's first layer drops 3.4 million values per step of a training
    batch, `_MaskedTaps`). `draw`: how many gaps to draw at a time, by default enough to cover n
    but for a chance of about 1e-15."""
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
    dropped positions (int32: 4 bytes per dropped value, a tenth of the masks' 4 bytes per
    value) and the output, not the masks or the unfolded values."""

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


class _NativeMaskedTaps(torch.autograd.Function):
    """`_MaskedTaps` on a CPU through the compiled first layer (glom_mnist/native.py): the same
    function of (levels, sources, A, a) with dropout p, each (image, network) tile's dropped
    positions drawn from its own random stream seeded with `seed` and the tile's index, and
    drawn again by the backward pass. `module`: the compiled module."""

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
    """`_NetworkTail` on a CPU through the compiled module (glom_mnist/native.py), the same
    arguments but for the dropout: probability p (0: none), each (image, network) tile's dropped
    positions in Q and K drawn from its own random streams seeded with `seed`. Its backward pass
    computes each tile's activations again instead of keeping them: it saves only Q (which the
    first layer keeps anyway) and the weights."""

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


def _mask_seed() -> int:
    """A seed for a step's dropout masks, from the global CPU generator: deterministic under
    torch.manual_seed."""
    return int(torch.randint(0, 2**62, ()))


def _compiled_networks(x: torch.Tensor):
    """The compiled module (glom_mnist/native.py) where it serves x: float32 or float64 on a
    CPU, and built; None otherwise (then the pure-torch functions run)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or torch.compiler.is_compiling()):  # torch.compile fuses the pure-torch functions
        return None
    return native.module()


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


def column_votes(levels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each column's class: argmax of the first num_classes channels of its top-level vector.
    `(..., L, D, H, W)` -> `(..., H, W)`."""
    return levels[..., -1, :num_classes, :, :].argmax(dim=-3)


def vote_counts(votes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Columns voting for each class. `(..., H, W)` -> `(..., num_classes)`."""
    return F.one_hot(votes.flatten(-2), num_classes).sum(-2)


def majority_vote(votes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The image's label: the most common column vote, ties to the lowest class (the seed's
    rule). `(..., H, W)` -> `(...,)`."""
    return vote_counts(votes, num_classes).argmax(-1)


class Glom(nn.Module):
    """The GLOM state grid. `model(images)` -> levels `(B, L, D, H, W)`."""

    def __init__(self, cfg: GlomConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L, D, k = cfg.levels, cfg.dim, cfg.kernel
        self.routes = cfg.routes()
        R = len(self.routes)
        # Per network: Q = tanh(A x + a), K = tanh(B Q + b) + Q, V = tanh(C K + c) + Q + K,
        # x the k x k neighbourhood of its source level. Initialised like the seed's nn.Linear.
        self.A = nn.Parameter(_uniform((R, D, D, k, k), fan_in=D * k * k))   # (R, out, in, k, k)
        self.a = nn.Parameter(_uniform((R, D), fan_in=D * k * k))
        self.B = nn.Parameter(_uniform((R, D, D), fan_in=D))
        self.b = nn.Parameter(_uniform((R, D), fan_in=D))
        self.C = nn.Parameter(_uniform((R, D, D), fan_in=D))
        self.c = nn.Parameter(_uniform((R, D), fan_in=D))
        # The first layers run as one convolution with L groups, one per source level, each with
        # the same number of outputs: S slots per level (S = most networks reading one level),
        # network r in slot route_slot[r]; the unused slots have zero weights.
        source = [src for _, src, _ in self.routes]
        rank = [source[:r].count(src) for r, src in enumerate(source)]
        self.slots = max((source.count(l) for l in range(L)), default=0)
        slot = torch.tensor([src * self.slots + i for src, i in zip(source, rank)], dtype=torch.long)
        self.register_buffer("route_slot", slot, persistent=False)                # (R,)
        self.register_buffer("route_source", torch.tensor(source, dtype=torch.long),
                             persistent=False)                                   # (R,)
        # delta at level l = sum of the outputs of the networks whose target is l
        target = torch.tensor([t for *_, t in self.routes], dtype=torch.long)
        self.register_buffer("route_target", target, persistent=False)           # (R,)
        # the consensus attention reaches every level but the input one
        attended = torch.ones(L).index_fill(0, torch.tensor([0]), 0.0) * float(cfg.attention)
        self.register_buffer("attended_levels", attended.view(1, L, 1, 1, 1), persistent=False)
        receives = torch.bincount(target, minlength=L).float() + attended          # messages per level
        self.register_buffer("messages_per_level", receives.view(1, L, 1, 1, 1), persistent=False)
        # Kilcher's similarity: level l sees lambda**(m-l) <e_m,x, e_m,y> for every m >= l
        m, l = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
        lam = torch.where(m >= l, cfg.attention_lambda ** (m - l).clamp(min=0).float(), 0.0)
        self.register_buffer("level_mix", lam, persistent=False)  # (L above, L)
        self._step = self.update          # one GLOM step; compile_steps() swaps in a compiled one

    def compile_steps(self, **options) -> "Glom":
        """Run each GLOM step (`update`) through `torch.compile` (its elementwise work fused into
        a few loops; the convolutions stay library calls). The first rollout compiles, taking
        a minute or so on a CPU, and needs a C++ compiler there. The same maths: tests compare the
        compiled rollout and its gradients with the eager one. Returns the model."""
        if TorchVersion(torch.__version__) < COMPILE_MIN_TORCH:
            raise RuntimeError(
                f"compile_steps needs torch {'.'.join(map(str, COMPILE_MIN_TORCH))} or newer "
                f"(requirements.lock pins it), found {torch.__version__}: on torch 2.11 the "
                "compiled steps' gradients differed from the eager model's "
                "(resume/gpu_sessions/session3.log); run without compiling")
        if self.A.device.type == "cpu" and not any(
                shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c):
            raise RuntimeError("compiling on a CPU needs a C++ compiler (g++ or clang++, or $CXX) "
                               "and none was found: install one (`apt-get install g++`), or run "
                               "without compiling")
        self._step = torch.compile(self.update, dynamic=False, **options)
        return self

    # ---- the messages -------------------------------------------------------------------
    def first_layer(self, levels: torch.Tensor) -> torch.Tensor:
        """Every network's first layer, `Q = tanh(A x + a)` over its source level's k x k torus
        neighbourhood (dropout on x while training): `(B, R, D, H, W)`, network r in route order.
        One circular convolution for all R (see `network_messages`), but for the seed's own
        input dropout (`first_layer_per_network`)."""
        if self.training and self.cfg.dropout > 0 and self.cfg.input_dropout == "per_network":
            return self.first_layer_per_network(levels)
        B, L, D, H, W = levels.shape
        R, S, k = len(self.routes), self.slots, self.cfg.kernel
        A = self.A.new_zeros(L * S, D, D, k, k).index_copy(0, self.route_slot,
                                                           self.A * self.dropout_scale())
        a = self.a.new_zeros(L * S, D).index_copy(0, self.route_slot, self.a)
        x = _circular_pad(_dropout(levels.reshape(B, L * D, H, W), self.cfg.dropout,
                                   self.training), k // 2)
        Q = F.conv2d(x, A.reshape(L * S * D, D, k, k), a.reshape(-1), groups=L)  # (B, L*S*D, H, W)
        return _tanh(Q.view(B, L * S, D, H, W).index_select(1, self.route_slot)).view(B, R, D, H, W)

    def first_layer_per_network(self, levels: torch.Tensor) -> torch.Tensor:
        """`first_layer` with the seed's own input dropout (`input_dropout="per_network"`, in
        training): every network's k*k*D inputs of every column get their own mask, as when the
        seed drops out each network's concatenated neighbourhood: compiled on a CPU
        (`_NativeMaskedTaps`) where it could be built, `_MaskedTaps` otherwise."""
        B, L, D, H, W = levels.shape
        R = len(self.routes)
        seed = _mask_seed()
        scaled = self.A * self.dropout_scale()
        module = _compiled_networks(levels)
        if module is not None:
            Q = _NativeMaskedTaps.apply(levels, self.route_source, scaled, self.a,
                                        self.cfg.dropout, seed, module)
        else:
            chunk = B if levels.device.type != "cpu" else max(1, MASKED_TAPS_CHUNK_VALUES // (
                R * self.cfg.kernel**2 * D * H * W))
            Q = _MaskedTaps.apply(levels, self.route_source, scaled, self.a, self.cfg.dropout,
                                  seed, chunk)
        return Q.view(B, R, D, H, W)

    def dropout_scale(self) -> float:
        """Inverted dropout's 1/(1-p) while training (1 otherwise), applied to the weights that
        read a dropped-out tensor rather than to the tensor (see `_dropout`)."""
        p = self.cfg.dropout
        return 1.0 / (1.0 - p) if self.training and p > 0 else 1.0

    def network_messages(self, levels: torch.Tensor) -> torch.Tensor:
        """Bottom-up, lateral and top-down messages summed per target level: `(B, L, D, H, W)`.

        All R networks at once: their first layer is one circular k x k convolution of the state
        (B, L*D, H, W) with L groups, one per source level, each with S*D outputs (S slots per
        level; see __init__). Measured on a CPU, this is faster than R grouped convolutions (one
        per network, each level copied once per reader) and than one dense convolution whose
        weight is zero outside each network's source level (4x the multiply-adds for the seed).
        Their 10x10 layers are one batched matrix product each (`(R, D, D) @ (B, R, D, H*W)`)
        inside `_NetworkTail`, whose hand-written backward made a training iteration 8% faster
        than the same products, or grouped 1x1 convolutions, through autograd (the two of which
        were equally fast; benchmarks/step_variants.py). Dropout on Q and K is drawn here, as
        the positions it zeroes (`_drop_positions`), for every network, column and channel. On
        a CPU both layers run compiled where they could be built (`_NativeMaskedTaps`,
        `_NativeNetworkTail`, glom_mnist/native.py), one image and network at a time.
        """
        B, L, D, H, W = levels.shape
        R = len(self.routes)
        Q = self.first_layer(levels).view(B, R, D, H * W)                   # (B, R, D, H*W)
        w = 2.0 * self.dropout_scale()                                       # see _NetworkTail
        weights = (w * self.B, 2.0 * self.b, w * self.C, 2.0 * self.c)
        p = self.cfg.dropout if self.training else 0.0
        module = _compiled_networks(Q)
        if module is not None:
            seed = _mask_seed() if p > 0 else 0
            V = _NativeNetworkTail.apply(Q, *weights, p, seed, module)
        else:
            drops = [None, None]                                             # on Q and on K
            if p > 0:
                drops = [_drop_positions(Q.numel(), p, device=Q.device) for _ in drops]
            V = _NetworkTail.apply(Q, *weights, *drops)
        # times out_scale while summing (one pass less); under autocast V is bfloat16: the sum
        # is kept in the state's own dtype
        return levels.new_zeros(B, L, D, H, W).index_add_(
            1, self.route_target, V.view(B, R, D, H, W).to(levels.dtype), alpha=self.cfg.out_scale)

    def neighbours(self, levels: torch.Tensor) -> list[torch.Tensor]:
        """The k*k torus neighbours of every column, each `(B, L, D, H, W)`, in row-major order
        of their offsets (dy, dx) = (-1, -1), (-1, 0), ..., (1, 1) for k = 3."""
        r = self.cfg.kernel // 2
        return [levels.roll((-dy, -dx), dims=(-2, -1))
                for dy in range(-r, r + 1) for dx in range(-r, r + 1)]

    def attention(self, levels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Consensus-attention weights over the k x k torus neighbourhood, and the neighbours.

        Weight of neighbour y for column x at level l: softmax over y of
        sum_{m >= l} lambda**(m-l) <e_{m,x}, e_{m,y}> / sqrt(D) (Kilcher's similarity: columns
        that agree at higher levels listen to each other more).
        Returns weights `(B, L, N, H, W)` (N = k*k, summing to 1 over N) and the N neighbours
        of `neighbours()`. (One rolled copy per offset: ~3x faster to train through on a CPU
        than unfolding the state into a `(B, L, D, N, H, W)` tensor and contracting it.)
        """
        neighbours = self.neighbours(levels)
        similarity = torch.stack([(levels * n).sum(2) for n in neighbours], 2)  # (B, L, N, H, W)
        scores = torch.einsum("bmnhw,ml->blnhw", similarity, self.level_mix)
        return (scores / math.sqrt(levels.shape[2])).softmax(dim=2), neighbours

    def consensus(self, levels: torch.Tensor) -> torch.Tensor:
        """The attention-weighted average of each level over its neighbourhood `(B, L, D, H, W)`."""
        weights, neighbours = self.attention(levels)
        return sum(weights[:, :, n, None] * v for n, v in enumerate(neighbours))

    def update(self, levels: torch.Tensor) -> torch.Tensor:
        """One GLOM step: previous state + bottom-up + top-down + lateral/attention messages."""
        cfg = self.cfg
        messages = self.network_messages(levels) if self.routes else torch.zeros_like(levels)
        if cfg.update == "residual":
            if cfg.attention:  # step towards the neighbourhood's consensus
                pull = self.consensus(levels) - levels
                messages = messages + cfg.attention_weight * self.attended_levels * pull
            return levels + messages
        # "average": each level that receives messages becomes the mean of its previous value
        # and the messages it receives (Hinton's weighted average with equal weights)
        if cfg.attention:
            messages = messages + self.attended_levels * self.consensus(levels)
        count = self.messages_per_level
        return torch.where(count > 0, (levels + messages) / (1 + count), levels)

    # ---- the rollout ------------------------------------------------------------------------
    def initial_state(self, images: torch.Tensor) -> torch.Tensor:
        """Uniform noise in [0, init_noise) with the image copied into every channel of level 0."""
        B, _, H, W = images.shape
        cfg = self.cfg
        levels = torch.rand(B, cfg.levels, cfg.dim, H, W, device=images.device,
                            dtype=images.dtype) * cfg.init_noise
        levels[:, 0] = images.expand(B, cfg.dim, H, W)
        return levels

    def forward(self, images: torch.Tensor, steps: int | None = None,
                return_all: bool = False) -> torch.Tensor:
        """Roll the state grid out for `steps` (default cfg.steps) updates.

        images: `(B, 1, H, W)`, normalised. Returns the final levels `(B, L, D, H, W)`, or with
        return_all every state `(T+1, B, L, D, H, W)` (index 0 is the initial state).
        """
        self.check_images(images)
        cfg = self.cfg
        T = cfg.steps if steps is None else steps
        if not (isinstance(T, int) and T >= 0):
            raise ValueError(f"steps must be a non-negative integer, got {T!r}")
        levels = self.initial_state(images)
        B = levels.shape[0]
        chunk = self.inference_chunk(levels)
        if chunk >= B:
            return self.rollout(levels, T, return_all)
        # inference on a CPU: the images one chunk at a time (each image's rollout is its own in
        # eval mode, so the result is the same; see inference_chunk)
        parts = [self.rollout(levels[i:i + chunk], T, return_all) for i in range(0, B, chunk)]
        return torch.cat(parts, dim=1 if return_all else 0)

    def inference_chunk(self, levels: torch.Tensor) -> int:
        """How many images to roll out at once: all of them, except for inference (eval mode, no
        gradient) on a CPU, where chunks of about INFERENCE_CHUNK_VALUES state values (8 images
        of 28x28) ran 2.2x and 5.3x faster than whole batches of 60 and 500 on the 2-core machine
        measured (benchmarks/cpu_diagnostics.py): their tensors stay in the CPU's cache, and
        below the size at which the C library hands every new tensor fresh pages from the
        kernel, whose page faults took over half of a batch-500 evaluation's time."""
        if self.training or torch.is_grad_enabled() or levels.device.type != "cpu":
            return levels.shape[0]
        return max(1, INFERENCE_CHUNK_VALUES // levels[0].numel())

    def rollout(self, levels: torch.Tensor, T: int, return_all: bool = False) -> torch.Tensor:
        """T steps from the state `levels` `(B, L, D, H, W)` (see forward)."""
        cfg = self.cfg
        input_level = levels[:, :1]                                          # (B, 1, D, H, W)
        states = [levels] if return_all else []
        # accumulated intermediate states: residual shortcuts through the T steps, re-added and
        # re-saved every T//k steps (T//2=15, T//4=7, T//8=3 for T=30; at least every step)
        periods = [max(1, T // k) for k in cfg.accumulate]
        saved = [levels] * len(periods)
        for t in range(T):
            levels = self._step(levels)
            if self.training and cfg.noise:
                levels = levels + _uniform_like(levels, cfg.noise)
            for i, period in enumerate(periods):
                if t % period == 0:
                    levels = levels + cfg.accumulate_scale * saved[i]
                    saved[i] = levels
            if cfg.clamp_input:
                levels = torch.cat([input_level, levels[:, 1:]], 1)
            if return_all:
                states.append(levels)
        if saved:
            levels = levels + cfg.accumulate_scale * sum(saved)
            if cfg.clamp_input:
                levels = torch.cat([input_level, levels[:, 1:]], 1)
            if return_all:
                states[-1] = levels
        return torch.stack(states) if return_all else levels

    # ---- reading the top level ------------------------------------------------------------
    def votes(self, levels: torch.Tensor) -> torch.Tensor:
        """Each column's class `(..., H, W)` from levels `(..., L, D, H, W)`."""
        return column_votes(levels, self.cfg.num_classes)

    def majority(self, votes: torch.Tensor) -> torch.Tensor:
        """The image's label by majority vote: `(B, H, W)` -> `(B,)`."""
        return majority_vote(votes, self.cfg.num_classes)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Majority-vote labels `(B,)`."""
        return self.majority(self.votes(self(images, steps=steps)))

    def check_images(self, images: torch.Tensor) -> None:
        """Refuse input the model cannot read, saying what was expected."""
        cfg = self.cfg
        want = f"(B, 1, {cfg.height}, {cfg.width})"
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor {want}, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape {want}, got {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (cfg.height, cfg.width):
            raise ValueError(f"images must have shape {want} (the config's image size), "
                             f"got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor (normalised pixels), "
                             f"got dtype {images.dtype}")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")
