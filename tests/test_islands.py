"""Island and agreement metrics on hand-made states whose answers are known."""
from __future__ import annotations

import math

import pytest
import torch

from glom_mnist import Glom, GlomConfig
from glom_mnist.config import model_config
from glom_mnist.islands import (agreement, digit_columns, digit_mask, format_table, island_stats,
                                islands, majority_vote, neighbour_cosine, neighbour_cosine_map,
                                part_whole_table, rollout_statistics, vote_share)
from glom_mnist.model import column_votes
from glom_mnist.patch_glom import PatchGlom

B, L, D, H, W = 2, 3, 4, 6, 8


def constant_state(vector: torch.Tensor) -> torch.Tensor:
    """Every column and level holds `vector`: `(B, L, D, H, W)`."""
    return vector.view(1, 1, D, 1, 1).expand(B, L, D, H, W).clone()


def checkerboard_state() -> torch.Tensor:
    """Columns alternate between two orthogonal vectors, like the squares of a chess board."""
    e0, e1 = torch.eye(D)[0], torch.eye(D)[1]
    black = (torch.arange(H)[:, None] + torch.arange(W)[None, :]) % 2 == 1  # (H, W)
    return torch.where(black, e1.view(D, 1, 1), e0.view(D, 1, 1)).expand(B, L, D, H, W).clone()


def halves_state() -> torch.Tensor:
    """Left half one vector, right half an orthogonal one."""
    state = constant_state(torch.eye(D)[0])
    state[..., W // 2:] = torch.eye(D)[1].view(D, 1, 1)
    return state


def test_one_island_when_all_columns_agree():
    state = constant_state(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    found = islands(state)
    assert found.labels.shape == (B, L, H, W)
    assert (found.labels == 0).all()
    assert (found.count == 1).all() and (found.mean_size == H * W).all()
    assert (found.largest == H * W).all() and (found.members == H * W).all()
    assert torch.allclose(neighbour_cosine(state), torch.ones(L))
    assert torch.allclose(neighbour_cosine_map(state), torch.ones(B, L, H, W))


def test_checkerboard_of_orthogonal_vectors_is_all_single_columns():
    state = checkerboard_state()
    found = islands(state, tau=0.9)
    assert (found.count == H * W).all() and (found.mean_size == 1).all()
    assert (found.largest == 1).all()
    # row-major island ids: every column its own id
    assert torch.equal(found.labels[0, 0], torch.arange(H * W).view(H, W))
    # the 4 edge neighbours are orthogonal (cosine 0), the 4 diagonal ones equal (cosine 1)
    assert torch.allclose(neighbour_cosine(state), torch.full((L,), 0.5))


def test_neighbour_cosine_map_equals_the_8_rolled_neighbours():
    state = torch.randn(2, B, L, D, H, W, dtype=torch.float64)
    unit = torch.nn.functional.normalize(state, dim=-3)
    expected = sum((unit * unit.roll((dy, dx), dims=(-2, -1))).sum(-3)
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)) / 8
    assert torch.allclose(neighbour_cosine_map(state), expected)


def test_two_halves_are_two_islands_without_wrap_around():
    found = islands(halves_state())
    assert (found.count == 2).all() and (found.mean_size == H * W / 2).all()
    assert (found.labels[..., : W // 2] == 0).all() and (found.labels[..., W // 2:] == 1).all()


def test_the_border_ring_is_one_island():
    """The ring of border columns is one island (a long path: many propagation rounds), and the
    columns inside it another."""
    state = constant_state(torch.eye(D)[1])
    state[..., 1:-1, 1:-1] = torch.eye(D)[0].view(D, 1, 1)
    found = islands(state)
    assert (found.count == 2).all()
    ring = torch.ones(H, W, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    assert (found.labels[..., ring] == 0).all() and (found.labels[..., ~ring] == 1).all()


def test_a_snake_is_one_island():
    """A path through every other row, back and forth: the longest island the grid holds."""
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[:, ::2] = True
    for row in range(1, H, 2):
        mask[:, row, -1 if row % 4 == 1 else 0] = True
    found = islands(constant_state(torch.ones(D)), mask=mask)
    assert (found.count == 1).all() and (found.largest == mask[0].sum()).all()


def flood_fill_labels(levels: torch.Tensor, tau: float, mask: torch.Tensor) -> torch.Tensor:
    """Reference islands of one level `(D, H, W)`: breadth-first search, ids in row-major order."""
    unit = torch.nn.functional.normalize(levels, dim=0)
    labels = torch.full((H, W), -1)
    next_id = 0
    for start in [(y, x) for y in range(H) for x in range(W)]:
        if not mask[start] or labels[start] >= 0:
            continue
        labels[start], queue = next_id, [start]
        while queue:
            y, x = queue.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if (0 <= ny < H and 0 <= nx < W and mask[ny, nx] and labels[ny, nx] < 0
                        and (unit[:, y, x] @ unit[:, ny, nx]) >= tau):
                    labels[ny, nx] = next_id
                    queue.append((ny, nx))
        next_id += 1
    return labels


def test_islands_equal_a_flood_fill_on_random_states():
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(3, D, generator=g)                          # few directions: islands
    state = directions[torch.randint(0, 3, (B, L, H, W), generator=g)].movedim(-1, 2)
    state = state + 0.05 * torch.randn(state.shape, generator=g)
    mask = torch.rand(B, H, W, generator=g) > 0.2
    found = islands(state, tau=0.9, mask=mask)
    for b in range(B):
        for level in range(L):
            expected = flood_fill_labels(state[b, level], 0.9, mask[b])
            assert torch.equal(found.labels[b, level], expected), (b, level)
            assert found.count[b, level] == expected.max() + 1


def test_mask_restricts_islands_to_the_digit():
    state = halves_state()
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True        # a 2x2 square in the left half
    mask[:, 4, W - 2] = True        # one column in the right half
    found = islands(state, mask=mask)
    assert (found.count == 2).all()
    assert torch.allclose(found.mean_size, torch.full((B, L), 2.5))
    assert (found.largest == 4).all() and (found.members == 5).all()
    assert (found.labels[..., ~mask[0]] == -1).all()
    assert (found.labels[..., 1:3, 1:3] == 0).all() and (found.labels[..., 4, W - 2] == 1).all()
    empty = islands(state, mask=torch.zeros(B, H, W, dtype=torch.bool))
    assert (empty.count == 0).all() and empty.mean_size.isnan().all()


def test_island_stats_over_steps_and_a_single_state():
    states = torch.stack([checkerboard_state(), constant_state(torch.ones(D))])  # (T+1=2, ...)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[:, :2, :2] = True
    stats = island_stats(states, tau=0.9, digit_mask=mask)
    assert stats["count"].shape == (2, L)
    assert torch.allclose(stats["count"], torch.tensor([[H * W], [1.0]]).expand(2, L))
    assert torch.allclose(stats["mean_size"], torch.tensor([[1.0], [H * W]]).expand(2, L))
    assert torch.allclose(stats["digit_count"], torch.tensor([[4.0], [1.0]]).expand(2, L))
    assert torch.allclose(stats["digit_mean_size"], torch.tensor([[1.0], [4.0]]).expand(2, L))
    assert (stats["members"] == H * W).all() and (stats["digit_members"] == 4).all()
    single = island_stats(states[1])
    assert set(single) == {"count", "mean_size", "largest", "members"}
    assert single["count"].shape == (L,)
    assert torch.allclose(neighbour_cosine(states), torch.tensor([[0.5], [1.0]]).expand(2, L))


def test_digit_mask_is_half_way_between_darkest_and_brightest():
    raw = torch.tensor([[[0, 100, 128], [129, 255, 0]]], dtype=torch.uint8)   # (1, 2, 3)
    expected = torch.tensor([[[False, False, True], [True, True, False]]])
    assert torch.equal(digit_mask(raw), expected)
    normalised = ((raw.float() / 255 - 0.1307) / 0.3081).unsqueeze(1)           # (1, 1, 2, 3)
    assert torch.equal(digit_mask(normalised), expected)


def test_digit_mask_at_a_patch_grid_marks_the_columns_with_any_ink():
    raw = torch.zeros(2, 8, 12, dtype=torch.uint8)                   # 2 x 3 columns of 4 x 4
    raw[:, 0, 0] = 255                                               # one bright pixel: column (0, 0)
    raw[0, 7, 11] = 200                                              # a corner pixel of (1, 2)
    raw[1, 5, 6] = 100                                               # too dark: not ink
    mask = digit_mask(raw, patch=4)
    assert mask.tolist() == [[[True, False, False], [False, False, True]],
                             [[True, False, False], [False, False, False]]]
    assert torch.equal(mask, digit_columns(~digit_mask(raw), 4))     # the scenes' rule
    assert torch.equal(digit_mask(raw, patch=1), digit_mask(raw))


def test_agreement_per_step_on_constructed_votes():
    labels = torch.tensor([3, 7])
    votes = torch.empty(3, 2, H, W, dtype=torch.long)                   # (T+1, B, H, W)
    votes[0, 0], votes[0, 1] = 0, 7               # step 0: image 0 wrong, image 1 right
    votes[1, 0] = 3
    votes[1, 0, 0, :3] = 5                        # 3 dissenters, majority still right
    votes[1, 1] = 1
    votes[1, 1, :, : W // 2 + 1] = 7              # just over half vote 7
    votes[2] = labels.view(2, 1, 1)               # all agree, all right
    metrics = agreement(votes, labels, num_classes=10)
    n = H * W
    half = H * (W // 2 + 1)
    assert torch.allclose(metrics["per_column_accuracy"],
                          torch.tensor([0.5, ((n - 3) + half) / (2 * n), 1.0]))
    assert torch.allclose(metrics["all_columns_agree"], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.allclose(metrics["majority_vote_accuracy"], torch.tensor([0.5, 1.0, 1.0]))
    share = vote_share(votes[1], 10)
    assert torch.allclose(share, torch.tensor([(n - 3) / n, half / n]))
    single = agreement(votes[2], labels, num_classes=10)
    assert single["all_columns_agree"].item() == 1.0
    with pytest.raises(ValueError, match="votes must be"):
        agreement(votes[0, 0], labels, num_classes=10)


def test_votes_read_the_top_levels_class_channels_and_ties_go_to_the_lowest_class():
    levels = torch.zeros(1, L, D + 8, H, W)
    levels[0, -1, 3] = 1.0                         # class 3 everywhere ...
    levels[0, -1, 11] = 5.0                        # ... a larger value outside the class channels
    levels[0, 0, 7] = 9.0                          # and on another level: both ignored
    assert column_votes(levels, 10).unique().tolist() == [3]
    tied = torch.zeros(2, H, W, dtype=torch.long)
    tied[:, :, : W // 2] = 4                       # half vote 4, half 0: the tie goes to 0
    tied[1, 0, -1] = 4                             # one more vote for 4 breaks it
    assert majority_vote(tied, 10).tolist() == [0, 4]


def test_rollout_statistics_equal_the_batch_functions():
    torch.manual_seed(0)
    cfg = GlomConfig(height=H, width=W, steps=3, levels=L, dim=D + 8)
    model = Glom(cfg)
    images, labels = torch.randn(5, 1, H, W), torch.randint(0, 10, (5,))
    masks = digit_mask(images)
    torch.manual_seed(1)
    stats = rollout_statistics(model, images, labels, masks=masks, batch_size=2, tau=0.5)
    assert model.training                          # restored
    torch.manual_seed(1)
    with torch.no_grad():
        model.eval()
        states = torch.cat([model(images[i:i + 2], return_all=True) for i in range(0, 5, 2)], 1)
    assert torch.allclose(stats["neighbour_cosine"], neighbour_cosine(states))
    for k, v in agreement(model.votes(states), labels, cfg.num_classes).items():
        assert torch.allclose(stats[k], v), k
    for k, v in island_stats(states, 0.5, masks).items():
        assert torch.allclose(stats[k], v, equal_nan=True), k
    assert torch.equal(stats["votes"], model.votes(states[-1]))
    assert torch.equal(stats["majority"], model.majority(stats["votes"]))
    assert stats["vote_share"].shape == (5,)


def test_rollout_statistics_of_a_patch_model_are_on_its_column_grid():
    """A column per 4 x 4 patch (a 4 x 5 grid on 16 x 20 images), voting by its readout."""
    torch.manual_seed(0)
    model = PatchGlom(model_config("patch_small", steps=2, loss_steps=2))
    raw = (torch.rand(5, 16, 20) * 255).to(torch.uint8)
    raw[:, :, :8] = 0                                                # ink on the right only
    images, labels = (raw.float() / 255).unsqueeze(1), torch.randint(0, 10, (5,))
    masks = digit_mask(raw, patch=model.patch)                       # (5, 4, 5)
    stats = rollout_statistics(model, images, labels, masks=masks, batch_size=2, tau=0.5)
    with torch.no_grad():
        states = model.eval()(images, return_all=True)               # (T+1, 5, L, D, 4, 5)
    votes = model.votes(states)                                      # (T+1, 5, 4, 5)
    assert not torch.equal(votes, column_votes(states, 10))          # not the top level's channels
    assert torch.equal(stats["votes"], votes[-1])
    assert torch.equal(stats["majority"], model.predict(images))
    for k, v in agreement(votes, labels, 10).items():
        assert torch.allclose(stats[k], v), k
    for k, v in island_stats(states, 0.5, masks).items():
        assert torch.allclose(stats[k], v, equal_nan=True), k
    assert (stats["members"] == 20).all()                            # 4 x 5 columns, not 320
    assert torch.allclose(stats["digit_members"], masks.sum((1, 2)).float().mean().expand(3, 3))
    row = part_whole_table({"patch": stats})[0]
    assert row["columns"] == "all" and row["per image"] == 20
    with pytest.raises(ValueError, match=r"digit_mask\(raw, patch=4\)"):
        rollout_statistics(model, images, labels, masks=digit_mask(raw))   # pixels, not columns


def test_part_whole_table_says_whether_islands_grow():
    sizes = torch.tensor([[9.0, 1, 2, 4]])                              # (T+1=1, L=4)
    growing = {"mean_size": sizes, "digit_mean_size": sizes * 0.5,
               "members": torch.full((1, 4), 49.0), "digit_members": torch.full((1, 4), 12.34)}
    shrinking = {"mean_size": torch.tensor([[9.0, 4, 2, 1]]), "members": torch.full((1, 4), 784.0)}
    rows = part_whole_table({"a": growing, "b": shrinking})
    assert [(r["model"], r["columns"], r["per image"], r["grows"]) for r in rows] == [
        ("a", "all", 49, True), ("a", "digit", 12.3, True), ("b", "all", 784, False)]
    assert rows[0]["level 1"] == 1 and rows[0]["level 3"] == 4 and rows[0]["top / level 1"] == 4
    assert math.isclose(rows[2]["top / level 1"], 0.25)
    text = format_table(rows)
    assert text.splitlines()[0].split()[:2] == ["model", "columns"] and len(text.splitlines()) == 4


def test_states_of_the_wrong_rank_are_refused():
    with pytest.raises(ValueError, match="states must be"):
        neighbour_cosine(torch.zeros(L, D, H, W))
