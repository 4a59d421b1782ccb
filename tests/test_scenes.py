"""Scenes of several digits and the measures of whether islands are objects, on hand-made cases
whose answers are known, on toy digits (solid rectangles) and on MNIST's test split."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from glom_mnist import Glom, GlomConfig, scenes
from glom_mnist.data import normalise
from glom_mnist.islands import adjusted_rand_index, island_containment, islands, object_accuracy
from glom_mnist.scenes import (INK, KINDS, column_objects, column_targets, digit_columns,
                               evaluate_scenes, nearest_object, scene_batch)

DATA = Path(__file__).resolve().parent.parent / "data"
needs_mnist = pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(),
                                 reason="MNIST not prepared (`make data`; `make test` does it first)")


@pytest.fixture(scope="module")
def mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    from glom_mnist.data import load_split
    return load_split("mnist", DATA, train=False)


def toy_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Ten 'digits': class c a solid rectangle of its own size with a faint 1-pixel rim."""
    images = torch.zeros(10, 28, 28, dtype=torch.uint8)
    for c in range(10):
        h, w = 6 + c, 14 - c // 2
        top, left = (28 - h) // 2, (28 - w) // 2
        images[c, top - 1:top + h + 1, left - 1:left + w + 1] = 60       # faint: not ink
        images[c, top:top + h, left:left + w] = 255
    return images, torch.arange(10)


def brute_nearest(owner: torch.Tensor) -> torch.Tensor:
    """Nearest ink's object by comparing every pixel with every ink pixel (ties: lower object)."""
    N, H, W = owner.shape
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    out = torch.empty(N, H, W, dtype=torch.long)
    for i in range(N):
        ink = owner[i] >= 0
        d2 = (y.reshape(-1, 1) - y[ink]) ** 2 + (x.reshape(-1, 1) - x[ink]) ** 2  # (H*W, P)
        out[i] = owner[i][ink][(d2 * 1000 + owner[i][ink]).argmin(1)].view(H, W)
    return out


# ---- composing scenes ---------------------------------------------------------------------------

def test_nearest_object_on_hand_made_ink():
    owner = torch.tensor([[[-1, -1, 1],
                           [0, -1, -1],
                           [-1, -1, -1]]])
    assert nearest_object(owner).tolist() == [[[0, 1, 1], [0, 0, 1], [0, 0, 1]]]
    # equally near: the lower object, along a row and along a column, whichever side it is on
    assert nearest_object(torch.tensor([[[1, -1, -1, -1, 0]]])).tolist() == [[[1, 1, 0, 0, 0]]]
    assert nearest_object(torch.tensor([[[1], [-1], [0]]])).tolist() == [[[1], [0], [0]]]
    assert nearest_object(torch.tensor([[[0], [-1], [1]]])).tolist() == [[[0], [0], [1]]]


def test_nearest_object_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    owner = torch.randint(0, 4, (6, 11, 17), generator=g)
    owner = torch.where(torch.rand(6, 11, 17, generator=g) < 0.04, owner, -1)
    owner[:, 5, 8] = 3                                                   # every image has ink
    assert torch.equal(nearest_object(owner, chunk_values=500), brute_nearest(owner))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_toy_scenes_are_composed_as_documented(kind):
    images, labels = toy_digits()
    s = scene_batch(images, labels, 12, torch.Generator().manual_seed(1), kind)
    N, K = len(s), s.labels.shape[1]
    assert s.images.shape == (N, 1, *KINDS[kind]) and s.objects.shape == (N, *KINDS[kind])
    assert torch.equal(s.images, normalise(s.raw, "mnist"))
    assert torch.equal(s.background, s.raw < INK)
    assert s.background[s.raw == 60].all() and not s.background[s.raw == 255].any()  # the rims
    for i in range(N):
        present = [k for k in range(K) if s.labels[i, k] >= 0]
        assert len(present) in ((2,) if kind == "pair" else (2, 3))
        assert len({int(s.labels[i, k]) for k in present}) == len(present)  # distinct classes
        outside = torch.ones_like(s.background[i])
        for k in present:
            top, left, bottom, right = s.boxes[i, k].tolist()
            outside[top:bottom, left:right] = False
            piece = s.raw[i, top:bottom, left:right]
            digit = images[s.labels[i, k]]
            if kind == "random":                                         # the tight box
                rows, cols = (digit > 0).any(1).nonzero(), (digit > 0).any(0).nonzero()
                digit = digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert torch.equal(piece, digit)
            ink = piece >= INK
            assert (s.objects[i, top:bottom, left:right][ink] == k).all()
        assert (s.raw[i][outside] == 0).all()
        assert set(s.objects[i].unique().tolist()) == set(present)  # every pixel: a present object
        owner = torch.where(s.background[i], -1, s.objects[i])[None]
        assert torch.equal(s.objects[i:i + 1], brute_nearest(owner))


def test_random_scenes_keep_their_digits_apart():
    images, labels = toy_digits()
    closest = {}
    for gap in (0, 6):
        s = scene_batch(images, labels, 100, torch.Generator().manual_seed(2), "random", gap=gap)
        closest[gap] = 56
        for boxes, classes in zip(s.boxes, s.labels):
            real = boxes[classes >= 0]
            assert (real[:, :2] >= 0).all() and (real[:, 2] <= 56).all() and (real[:, 3] <= 56).all()
            for i in range(len(real)):
                for j in range(i + 1, len(real)):
                    a, b = real[i].tolist(), real[j].tolist()
                    distance = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                    assert distance >= gap, (a, b, gap)
                    closest[gap] = min(closest[gap], distance)
    assert closest == {0: 0, 6: 6}                                       # they do come that close


def test_bad_input_is_refused_with_a_clear_message():
    images, labels = toy_digits()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="kind must be one of"):
        scene_batch(images, labels, 2, g, "triple")
    with pytest.raises(ValueError, match="uint8"):
        scene_batch(images.float(), labels, 2, g)
    with pytest.raises(ValueError, match="gap must be >= 0"):
        scene_batch(images, labels, 2, g, "random", gap=-1)
    with pytest.raises(ValueError, match="different classes need 3 classes"):
        scene_batch(images[:2], labels[:2], 2, g, "random", counts=(3,))


@needs_mnist
def test_mnist_scenes_are_deterministic_for_a_seed(mnist_test):
    images, labels = mnist_test
    for kind in KINDS:
        first = scene_batch(images, labels, 20, torch.Generator().manual_seed(5), kind)
        again = scene_batch(images, labels, 20, torch.Generator().manual_seed(5), kind)
        other = scene_batch(images, labels, 20, torch.Generator().manual_seed(6), kind)
        for name in ("images", "raw", "labels", "objects", "background", "boxes"):
            assert torch.equal(getattr(first, name), getattr(again, name)), name
        assert not torch.equal(first.raw, other.raw)


@needs_mnist
def test_mnist_pairs_are_two_different_test_digits(mnist_test):
    images, labels = mnist_test
    by_bytes = {bytes(x.flatten().tolist()): int(y) for x, y in zip(images, labels)}
    s = scenes.test_scenes("pair", 25, seed=0, root=DATA)
    assert s.images.shape == (25, 1, 28, 56)
    assert (s.labels[:, 0] != s.labels[:, 1]).all()
    for raw, classes, objects in zip(s.raw, s.labels, s.objects):
        assert by_bytes[bytes(raw[:, :28].flatten().tolist())] == classes[0]
        assert by_bytes[bytes(raw[:, 28:].flatten().tolist())] == classes[1]
        ink = raw >= INK
        assert (objects[:, :28][ink[:, :28]] == 0).all() and (objects[:, 28:][ink[:, 28:]] == 1).all()
    r = scenes.test_scenes("random", 25, seed=0, root=DATA)
    assert ((r.labels >= 0).sum(1) == 2).any() and ((r.labels >= 0).sum(1) == 3).any()


# ---- the column grid --------------------------------------------------------------------------

def test_column_objects_digit_columns_and_targets_on_a_hand_example():
    objects = torch.tensor([[[0, 0, 1, 1],
                             [0, 1, 1, 1],
                             [2, 2, 0, 1],
                             [2, 1, 1, 0]]])
    assert column_objects(objects, 2).tolist() == [[[0, 1], [2, 0]]]  # last: 2-2 tie, to 0
    assert torch.equal(column_objects(objects, 1), objects)
    assert column_objects(objects[:, :3, :3], 2).tolist() == [[[0]]]  # leftover pixels dropped
    background = torch.ones(1, 4, 4, dtype=torch.bool)
    background[0, 1, 0] = False                                          # one ink pixel
    assert digit_columns(background, 2).tolist() == [[[True, False], [False, False]]]
    assert torch.equal(digit_columns(background, 1), ~background)
    assert column_targets(torch.tensor([[7, 3, 5]]), column_objects(objects, 2)).tolist() == \
        [[[7, 3], [5, 7]]]


# ---- the measures -----------------------------------------------------------------------------

def test_adjusted_rand_index_of_hand_computed_cases():
    a = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    b = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 5, 5]])
    # first: sum C(n_ij) = 2, sum C(a_i) = 6, sum C(b_j) = 3, C(6) = 15: E = 1.2, (2 - 1.2) / (4.5 - 1.2)
    # second: n_ij = 1, 1, 2 (part 0 of a) and 1, 1 (part 1): sum C(n_ij) = 1,
    # sum C(a_i) = C(4) + C(2) = 7, sum C(b_j) = 1 + 1 + 1 = 3: E = 21 / 15, (1 - 1.4) / (5 - 1.4)
    want = [0.8 / 3.3, -0.4 / 3.6]
    assert adjusted_rand_index(a, b).tolist() == pytest.approx(want)
    assert adjusted_rand_index(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 0, 1]])).item() \
        == pytest.approx(-0.5)


def test_adjusted_rand_index_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (5, 6, 7), generator=g)
    assert torch.allclose(adjusted_rand_index(a, a), torch.ones(5, dtype=torch.float64))
    renamed = torch.tensor([3, 9, 0, 4])[a]                              # a permutation of names
    assert torch.allclose(adjusted_rand_index(a, renamed), torch.ones(5, dtype=torch.float64))
    b = torch.randint(0, 3, (5, 6, 7), generator=g)
    assert torch.allclose(adjusted_rand_index(a, b), adjusted_rand_index(b, a))
    assert torch.allclose(adjusted_rand_index(renamed, b), adjusted_rand_index(a, b))
    one = [adjusted_rand_index(a[i:i + 1], b[i:i + 1]) for i in range(5)]  # image by image
    assert torch.allclose(adjusted_rand_index(a, b), torch.cat(one))
    big_a = torch.randint(0, 5, (8, 3000), generator=g)
    big_b = torch.randint(0, 3, (8, 3000), generator=g)
    assert adjusted_rand_index(big_a, big_b).abs().max() < 0.01          # chance: about 0
    same = torch.zeros(2, 9, dtype=torch.long)                           # one part each: equal
    assert adjusted_rand_index(same, same + 4).tolist() == [1.0, 1.0]
    assert adjusted_rand_index(same, torch.arange(9).expand(2, 9)).tolist() == [0.0, 0.0]


def test_adjusted_rand_index_with_a_mask_is_that_of_the_kept_elements():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 3, (4, 10), generator=g), torch.randint(0, 3, (4, 10), generator=g)
    mask = torch.rand(4, 10, generator=g) < 0.6
    mask[3] = False
    got = adjusted_rand_index(a, b, mask)
    for i in range(3):
        want = adjusted_rand_index(a[i][mask[i]][None], b[i][mask[i]][None])
        assert torch.allclose(got[i:i + 1], want)
    assert got[3].isnan()                                                # nothing kept


def test_object_accuracy_on_a_hand_example():
    objects = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]],
                            [[0, 0, 0, 1], [0, 0, 1, 1]],
                            [[0, 0, 1, 1], [0, 0, 1, 1]]])
    labels = torch.tensor([[3, 7, -1], [4, 5, 6], [1, 8, -1]])
    votes = torch.tensor([[[3, 3, 7, 2], [5, 3, 2, 2]],   # object 0: 3 (right), 1: 2 (wrong)
                          [[4, 4, 4, 5], [4, 4, 5, 5]],   # 0 and 1 right; 2 has no column
                          [[1, 6, 8, 8], [6, 1, 8, 8]]])  # 0: a 1-6 tie, to 1 (right); 1 right
    found = object_accuracy(votes, objects, labels)
    assert found["majority"].tolist() == [[3, 2, -1], [4, 5, -1], [1, 8, -1]]
    assert found["right"].tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    assert found["object_accuracy"].item() == pytest.approx(5 / 7)
    assert found["all_objects_right"].item() == pytest.approx(1 / 3)
    ink = torch.tensor([[[True, False, True, False], [False, False, False, False]],
                        [[True, True, False, False], [False, False, False, True]],
                        [[True, False, False, False], [True, True, True, True]]])
    on_ink = object_accuracy(votes, objects, labels, mask=ink)   # only these columns vote
    assert on_ink["majority"].tolist() == [[3, 7, -1], [4, 5, -1], [1, 8, -1]]
    assert on_ink["object_accuracy"].item() == pytest.approx(6 / 7)
    assert on_ink["all_objects_right"].item() == pytest.approx(2 / 3)
    none = object_accuracy(votes, objects, labels, mask=torch.zeros_like(ink))
    assert (none["majority"] == -1).all() and none["object_accuracy"].item() == 0


def test_island_containment_on_a_hand_example():
    objects = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]]])
    labels = torch.tensor([[[[0, 0, 1, 1], [2, 2, 1, 1]],        # three islands, each in one
                            [[0, 0, 0, 1], [-1, 2, 2, 2]]]])     # two straddle; one single
    found = island_containment(labels, objects)
    assert found["islands"].tolist() == [[3, 3]]
    assert found["contained"].tolist() == [[3, 1]]
    assert found["multi_islands"].tolist() == [[3, 2]]
    assert found["multi_contained"].tolist() == [[3, 0]]


def test_islands_do_not_wrap_around():
    e0, e1 = torch.eye(3)[0].view(3, 1), torch.eye(3)[1].view(3, 1, 1)
    state = e1.expand(1, 1, 3, 4, 5).clone()                             # (B, L, D, H, W)
    state[..., 0] = e0
    state[..., -1] = e0                                                  # the left and right edges
    found = islands(state, tau=0.9)
    assert found.count.tolist() == [[3]]                                 # a torus would join them
    state = e1.expand(1, 1, 3, 4, 5).clone()
    state[..., 0, :] = e0
    state[..., -1, :] = e0                                               # the top and bottom rows
    assert islands(state, tau=0.9).count.tolist() == [[3]]


# ---- evaluating a model -----------------------------------------------------------------------

class SceneOracle(torch.nn.Module):
    """Knows the scenes: every level of a column is the one-hot class of its object, or with
    `uniform` the same class everywhere (one island, one vote)."""

    def __init__(self, known: scenes.Scenes, patch: int, uniform: bool = False) -> None:
        super().__init__()
        self.known, self.patch, self.uniform = known, patch, uniform
        self.weight = torch.nn.Parameter(torch.zeros(()))                # gives it a device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        match = (images.flatten(1)[:, None] == self.known.images.flatten(1)[None]).all(-1)
        index = match.int().argmax(1)                                    # (B,) which scene
        objects = column_objects(self.known.objects[index], self.patch)
        classes = column_targets(self.known.labels[index], objects)      # (B, h, w)
        if self.uniform:
            classes = torch.zeros_like(classes)
        top = F.one_hot(classes, 10).permute(0, 3, 1, 2).float()         # (B, 10, h, w)
        return top[:, None].expand(-1, 3, -1, -1, -1)                    # (B, L, D, h, w)

    def column_scores(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)[:, -1]


@pytest.mark.parametrize("patch", [1, 2])
def test_evaluate_scenes_finds_a_perfect_parse_perfect_and_one_island_chance(patch):
    images, labels = toy_digits()
    toy = scene_batch(images, labels, 6, torch.Generator().manual_seed(3), "random")
    perfect = evaluate_scenes(SceneOracle(toy, patch), toy, tau=(0.9, 0.5), batch_size=4)
    assert perfect["scenes"] == 6 and perfect["patch"] == patch
    for key in ("object_accuracy", "all_objects_right", "digit_object_accuracy",
                "digit_all_objects_right", "column_accuracy", "digit_column_accuracy",
                "vote_ari", "digit_vote_ari"):
        assert perfect[key] == pytest.approx(1.0), key
    for tau in (0.9, 0.5):
        found = perfect["islands"][tau]
        assert found["island_ari"] == pytest.approx(1.0)
        assert found["digit_island_ari"] == pytest.approx(1.0)
        assert found["containment"] == pytest.approx([1.0] * 3)
        assert found["islands_per_scene"][-1] == pytest.approx(
            (toy.labels >= 0).sum().item() / 6)                         # one island per object
    blind = evaluate_scenes(SceneOracle(toy, patch, uniform=True), toy, batch_size=4)
    assert blind["vote_ari"] == pytest.approx(0.0) and blind["all_objects_right"] < 1
    assert blind["islands"][0.9]["island_ari"] == pytest.approx(0.0)
    assert blind["islands"][0.9]["containment"] == pytest.approx([0.0] * 3)


def test_evaluate_scenes_runs_a_glom_on_a_pair_canvas_reproducibly(monkeypatch):
    monkeypatch.setenv("GLOM_NATIVE", "0")                               # no compiling here
    images, labels = toy_digits()
    pairs = scene_batch(images, labels, 3, torch.Generator().manual_seed(4), "pair")
    torch.manual_seed(0)
    small = Glom(GlomConfig.preset("seed", steps=2))
    model = scenes.on_canvas(small, 28, 56).train()
    assert torch.equal(model.A, small.A) and model.cfg.width == 56
    state = torch.get_rng_state()
    first = evaluate_scenes(model, pairs, tau=0.9, batch_size=2)
    assert model.training and torch.equal(torch.get_rng_state(), state)  # mode and RNG kept
    again = evaluate_scenes(model, pairs, tau=0.9, batch_size=2)
    assert json.dumps(first) == json.dumps(again)                        # nan-safe equality
    fewer = evaluate_scenes(model, pairs, tau=0.9, batch_size=2, steps=1)   # another rollout ...
    short = Glom(small.cfg.replace(steps=1))
    short.load_state_dict(small.state_dict())
    built = evaluate_scenes(scenes.on_canvas(short, 28, 56), pairs, tau=0.9, batch_size=2)
    assert (first["steps"], fewer["steps"]) == (2, 1)                    # ... the model's own:
    assert json.dumps(fewer) == json.dumps(built) != json.dumps(first)   # one built for 1 step
    assert 0 <= first["all_objects_right"] <= first["object_accuracy"] <= 1
    assert len(first["islands"][0.9]["containment"]) == small.cfg.levels
    with pytest.raises(ValueError, match="image size"):                  # a 28 x 28 model
        evaluate_scenes(small, pairs)


def test_island_failures_measures_each_blank_columns_distance_to_its_own_digits_ink():
    spec = importlib.util.spec_from_file_location(
        "island_failures", Path(__file__).resolve().parent.parent / "scripts/island_failures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    objects = torch.tensor([[[0, 0, 0, 0, 0, 1, 1]]]).expand(1, 3, 7)     # (1, 3, 7)
    digit = torch.zeros(1, 3, 7, dtype=torch.bool)
    digit[0, 1, 0] = True                                                # object 0's ink
    digit[0, 0, 6] = True                                                # object 1's ink
    found = script.ink_distance(objects, digit)
    assert found[0].tolist() == [[1, 1, 2, 3, 4, 1, 0],                  # 8-neighbour steps,
                                 [0, 1, 2, 3, 4, 1, 1],                  # each to its own ink,
                                 [1, 1, 2, 3, 4, 2, 2]]                  # not the nearer one
