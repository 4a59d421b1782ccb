"""The patch-column GLOM (glom_mnist/patch_glom.py): its update rule, piece by piece."""
import math

import pytest
import torch
import torch.nn.functional as F

from glom_mnist.config import PatchGlomConfig, model_config
from glom_mnist.patch_glom import PatchGlom, positions

TINY = dict(dim=8, hidden=2, levels=4, steps=4, loss_steps=2, pos_freqs=2)


def tiny(**changes) -> PatchGlom:
    torch.manual_seed(0)
    return PatchGlom(PatchGlomConfig(**{**TINY, **changes})).eval()


def images(B=3, H=28, W=28) -> torch.Tensor:
    return torch.randn(B, 1, H, W, generator=torch.Generator().manual_seed(1))


def test_shapes_and_the_vote():
    model = tiny()
    x = images()
    assert model(x).shape == (3, 4, 8, 7, 7)                         # (B, L, D, h, w)
    assert model(x, return_all=True).shape == (5, 3, 4, 8, 7, 7)      # T+1 states
    scores = model.column_scores(x)
    assert scores.shape == (3, 10, 7, 7)
    votes = scores.argmax(1)
    expected = torch.stack([torch.bincount(v.flatten(), minlength=10).argmax() for v in votes])
    assert torch.equal(model.predict(x), expected)


def test_any_canvas_with_the_same_weights():
    model = tiny()
    wide = images(2, 28, 56)
    assert model.column_scores(wide).shape == (2, 10, 7, 14)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(images(1, 30, 28))


def test_positions_extend_to_a_larger_canvas():
    small, large = positions(7, 7, 4, 3, torch.device("cpu")), positions(7, 14, 4, 3, torch.device("cpu"))
    assert small.shape == (7, 7, 12)
    assert torch.equal(large[:, :7], small)


def naive_consensus(e: torch.Tensor, k: int) -> torch.Tensor:
    """The consensus written out column by column: (G, B, h, w, D)."""
    G, B, h, w, D = e.shape
    r = k // 2
    out = torch.zeros_like(e)
    for i in range(h):
        for j in range(w):
            nbrs = [(y, x) for y in range(i - r, i + r + 1) for x in range(j - r, j + r + 1)
                    if 0 <= y < h and 0 <= x < w and (y, x) != (i, j)]
            values = torch.stack([e[:, :, y, x] for y, x in nbrs], 2)             # (G, B, N, D)
            sim = (values * e[:, :, i, j, None]).sum(-1) / math.sqrt(D)          # (G, B, N)
            out[:, :, i, j] = (sim.softmax(-1)[..., None] * values).sum(2)
    return out


@pytest.mark.parametrize("kernel", [3, 5])
def test_consensus_is_the_attention_weighted_average_of_the_neighbours(kernel):
    model = tiny(kernel=kernel)
    h, w = 4, 5
    e = torch.randn(3, 2, h, w, 8)                       # levels 1..L-1, batch 2
    fast = model.consensus(e.flatten(2, 3), model.context(h, w, e.device)["near"])
    assert torch.allclose(fast.view(e.shape), naive_consensus(e, kernel), atol=1e-5)


def test_the_top_level_hears_its_own_wider_window():
    model = tiny(kernel=3, top_kernel=5)                # levels 1 and 2: 3x3; the top: 5x5
    h, w = 5, 6
    e = torch.randn(3, 2, h, w, 8)
    found = model.consensus(e.flatten(2, 3), model.context(h, w, e.device)["near"]).view(e.shape)
    assert torch.allclose(found[:2], naive_consensus(e[:2], 3), atol=1e-5)
    assert torch.allclose(found[2:], naive_consensus(e[2:], 5), atol=1e-5)
    assert not torch.allclose(found[2:], naive_consensus(e[2:], 3), atol=1e-3)
    for wrong in (4, -1, True):
        with pytest.raises(ValueError, match="top_kernel"):
            tiny(top_kernel=wrong)


def test_no_wrap_around_at_the_edges():
    model = tiny(top_down=False, bottom_up=False)   # consensus only: information moves 1 column a step
    x = images(1)
    changed = x.clone()
    changed[..., :, :4] += 3.0                      # the left column of patches only
    a, b = model(x, steps=1), model(changed, steps=1)
    assert not torch.allclose(a[..., :, 0], b[..., :, 0])
    assert torch.equal(a[:, 1:, :, :, -1], b[:, 1:, :, :, -1])     # the right edge did not hear it


def test_the_input_level_is_held():
    model = tiny()
    states = model(images(), return_all=True)
    assert torch.equal(states[0][:, 0], states[-1][:, 0])


def test_each_level_becomes_the_mean_of_its_contributions():
    model = tiny()
    x = images(2)
    s0 = model.initial_state(x)                                         # (L, B, n, D)
    ctx = model.context(7, 7, x.device)
    bu = model.bottom_up(s0[:-1])
    td = model.top_down(s0[2:], ctx["where"])
    cons = model.consensus(s0[1:], ctx["near"])
    mid = (s0[1:-1] + bu[:-1] + td + cons[:-1]) / 4                     # levels 1..L-2
    top = (s0[-1:] + bu[-1:] + cons[-1:]) / 3                           # the top hears no top-down
    expected = torch.cat([s0[:1], F.layer_norm(torch.cat([mid, top]), (8,))])
    assert torch.allclose(model.step(s0, ctx), expected, atol=1e-6)


def test_switches_remove_their_contribution():
    model = tiny(bottom_up=False, top_down=False, consensus=False)
    x = images(1)
    states = model(x, return_all=True)
    assert torch.allclose(states[1], states[-1])                        # nothing moves the state
    assert tiny(positional=False).where is None and tiny().where is not None


def test_loss_averages_the_columns_over_the_last_steps():
    model = tiny()
    x, y = images(2), torch.tensor([3, 7])
    loss, right = model.loss(x, y)
    states = model(x, return_all=True)[-2:]                             # loss_steps = 2
    logits = model.scores(states)                                       # (S, B, C, h, w)
    manual = torch.stack([F.cross_entropy(l, y[:, None, None].expand(-1, 7, 7)) for l in logits]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    assert torch.equal(right, model.predict(x) == y)


def test_the_loss_takes_each_columns_own_target():
    model = tiny()
    x = images(2, 28, 56)                                               # 7 x 14 columns
    votes = model.votes(model(x))                                       # (B, h, w)
    targets = votes.clone()                                             # every column right
    targets[0] = (votes[0] + 1) % 10                                    # scene 0: all wrong
    loss, right = model.loss(x, targets)
    logits = model.scores(model(x, return_all=True)[-2:])               # (S, B, C, h, w)
    manual = torch.stack([F.cross_entropy(l, targets) for l in logits]).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    assert right.tolist() == [False, True]
    y = torch.tensor([3, 7])                                            # a label is every column's
    assert torch.equal(model.loss(x, y)[0], model.loss(x, y[:, None, None].expand(2, 7, 14))[0])
    with pytest.raises(ValueError, match="per-column classes"):
        model.loss(x, targets[:, :, :7])


def test_the_loss_adds_the_islands_with_every_option_it_is_given():
    from glom_mnist.patch_glom import island_loss
    model = tiny()
    x = images(2, 28, 56)
    targets = torch.zeros(2, 7, 14, dtype=torch.long)
    targets[:, :, 7:] = 5                                               # two objects a scene
    options = dict(apart_everywhere=True, boundary=1.0, hold=2.0)
    plain, _ = model.loss(x, targets)
    more, _ = model.loss(x, targets, island_weight=3.0, **options)
    states = model(x, return_all=True)[-2:]
    assert torch.allclose(more - plain, 3.0 * island_loss(states, targets, **options), atol=1e-5)


def test_an_image_is_right_when_every_targets_columns_vote_it():
    model = tiny()
    x = images(1, 28, 56)
    votes = model.votes(model(x))[0]                                    # (h, w)
    targets = torch.where(torch.arange(14) < 7, 2, 9).expand(7, 14).clone()
    left, right = votes[:, :7].flatten(), votes[:, 7:].flatten()
    expected = (torch.bincount(left, minlength=10).argmax() == 2
                and torch.bincount(right, minlength=10).argmax() == 9)
    assert model.loss(x, targets[None])[1].item() == expected
    targets[:, :7] = torch.bincount(left, minlength=10).argmax()        # the left half right
    targets[:, 7:] = torch.bincount(right, minlength=10).argmax()       # and the right half
    assert model.loss(x, targets[None])[1].item()
    absent = [c for c in range(10) if c not in votes[0, 7:].tolist()][0]
    targets[0, 7:] = absent                                             # a class none of them votes
    assert not model.loss(x, targets[None])[1].item()


def test_small_preset_is_under_25k_parameters():
    small = PatchGlom(model_config("patch_small"))
    assert sum(p.numel() for p in small.parameters()) <= 25_000
    assert sum(p.numel() for p in PatchGlom(model_config("patch")).parameters()) > 25_000


def test_it_learns_a_tiny_batch():
    torch.manual_seed(0)
    model = PatchGlom(PatchGlomConfig(**TINY)).train()
    x, y = images(16), torch.arange(16) % 4
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        loss, _ = model.loss(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert (model.predict(x) == y).float().mean() >= 0.8


def test_config_refuses_what_cannot_be_built():
    for bad in (dict(stem=5), dict(kernel=2), dict(height=30), dict(loss_steps=9), dict(dim=0)):
        with pytest.raises(ValueError, match="PatchGlomConfig"):
            PatchGlomConfig(**bad)
