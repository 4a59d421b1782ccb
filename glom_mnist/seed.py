"""Import the seed's published `best_models/` into our checkpoint format, executing no code.

The seed ships 8 files (`bottom_up_model{0,1,2}`, `layer_att_model{0,1,2}`,
`top_down_model{0,1}`), each a whole pickled `nn.Module` of a class `model` defined in its
notebook's `__main__`, holding `Linear` layers Q1 (10x90), K1 and V1 (10x10). Unpickling such a
file normally imports and runs whatever its globals name. Here a restricted unpickler maps
every module class to an inert record and refuses every other global except the few torch
functions that rebuild tensors, so only the weights come out.
"""
from __future__ import annotations

import argparse
import pickle
import types
from collections import OrderedDict
from pathlib import Path

import torch

from .checkpoint import provenance, save_checkpoint
from .config import GlomConfig
from .model import Glom, seed_linear_to_conv

# our role -> the seed's file prefix; file i of a role is that role's network for level i
SEED_FILES = {"bottom_up": "bottom_up_model", "lateral": "layer_att_model",
              "top_down": "top_down_model"}
LAYERS = ("Q1", "K1", "V1")


class _Record:
    """Stands in for any pickled nn.Module: keeps its attributes, runs nothing."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _reconstructor(cls: type, base: type, state: object) -> _Record:
    return _Record()


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        module = "builtins" if module == "__builtin__" else module   # protocol 2's old name
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "__main__" or module.startswith("torch.nn.modules."):
            return _Record
        raise pickle.UnpicklingError(
            f"refusing global {module}.{name}: a seed network file holds only modules and tensors")


# torch.load accepts a pickle module; this one only knows the restricted unpickler
restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=pickle.load,
                                          __name__="glom_mnist.seed.restricted_pickle")


def read_seed_network(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of one seed file: {'Q1.weight', 'Q1.bias', 'K1.weight', ..., 'V1.bias'}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"seed network file missing: {path}")
    try:
        # weights_only=False is required to pass a pickle module; ours executes nothing
        record = torch.load(path, map_location="cpu", pickle_module=restricted_pickle,
                            weights_only=False)
        layers = record.__dict__["_modules"]
        weights = {f"{name}.{p}": layers[name].__dict__["_parameters"][p].detach().float()
                   for name in LAYERS for p in ("weight", "bias")}
    except (pickle.UnpicklingError, KeyError, AttributeError, RuntimeError, EOFError,
            TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a seed network file (a pickled module with Linear "
                         f"layers Q1, K1, V1): {str(err).splitlines()[0][:200]}") from None
    return weights


def glom_from_seed_networks(networks: dict[str, dict[str, torch.Tensor]],
                            cfg: GlomConfig | None = None) -> Glom:
    """A Glom holding the seed's weights. `networks` maps file names (`bottom_up_model0`, ...)
    to their weights as returned by `read_seed_network`."""
    cfg = cfg or GlomConfig.preset("seed")
    model = Glom(cfg)
    D, k = cfg.dim, cfg.kernel
    counters: dict[str, int] = {}
    A, a, B, b, C, c = (p.detach().clone() for p in
                        (model.A, model.a, model.B, model.b, model.C, model.c))
    for r, (role, *_) in enumerate(model.routes):
        i = counters[role] = counters.get(role, -1) + 1
        name = f"{SEED_FILES[role]}{i}"
        if name not in networks:
            raise ValueError(f"seed network {name} missing; need {seed_file_names(cfg)}")
        w = networks[name]
        expected = {"Q1.weight": (D, k * k * D), "K1.weight": (D, D), "V1.weight": (D, D)}
        for key, shape in expected.items():
            if tuple(w[key].shape) != shape:
                raise ValueError(f"{name}: {key} has shape {tuple(w[key].shape)}, expected {shape}")
        A[r] = seed_linear_to_conv(w["Q1.weight"], D, k)
        a[r], B[r], b[r], C[r], c[r] = (w["Q1.bias"], w["K1.weight"], w["K1.bias"],
                                        w["V1.weight"], w["V1.bias"])
    model.load_state_dict({"A": A, "a": a, "B": B, "b": b, "C": C, "c": c})
    return model


def seed_file_names(cfg: GlomConfig) -> list[str]:
    names, counters = [], {}
    for role, *_ in cfg.routes():
        counters[role] = counters.get(role, -1) + 1
        names.append(f"{SEED_FILES[role]}{counters[role]}")
    return names


def import_seed(directory: str | Path, out: str | Path) -> Glom:
    """Read the seed's 8 network files from `directory` and write our checkpoint to `out`."""
    directory = Path(directory)
    cfg = GlomConfig.preset("seed")
    networks = {name: read_seed_network(directory / name) for name in seed_file_names(cfg)}
    model = glom_from_seed_networks(networks, cfg)
    save_checkpoint(model, out, provenance_info=provenance(
        source=f"seed best_models/ imported from {directory}"))
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="the seed's best_models/ folder (8 files)")
    parser.add_argument("out", help="our checkpoint to write, e.g. best_models/seed_published.pt")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out} exists; choose another path or remove it first")
    import_seed(args.directory, out)
    print(f"wrote {out}")
    return 0
