"""The fast Glom equals the seed's naive formulation, and its parts behave as documented."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from glom_mnist import Glom, GlomConfig, kernels, load_checkpoint
from glom_mnist import native
from glom_mnist.checkpoint import save_checkpoint
from glom_mnist.kernels import _NetworkTail
from glom_mnist.model import conv_to_seed_linear, seed_linear_to_conv
from glom_mnist.seed import glom_from_seed_networks, seed_file_names

from oracle import SHIFTS, OracleGlom, seed_networks


def run_both(height: int, width: int, steps: int, batch: int = 2, seed: int = 0):
    """Final states of the oracle and of the fast model with copied weights and one init."""
    torch.manual_seed(seed)
    oracle = OracleGlom(steps=steps).eval()                       # eval: dropout off
    cfg = GlomConfig.preset("seed", height=height, width=width, steps=steps)
    model = glom_from_seed_networks(seed_networks(oracle), cfg).eval()
    images = torch.randn(batch, 1, height, width)
    torch.manual_seed(seed + 1)
    init = model.initial_state(images)                           # (B, L, D, H, W)
    torch.manual_seed(seed + 1)
    fast = model(images)
    slow = oracle(images, init=init.permute(0, 3, 4, 1, 2))      # (B, H, W, L, D)
    return fast, slow.permute(0, 3, 4, 1, 2), model, oracle, images


@pytest.mark.parametrize("height,width", [(28, 28), (9, 13)])
def test_fast_model_equals_naive_oracle_for_a_full_rollout(height, width):
    fast, slow, *_ = run_both(height, width, steps=30)
    assert fast.shape == slow.shape
    assert torch.allclose(fast, slow, atol=1e-5, rtol=0), (fast - slow).abs().max()
    assert (fast - slow).abs().max() < 1e-5
    assert fast[:, -1].std() > 1e-3                             # a real, non-trivial state


def oracle_network(oracle: OracleGlom, seed_file: str) -> torch.nn.Module:
    """The oracle's network behind a seed file name (`bottom_up_model0`, ...)."""
    role, index = seed_file.rstrip("0123456789"), int(seed_file[-1])
    nets = {"bottom_up_model": oracle.bottom_up, "layer_att_model": oracle.lateral,
            "top_down_model": oracle.top_down}[role]
    return nets[index]


def assert_gradients_equal(model: Glom, oracle: OracleGlom, atol: float = 1e-6) -> None:
    """Every parameter gradient of every network, fast model against oracle."""
    for r, name in enumerate(seed_file_names(model.cfg)):
        net = oracle_network(oracle, name)
        pairs = {"A": (conv_to_seed_linear(model.A.grad[r]), net.Q1.weight.grad),
                 "a": (model.a.grad[r], net.Q1.bias.grad),
                 "B": (model.B.grad[r], net.K1.weight.grad), "b": (model.b.grad[r], net.K1.bias.grad),
                 "C": (model.C.grad[r], net.V1.weight.grad), "c": (model.c.grad[r], net.V1.bias.grad)}
        for key, (fast, slow) in pairs.items():
            assert torch.allclose(fast, slow, atol=atol, rtol=1e-4), (name, key, (fast - slow).abs().max())


def test_gradients_equal_the_oracles():
    fast, slow, model, oracle, _ = run_both(8, 8, steps=6)
    target = torch.rand_like(fast[:, -1])
    F.mse_loss(fast[:, -1], target).backward()
    F.mse_loss(slow[:, -1], target).backward()
    assert_gradients_equal(model, oracle)


class _KeepAll(torch.nn.Module):
    """Dropout that happened to keep every element: x / (1 - p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (1 - self.p)


@pytest.mark.parametrize("path", ["native", "torch"])
def test_training_rollout_equals_the_oracle_when_dropout_keeps_everything(monkeypatch, path):
    """Training mode with masks of ones on both sides: what is left of dropout is inverted
    dropout's 1/(1-p), which the fast model folds into its weights. Rollout and every gradient
    must equal the oracle's, with the compiled networks and with the pure-torch ones."""
    use_networks(monkeypatch, path)
    torch.manual_seed(0)
    p, steps = 0.25, 5
    oracle = OracleGlom(steps=steps, dropout=p, noise=0.0).train()
    for net in [*oracle.bottom_up, *oracle.lateral, *oracle.top_down]:
        net.drop = _KeepAll(p)
    cfg = GlomConfig.preset("seed", height=7, width=6, steps=steps, dropout=p, noise=0.0)
    model = glom_from_seed_networks(seed_networks(oracle), cfg).train()
    keep_everything(monkeypatch)
    images = torch.randn(2, 1, 7, 6)
    init = model.initial_state(images)
    fast = model.rollout(init, steps)
    slow = oracle(images, init=init.permute(0, 3, 4, 1, 2)).permute(0, 3, 4, 1, 2)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=0), (fast - slow).abs().max()
    target = torch.rand_like(fast[:, -1])
    F.mse_loss(fast[:, -1], target).backward()
    F.mse_loss(slow[:, -1], target).backward()
    assert_gradients_equal(model, oracle)


def keep_everything(monkeypatch) -> None:
    """Dropout that drops nothing: gaps between dropped positions so long that the first one
    falls beyond any tensor here (the gap table serves `_drop_positions` and the compiled
    networks alike)."""
    monkeypatch.setattr(kernels, "_gap_table", lambda p, device: torch.full(
        (2**16,), 2**30, dtype=torch.int64, device=device))


def use_networks(monkeypatch, path: str):
    """Make the model's CPU networks the compiled ones ("native", skipped where they cannot be
    built, unless GLOM_REQUIRE_NATIVE=1 as in CI) or the pure-torch ones ("torch"). Returns the
    compiled module, or None."""
    if path == "torch":
        monkeypatch.setattr(native, "module", lambda: None)
        return None
    module = native.module()
    if module is None:
        if os.environ.get("GLOM_REQUIRE_NATIVE") == "1":
            pytest.fail(f"the compiled networks could not be built: {native._failure}")
        pytest.skip(f"the compiled networks could not be built: {native._failure}")
    return module


@pytest.mark.parametrize("images,path", [(2, "torch"), (7, "torch"), (7, "native")])
def test_per_network_input_dropout_is_the_seeds_column_by_column(monkeypatch, images, path):
    """Dropout on the networks' inputs: each network's first layer at each column is the seed's
    Linear(90 -> 10) of the concatenated rolled neighbourhood (SHIFTS order) times its own mask,
    over 1-p; the values the model dropped are mapped to the seed's (shift, channel) order here,
    element by element. Pure torch with 7 images: unfolded in chunks of 3, the last one short.
    Compiled: one tile per image and network, its dropped positions from `tile_drops`."""
    module = use_networks(monkeypatch, path)
    torch.manual_seed(0)
    p, B, H, W = 0.3, images, 5, 4
    cfg = GlomConfig.preset("seed", height=H, width=W, steps=1, dropout=p)
    model = Glom(cfg).train()
    levels = torch.randn(B, 4, 10, H, W)
    if path == "torch":
        drawn = []
        drop_positions = kernels._drop_positions

        def recording(n, p, generator=None, device="cpu"):
            drawn.append((n, drop_positions(n, p, generator, device)))
            return drawn[-1][1]

        monkeypatch.setattr(kernels, "_drop_positions", recording)
        monkeypatch.setattr(kernels, "MASKED_TAPS_CHUNK_VALUES", 3 * 8 * 90 * H * W)
        with torch.no_grad():
            Q = model.first_layer(levels)                            # (B, R, D, H, W)
        # one mask per network, column, tap and channel, drawn for each chunk of 3 images
        assert [n for n, _ in drawn] == [n * 8 * 9 * 10 * H * W for n in (B // 3) * [3] + [B % 3]]
        masks = []  # each chunk's (image, R, tap, channel, column)
        for n, dropped in drawn:
            masks.append(torch.ones(n))
            masks[-1][dropped] = 0.0
        mask = torch.cat(masks).view(B, 8, 9, 10, H * W)
    else:
        calls = []

        class Recording:  # the compiled module, noting the arguments of each forward call
            def forward(self, *args):
                calls.append(args)
                return module.forward(*args)

        monkeypatch.setattr(native, "module", lambda: Recording())
        with torch.no_grad():
            Q = model.first_layer(levels)
        (*_, seed, table), = calls
        n = 9 * 10 * H * W                                             # one tile's values
        mask = torch.ones(B * 8, n)                                    # tile b * R + r
        for tile in range(B * 8):
            mask[tile, module.tile_drops(n, seed, tile, table)] = 0.0
        mask = mask.view(B, 8, 9, 10, H * W)
    assert 0.2 < 1 - mask.mean() < 0.4
    for r, (_, src, _) in enumerate(model.routes):
        weight = conv_to_seed_linear(model.A[r].detach())              # the seed's (10, 90)
        rolled = [levels[:, src].roll(shift, dims=(-2, -1)) for shift in SHIFTS]
        for b in range(B):
            for h in range(H):
                for w in range(W):
                    x90 = torch.cat([x[b, :, h, w] for x in rolled])
                    # seed shift (dy, dx) reads offset (-dy, -dx): the model's tap (1-dy, 1-dx)
                    m90 = torch.cat([mask[b, r, (1 - dy) * 3 + (1 - dx), :, h * W + w]
                                     for dy, dx in SHIFTS])
                    want = torch.tanh(weight @ (x90 * m90) / (1 - p) + model.a[r].detach())
                    assert torch.allclose(Q[b, r, :, h, w], want, atol=1e-5), (r, b, h, w)


def test_compiled_first_layer_drops_each_tile_at_rate_p_on_its_own(monkeypatch):
    """Each tile's positions: sorted, inside the tile, at rate p overall, the same for the same
    seed and tile, different for another tile or seed."""
    module = use_networks(monkeypatch, "native")
    p, n, tiles = 0.1, 9 * 10 * 28 * 28, 40
    table = kernels._gap_table(p, torch.device("cpu")).int()
    drops = [module.tile_drops(n, 7, tile, table) for tile in range(tiles)]
    for d in drops:
        assert d.dtype == torch.int64 and (torch.diff(d) > 0).all() and 0 <= d[0] and d[-1] < n
    rate = sum(len(d) for d in drops) / (n * tiles)
    assert abs(rate - p) < 5 * (p * (1 - p) / (n * tiles)) ** 0.5, rate
    assert torch.equal(drops[3], module.tile_drops(n, 7, 3, table))
    assert not torch.equal(drops[3][:100], drops[4][:100])
    assert not torch.equal(drops[3][:100], module.tile_drops(n, 8, 3, table)[:100])


def test_compiled_network_tail_is_the_torch_one_with_the_positions_it_drew(monkeypatch):
    """The compiled 10x10 layers: with no dropout, and with dropout at the positions each
    (image, network) tile's two streams drew (`tile_drops`, streams 2 tile and 2 tile + 1),
    they compute `_NetworkTail`'s V; their backward pass (which computes the activations and
    draws the positions again) against numerical gradients (float64)."""
    module = use_networks(monkeypatch, "native")
    torch.manual_seed(0)
    B, R, D, P = 3, 4, 5, 7
    Q = torch.randn(B, R, D, P, dtype=torch.float64, requires_grad=True)
    W1, W2 = (torch.randn(R, D, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b1, b2 = (torch.randn(R, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weights = (W1, b1, W2, b2)

    def compiled(Q, W1, b1, W2, b2, p=0.3, seed=5):
        return kernels._NativeNetworkTail.apply(Q, W1, b1, W2, b2, p, seed, module)

    plain = _NetworkTail.apply(Q, *weights, None, None)
    assert torch.allclose(compiled(Q, *weights, p=0.0), plain, atol=1e-12)
    table = kernels._gap_table(0.3, torch.device("cpu")).int()
    n = D * P                                                          # one tile's values
    drops = [torch.cat([module.tile_drops(n, 5, 2 * tile + k, table) + tile * n
                        for tile in range(B * R)]) for k in (0, 1)]
    assert 0.2 < len(drops[0]) / Q.numel() < 0.4 and not torch.equal(drops[0], drops[1])
    V = compiled(Q, *weights)
    assert torch.allclose(V, _NetworkTail.apply(Q, *weights, *drops), atol=1e-12)
    assert not torch.allclose(V, compiled(Q, *weights, seed=6))
    assert torch.autograd.gradcheck(compiled, (Q, *weights))


def test_native_path_can_be_switched_off_and_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setenv("GLOM_NATIVE", "0")
    assert native.module() is None
    monkeypatch.setenv("GLOM_NATIVE", "1")
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failure", None)

    def no_python_headers(*args, **kwargs):  # how torch's loader reports a failed build
        raise RuntimeError("Error building extension 'x': [1/2] c++ -c x.cpp\nFAILED: x.o\n"
                           "x.cpp:1:10: fatal error: Python.h: No such file or directory\n"
                           "ninja: build stopped: subcommand failed.")

    monkeypatch.setattr(native, "_extension_loader", lambda: no_python_headers)
    with pytest.warns(RuntimeWarning, match="fatal error: Python.h: No such file.*pure-torch"):
        assert native.module() is None
    assert native.module() is None                              # warned once, not retried


@pytest.mark.parametrize("path,images,chunk", [("torch", 3, 1), ("torch", 3, 2), ("torch", 3, 3),
                                                ("native", 1, None), ("native", 3, None)])
def test_first_layer_backward_finds_the_forwards_dropped_values_again(monkeypatch, path, images,
                                                                      chunk):
    """The first layer with per-network dropout keeps no masks or unfolded values. `_MaskedTaps`
    keeps the dropped positions and unfolds again in its backward pass, chunk by chunk (here 3
    images: in chunks of 1, of 2 and 1, whole); the compiled one keeps nothing and draws each
    tile's positions again from the seed. Numerical gradients (float64) agree only if the same
    values are dropped; the seed decides which."""
    module = use_networks(monkeypatch, path)
    torch.manual_seed(0)
    levels = torch.randn(images, 3, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    sources = torch.tensor([0, 1, 1, 2])                               # level 1 read twice
    A = torch.randn(4, 4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def masked(levels, A, a, seed=123):
        if path == "native":
            return kernels._NativeMaskedTaps.apply(levels, sources, A, a, 0.3, seed, module)
        return kernels._MaskedTaps.apply(levels, sources, A, a, 0.3, seed, chunk)

    assert torch.autograd.gradcheck(masked, (levels, A, a))
    once = masked(levels, A, a)
    assert torch.equal(once, masked(levels, A, a))
    assert not torch.equal(once, masked(levels, A, a, seed=124))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.01])
def test_dropped_positions_drop_each_element_with_probability_p(p):
    """Sorted positions inside n, dropped at rate p in each part of the range, geometric gaps
    (1 with probability p, 2 with p(1-p)), none longer than 16 bits of uniform allow."""
    torch.manual_seed(0)
    n = 400_000
    dropped = kernels._drop_positions(n, p)
    assert dropped.dtype == torch.int64 and 0 <= dropped[0] and dropped[-1] < n
    gaps = torch.diff(dropped, prepend=torch.tensor([-1]))
    assert (gaps >= 1).all()
    assert gaps.max() <= math.floor(16 * math.log(2) / -math.log1p(-p)) + 1
    sigma = (p * (1 - p) / (n / 4)) ** 0.5
    quarter = torch.bincount(dropped // (n // 4), minlength=4) / (n / 4)
    assert ((quarter - p).abs() < 5 * sigma).all(), quarter         # the end is not short
    for k, want in ((1, p), (2, p * (1 - p))):
        seen = (gaps == k).double().mean().item()
        assert abs(seen - want) < 5 * (want * (1 - want) / len(gaps)) ** 0.5, (k, seen, want)
    # drawn a few gaps at a time (the default draw falls short once in ~1e15), they cover n
    torch.manual_seed(0)
    few = kernels._drop_positions(n, p, draw=7)
    assert few[-1] < n and abs(len(few) / n - p) < 10 * sigma
    assert (torch.bincount(few // (n // 4), minlength=4) > 0).all()


@pytest.mark.parametrize("masked", [False, True])
def test_network_tail_backward_is_the_gradient_of_its_forward(masked):
    """_NetworkTail's hand-written backward against numerical gradients (float64), and its
    forward against the plain expression with tanh and 0/1 masks made from the dropped
    positions."""
    torch.manual_seed(0)
    N, R, D, P = 2, 3, 4, 5
    Q = torch.randn(N, R, D, P, dtype=torch.float64, requires_grad=True)
    W1, W2 = (torch.randn(R, D, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b1, b2 = (torch.randn(R, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    drops = [kernels._drop_positions(Q.numel(), 0.3) if masked else None for _ in range(2)]
    inputs = (Q, W1, b1, W2, b2, *drops)
    assert torch.autograd.gradcheck(_NetworkTail.apply, inputs)
    m1, m2 = (torch.ones(Q.numel(), dtype=Q.dtype).index_fill(0, d, 0.0).view_as(Q)
              if masked else 1.0 for d in drops)
    if masked:
        assert 0 < m1.sum() < Q.numel() and not torch.equal(m1, m2)
    K = torch.tanh(W1 @ (Q * m1) / 2 + b1[..., None] / 2) + Q
    V = torch.tanh(W2 @ (K * m2) / 2 + b2[..., None] / 2) + Q + K
    assert torch.allclose(_NetworkTail.apply(*inputs), V, atol=1e-12)


def test_gap_table_is_geometric_to_16_bits():
    """Each gap length's probability under the 16-bit table is within 2**-16 of geometric(p)'s,
    they sum to 1, and P(1) is the 16-bit keep mask's drop rate."""
    p = 0.1
    table = kernels._gap_table(p, torch.device("cpu"))
    counts = torch.bincount(table)[1:].double() / 2**16                # P(gap = 1, 2, ...)
    g = torch.arange(1, len(counts) + 1, dtype=torch.float64)
    geometric = p * (1 - p) ** (g - 1)
    assert (counts - geometric).abs().max() <= 2**-16
    assert counts.sum() == 1 and counts[0] == round(p * 2**16) / 2**16
    assert len(counts) == math.floor(16 * math.log(2) / -math.log1p(-p)) + 1


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_random_fields_are_uniform_in_every_16_bit_field(p):
    """The noise's 16-bit fields fall below round(p * 2**16) - 2**15 at rate
    round(p * 2**16) / 2**16 in each of the four 16-bit fields of a 64-bit draw (a field that
    missed its sign bit would do so at rate 0 or 1 there)."""
    torch.manual_seed(0)
    fields = kernels._random_fields(torch.zeros(4 * 100_000))
    assert fields.dtype == torch.int16
    rate = round(p * 2**16) / 2**16
    per_field = (fields.view(-1, 4) < round(p * 2**16) - 2**15).double().mean(0)
    sigma = (rate * (1 - rate) / 100_000) ** 0.5
    assert ((per_field - rate).abs() < 5 * sigma).all(), per_field
    assert kernels._random_fields(torch.zeros(3, 5, 7)).shape == (3, 5, 7)   # any shape


def test_training_noise_is_uniform_over_zero_to_high():
    torch.manual_seed(0)
    high = 1e-4
    noise = kernels.uniform_like(torch.zeros(400_000), high)
    assert noise.min() >= 0 and noise.max() < high
    assert abs(noise.mean().item() - high / 2) < 0.01 * high               # sd of mean 4.6e-4 high
    assert abs(noise.var().item() - high**2 / 12) < 0.02 * high**2 / 12
    assert noise.unique().numel() > 60_000                                  # 65,536 bins, all used


def test_conv_layout_is_the_seeds_roll_and_concatenate():
    torch.manual_seed(0)
    D, H, W = 10, 6, 7
    state = torch.randn(2, H, W, D)
    linear = torch.randn(D, 9 * D)
    rolled = torch.cat([torch.roll(state, shifts=s, dims=(1, 2)) for s in SHIFTS], dim=3)
    seed_out = rolled @ linear.T                                  # (B, H, W, D)
    conv = seed_linear_to_conv(linear, D)
    x = F.pad(state.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="circular")
    conv_out = F.conv2d(x, conv).permute(0, 2, 3, 1)
    assert torch.allclose(seed_out, conv_out, atol=1e-5)
    assert torch.equal(conv_to_seed_linear(conv), linear)


def attention_model(levels: int = 3, dim: int = 4) -> Glom:
    return Glom(GlomConfig(levels=levels, dim=dim, num_classes=2, height=5, width=5, steps=1,
                           attention=True))


def test_attention_weights_sum_to_one_and_identical_neighbours_give_the_vector_back():
    model = attention_model()
    torch.manual_seed(0)
    levels = torch.randn(2, 3, 4, 5, 5)
    weights, _ = model.attention(levels)
    assert weights.shape == (2, 3, 9, 5, 5)
    assert torch.allclose(weights.sum(dim=2), torch.ones(2, 3, 5, 5), atol=1e-6)
    same = torch.randn(1, 3, 4, 1, 1).expand(2, 3, 4, 5, 5).contiguous()
    assert torch.allclose(model.consensus(same), same, atol=1e-6)
    assert not torch.allclose(model.consensus(levels), levels, atol=1e-3)


def test_agreement_at_a_higher_level_raises_an_attention_weight():
    model = attention_model()
    levels = torch.zeros(1, 3, 4, 5, 5)
    levels[:, 0, 0] = 1.0                                         # level 0 identical everywhere
    levels[:, 1, 1] = -1.0                                        # level 1: all columns disagree
    levels[:, 1, 1, 2, 2] = 1.0                                   # with the centre column ...
    levels[:, 1, 1, 2, 3] = 1.0                                   # ... but one neighbour agrees
    weights, _ = model.attention(levels)
    centre = weights[0, 0, :, 2, 2]                               # level 0 weights of (2, 2)
    right = 1 * 3 + 2                                             # unfold index of offset (0, +1)
    others = [n for n in range(9) if n not in (right, 4)]
    assert centre[right] > centre[others].max() + 0.05
    no_lambda = Glom(GlomConfig(levels=3, dim=4, num_classes=2, height=5, width=5, steps=1,
                                attention=True, attention_lambda=0.0))
    flat = no_lambda.attention(levels)[0][0, 0, :, 2, 2]          # lambda=0: only level 0 counts
    assert torch.allclose(flat, torch.full((9,), 1 / 9), atol=1e-6)


def test_consensus_preset_runs_and_keeps_the_input_level():
    cfg = GlomConfig.preset("consensus", height=8, width=8, steps=4)
    model = Glom(cfg).eval()
    images = torch.randn(2, 1, 8, 8)
    states = model(images, return_all=True)
    assert states.shape == (5, 2, 4, 10, 8, 8)
    assert torch.equal(states[-1, :, 0], images.expand(2, 10, 8, 8))
    assert torch.isfinite(states).all()


def test_average_update_is_the_mean_of_previous_state_and_messages():
    cfg = GlomConfig(levels=3, dim=4, num_classes=2, height=4, width=4, steps=1, update="average",
                     accumulate=(), dropout=0.0, out_scale=1.0)
    model = Glom(cfg).eval()
    levels = torch.randn(1, 3, 4, 4, 4)
    messages = model.network_messages(levels)
    out = model.update(levels)
    assert torch.equal(out[:, 0], levels[:, 0])
    assert torch.allclose(out[:, 1], (levels[:, 1] + messages[:, 1]) / 4, atol=1e-6)  # bu+lat+td
    assert torch.allclose(out[:, 2], (levels[:, 2] + messages[:, 2]) / 3, atol=1e-6)  # bu+lat


def test_return_all_and_predict_shapes_and_majority_vote():
    model = Glom(GlomConfig.preset("seed", height=6, width=6, steps=3)).eval()
    images = torch.randn(3, 1, 6, 6)
    states = model(images, return_all=True)
    assert states.shape == (4, 3, 4, 10, 6, 6)
    assert model.predict(images).shape == (3,)
    votes = torch.zeros(2, 6, 6, dtype=torch.long)
    votes[0, :4] = 7                                              # 24 of 36 columns say 7
    votes[1] = 3
    assert model.majority(votes).tolist() == [7, 3]


def test_column_scores_are_the_top_levels_class_channels_and_predict_votes_on_them():
    model = Glom(GlomConfig.preset("seed", height=6, width=7, steps=2)).eval()
    assert model.patch == 1                                        # one column per pixel
    images = torch.randn(3, 1, 6, 7)
    torch.manual_seed(0)
    scores = model.column_scores(images)
    torch.manual_seed(0)
    levels = model(images)
    assert scores.shape == (3, 10, 6, 7)
    assert torch.equal(scores, levels[:, -1, :10])
    torch.manual_seed(0)
    assert torch.equal(model.predict(images), model.majority(model.votes(levels)))


def test_a_checkpoint_runs_on_a_canvas_of_any_size(tmp_path):
    """The weights do not depend on the image size: a 28x28 model, loaded for a 28x56 canvas,
    scores every column of it, and on a canvas holding the same image twice side by side each
    half's columns score as the image's own (the torus wraps each half onto the other at the
    seam, so the two agree everywhere)."""
    torch.manual_seed(0)
    model = Glom(GlomConfig.preset("seed", steps=3))
    save_checkpoint(model, tmp_path / "m.pt")
    wide = load_checkpoint(tmp_path / "m.pt", height=28, width=56, device="cpu")
    assert (wide.cfg.height, wide.cfg.width) == (28, 56) and not wide.training
    assert all(torch.equal(p, q) for p, q in zip(wide.parameters(), model.parameters()))
    image = torch.randn(2, 1, 28, 28)
    torch.manual_seed(1)
    init = model.eval().initial_state(image)
    scores = wide.column_scores(torch.cat([image, image], -1))
    assert scores.shape == (2, 10, 28, 56)
    with torch.no_grad():
        one = model.rollout(init, 3)[:, -1, :10]
        two = wide.rollout(torch.cat([init, init], -1), 3)[:, -1, :10]
    assert torch.allclose(two, torch.cat([one, one], -1), atol=1e-6)
    assert load_checkpoint(tmp_path / "m.pt", device="cpu").cfg.width == 28    # as saved
    with pytest.raises(ValueError, match="height must be a positive integer"):
        load_checkpoint(tmp_path / "m.pt", height=0, device="cpu")


def test_rollout_is_deterministic_on_cpu_under_a_seed():
    """Training mode (dropout and noise drawn): the same seed gives the same rollout and the
    same gradients, bit for bit (the compiled networks, where they are built, included)."""
    model = Glom(GlomConfig.preset("seed", height=6, width=6, steps=4)).train()
    images = torch.randn(3, 1, 6, 6)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        model.zero_grad()
        state = model(images)
        state[:, -1].square().mean().backward()
        runs.append((state.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = runs
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(1, 28, 28), "shape"),
    (torch.zeros(1, 3, 28, 28), "shape"),
    (torch.zeros(1, 1, 27, 28), "image size"),
    (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "floating"),
    (torch.full((1, 1, 28, 28), float("nan")), "NaN"),
    ([[0.0]], "torch.Tensor"),
])
def test_bad_images_get_a_clear_error(bad, match):
    model = Glom(GlomConfig.preset("seed", steps=1))
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_config_presets_and_errors():
    seed = GlomConfig.preset("seed")
    assert (seed.levels, seed.dim, seed.steps, seed.attention) == (4, 10, 30, False)
    assert len(seed.routes()) == 8
    with pytest.raises(ValueError, match="consensus"):
        GlomConfig.preset("nope")
    with pytest.raises(ValueError, match="update must be one of"):
        GlomConfig(update="mean")
    with pytest.raises(ValueError, match="kernel must be odd"):
        GlomConfig(kernel=4)
    with pytest.raises(ValueError, match="at least one of bottom_up"):
        GlomConfig(bottom_up=False, lateral=False, top_down=False, attention=True)
    with pytest.raises(ValueError, match="unknown field"):
        GlomConfig.from_dict({"levles": 3})
    assert GlomConfig.from_dict(seed.to_dict()) == seed
    # a field configs once recorded: the value every model now has loads as it is
    assert GlomConfig.from_dict({**seed.to_dict(), "input_dropout": "per_network"}) == seed
    with pytest.warns(RuntimeWarning, match="input_dropout is no longer an option"):
        GlomConfig.from_dict({**seed.to_dict(), "input_dropout": "shared"})


def test_attention_equals_its_formula_written_column_by_column():
    """softmax_y(sum_{m>=l} lambda**(m-l) <e_m,x, e_m,y> / sqrt(D)) over the torus, plainly."""
    model = attention_model()
    torch.manual_seed(1)
    levels = torch.randn(1, 3, 4, 5, 5)
    weights, _ = model.attention(levels)
    consensus = model.consensus(levels)
    lam, D = model.cfg.attention_lambda, 4
    for l in range(3):
        for y in range(5):
            for x in range(5):
                offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
                cols = [((y + dy) % 5, (x + dx) % 5) for dy, dx in offsets]
                scores = torch.stack([
                    sum(lam ** (m - l) * torch.dot(levels[0, m, :, y, x], levels[0, m, :, v, u])
                        for m in range(l, 3)) / D ** 0.5 for v, u in cols])
                w = scores.softmax(0)
                assert torch.allclose(weights[0, l, :, y, x], w, atol=1e-6)
                mean = sum(w[n] * levels[0, l, :, v, u] for n, (v, u) in enumerate(cols))
                assert torch.allclose(consensus[0, l, :, y, x], mean, atol=1e-6)


# compiling takes 15-30 s per preset on a 2-core CPU (and g++, which `make setup` installs): the
# consensus one only in `make test-all`
@pytest.mark.parametrize("preset", ["seed", pytest.param("consensus", marks=pytest.mark.slow)])
def test_compiled_steps_give_the_eager_rollout_and_gradients(preset):
    """`compile_steps` changes how a step runs, not what it computes: rollout and gradients
    equal the eager model's (dropout off: the compiled graph draws its own random numbers)."""
    cfg = GlomConfig.preset(preset, height=6, width=5, steps=4, dropout=0.0, noise=0.0)
    torch.manual_seed(0)
    eager = Glom(cfg)
    compiled = Glom(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_steps()
    images = torch.randn(3, 1, 6, 5)
    results = []
    for model in (eager, compiled):
        torch.manual_seed(1)                                      # the same initial state
        levels = model(images)
        levels[:, -1].square().mean().backward()
        results.append((levels.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    assert compiled._step is not compiled.update                  # it did run compiled
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)


def test_compiling_on_a_torch_older_than_checked_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with pytest.raises(RuntimeError, match="needs torch 2.14 or newer.*found 2.11.0"):
        Glom(GlomConfig.preset("seed", height=4, width=4, steps=1)).compile_steps()


def test_compiling_without_a_cpp_compiler_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.14.1")            # past the version check
    monkeypatch.setattr("glom_mnist.kernels.shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        Glom(GlomConfig.preset("seed", height=4, width=4)).compile_steps()


@pytest.mark.parametrize("preset", ["seed", "consensus"])
def test_inference_in_chunks_gives_the_whole_batchs_result(preset, monkeypatch):
    """Eval mode without gradients on a CPU rolls the images out a chunk at a time; the result
    (final state and every step) is the whole batch's, rolled out at once."""
    monkeypatch.setattr("glom_mnist.kernels.INFERENCE_CHUNK_VALUES", 3 * 4 * 10 * 6 * 5)  # 3 images
    torch.manual_seed(0)
    model = Glom(GlomConfig.preset(preset, height=6, width=5, steps=5)).eval()
    images = torch.randn(8, 1, 6, 5)
    calls = []
    rollout = model.rollout
    monkeypatch.setattr(model, "rollout", lambda levels, *a: calls.append(len(levels))
                        or rollout(levels, *a))
    results = {}
    for chunked in (False, True):
        with torch.set_grad_enabled(not chunked):           # with gradients: all at once
            for return_all in (False, True):
                torch.manual_seed(1)                        # the same initial state
                results[chunked, return_all] = model(images, return_all=return_all).detach()
    assert calls == [8, 8, 3, 3, 2, 3, 3, 2]
    for return_all in (False, True):
        torch.testing.assert_close(results[True, return_all], results[False, return_all],
                                   atol=1e-6, rtol=1e-6)
    assert results[True, True].shape == (6, 8, 4, 10, 6, 5)


def test_training_under_bfloat16_autocast_gives_float32_gradients_close_to_float32s():
    """Autocast (as `train --amp` uses on a GPU; here the CPU's) runs the networks in bfloat16
    while the weights and their gradients stay float32; the gradients point where float32's do
    (the same dropout masks in both runs: the same seed)."""
    torch.manual_seed(0)
    cfg = GlomConfig.preset("seed", height=6, width=6, steps=3, dropout=0.2, noise=0.0)
    model = Glom(cfg).train()
    images = torch.randn(2, 1, 6, 6)
    init = model.initial_state(images)
    target = torch.rand(2, 10, 6, 6)
    grads = {}
    for amp in (False, True):
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            top = model.rollout(init, cfg.steps)[:, -1].float()
        F.mse_loss(top, target).backward()
        grads[amp] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads[True].dtype == torch.float32 and torch.isfinite(grads[True]).all()
    assert F.cosine_similarity(grads[True], grads[False], dim=0) > 0.99
