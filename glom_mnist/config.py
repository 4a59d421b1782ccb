"""GlomConfig: every knob of the GLOM state grid, and the named presets.

The `seed` preset reproduces the public GLOM-on-MNIST experiment described in
`shared/docs/seed-experiment.md`, quirks included; each quirk is commented where it is set.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ROLES = ("bottom_up", "lateral", "top_down")
UPDATES = ("residual", "average")
INPUT_DROPOUTS = ("shared", "per_network")


@dataclass(frozen=True)
class GlomConfig:
    """Shape, wiring and rollout of a GLOM state grid `(B, L, D, H, W)`."""

    levels: int = 4                  # L: level 0 holds the input, level L-1 the class vector
    dim: int = 10                    # D: length of every level embedding
    height: int = 28                 # H, W: one column per pixel
    width: int = 28
    num_classes: int = 10            # the top level's first num_classes channels are the vote
    steps: int = 30                  # T: updates in one rollout
    kernel: int = 3                  # neighbourhood: kernel x kernel on a torus (edges wrap)
    bottom_up: bool = True           # bu[i]: level i -> level i+1
    lateral: bool = True             # lat[i]: level i+1 -> level i+1 (the seed's "attention" net)
    top_down: bool = True            # td[i]: level i+2 -> level i+1
    attention: bool = False          # consensus attention over the neighbourhood (Hinton/Kilcher)
    attention_lambda: float = 0.7    # weight lambda**k of level l+k in the similarity
    attention_weight: float = 0.1    # residual update: step towards the consensus by this much
    update: str = "residual"         # "residual": e += sum of messages; "average": mean of them
    out_scale: float = 0.01          # every network's output is multiplied by this
    # dropout on each network's Q and K (per network and column, as in the seed) and on the
    # state the networks read, there as input_dropout says:
    dropout: float = 0.1
    # "per_network": the seed's own, every network's 90 inputs of every column dropped
    # separately; "shared": each state value dropped once for all the networks and the 9
    # neighbourhoods that read it (the same rate and mean as the seed's, but correlated across
    # neighbours; 18x fewer masks, one convolution for all networks: faster to train)
    input_dropout: str = "per_network"
    noise: float = 1e-4              # U[0, noise) added to the whole state each training step
    init_noise: float = 0.1          # initial state U[0, init_noise)
    accumulate: tuple[int, ...] = (2, 4, 8)  # save/re-add the state every steps//k steps
    accumulate_scale: float = 0.1
    clamp_input: bool = False        # re-write level 0 with the image after every step

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"GlomConfig: {what}")

        for f in dataclasses.fields(self):        # each value of its field's kind, finite
            value, kind = getattr(self, f.name), type(f.default)
            if kind is float:
                need(isinstance(value, (int, float)) and not isinstance(value, bool)
                     and math.isfinite(value), f"{f.name} must be a finite number, got {value!r}")
            elif kind in (bool, str):
                need(isinstance(value, kind), f"{f.name} must be a {kind.__name__}, got {value!r}")
        for name in ("levels", "dim", "height", "width", "num_classes", "steps", "kernel"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.levels >= 2, f"levels must be >= 2 (input and output), got {self.levels}")
        need(self.kernel % 2 == 1, f"kernel must be odd (3 for the 3x3 torus), got {self.kernel}")
        need(self.num_classes <= self.dim,
             f"num_classes ({self.num_classes}) must be <= dim ({self.dim}): the top level votes")
        need(self.update in UPDATES, f"update must be one of {UPDATES}, got {self.update!r}")
        need(self.input_dropout in INPUT_DROPOUTS,
             f"input_dropout must be one of {INPUT_DROPOUTS}, got {self.input_dropout!r}")
        for name in ("dropout",):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("noise", "init_noise", "accumulate_scale", "attention_weight", "out_scale"):
            need(getattr(self, name) >= 0.0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(0.0 <= self.attention_lambda <= 1.0,
             f"attention_lambda must be in [0, 1], got {self.attention_lambda}")
        need(isinstance(self.accumulate, tuple)
             and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                     for k in self.accumulate),
             f"accumulate must be positive integers, got {self.accumulate!r}")
        need(bool(self.routes()) or self.attention,
             "at least one of bottom_up, lateral, top_down, attention must be on")

    def routes(self) -> list[tuple[str, int, int]]:
        """The networks as (role, source level, target level), in a fixed order."""
        L = self.levels
        routes = []
        if self.bottom_up:
            routes += [("bottom_up", i, i + 1) for i in range(L - 1)]
        if self.lateral:
            routes += [("lateral", i + 1, i + 1) for i in range(L - 1)]
        if self.top_down:
            routes += [("top_down", i + 2, i + 1) for i in range(L - 2)]
        return routes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GlomConfig":
        """Build from a dict (e.g. a checkpoint's), refusing unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"GlomConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("accumulate"), (list, tuple)):
            values["accumulate"] = tuple(values["accumulate"])
        return cls(**values)

    def replace(self, **changes: Any) -> "GlomConfig":
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GlomConfig":
        """A named preset (see PRESETS), optionally with some fields changed."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


SEED: dict[str, Any] = dict(
    # The seed experiment, exactly (shared/docs/seed-experiment.md). Its quirks:
    levels=4, dim=10, height=28, width=28, steps=30, kernel=3,
    bottom_up=True, top_down=True,
    lateral=True,         # quirk: its only "attention" is this learned 3x3 lateral network ...
    attention=False,      # ... because the similarity attention it computed was dead code
    update="residual",    # the state grows by the sum of all messages (an NCA update)
    out_scale=0.01,
    dropout=0.1,          # quirk: never switched off in the seed (we evaluate in eval mode)
    input_dropout="per_network",  # each network's 90 inputs of each column dropped on their own
    noise=1e-4,           # NCA-style noise, training only
    init_noise=0.1,
    accumulate=(2, 4, 8),  # "accumulated intermediate states" every 15, 7 and 3 steps
    accumulate_scale=0.1,
    clamp_input=False,    # quirk: the accumulation adds to level 0 too, so the input drifts
)

PRESETS: dict[str, dict[str, Any]] = {
    "seed": SEED,
    # The seed plus a real consensus attention, with the input level held fixed.
    "consensus": {**SEED, "attention": True, "clamp_input": True},
}
