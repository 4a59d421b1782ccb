"""Import the seed's published `best_models/` into our checkpoint format, executing no code.

The seed ships 8 files (`bottom_up_model{0,1,2}`, `layer_att_model{0,1,2}`,
`top_down_model{0,1}`), each a whole pickled `nn.Module` of a class `model` defined in its
notebook's `__main__`, holding `Linear` layers Q1 (10x90), K1 and V1 (10x10). Unpickling such a
file normally imports and runs whatever its globals name. Here it is never handed to
`torch.load` or `pickle.load`: `torchfile.read_torch_file` reads either of torch's formats with
an unpickler that maps every module class to an inert record and refuses every other global
except the few that rebuild tensors, so only the weights come out.
"""
from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path

import torch

from .checkpoint import provenance, save_checkpoint
from .config import GlomConfig
from .files import check_new_file
from .model import Glom, seed_linear_to_conv
from .torchfile import TensorRef, read_torch_file

# our role -> the seed's file prefix; file i of a role is that role's network for level i
SEED_FILES = {"bottom_up": "bottom_up_model", "lateral": "layer_att_model",
              "top_down": "top_down_model"}
LAYERS = ("Q1", "K1", "V1")


def _module_class(module: str, name: str) -> bool:
    """The classes a seed file may instantiate: its notebook's `model` and torch's layers."""
    return module == "__main__" or module.startswith("torch.nn.modules.")


def read_seed_network(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of one seed file: {'Q1.weight', 'Q1.bias', 'K1.weight', ..., 'V1.bias'}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"seed network file missing: {path}")
    try:
        record = read_torch_file(path, _module_class)
        layers = record.__dict__["_modules"]
        weights = {}
        for name in LAYERS:
            for p in ("weight", "bias"):
                ref = layers[name].__dict__["_parameters"][p]
                if not isinstance(ref, TensorRef):
                    raise TypeError(f"{name}.{p} is not a tensor")
                weights[f"{name}.{p}"] = ref.tensor().float()
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, AttributeError, EOFError,
            TypeError, ValueError, IndexError, OSError) as err:
        why = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path} is not a seed network file (a pickled module with Linear "
                         f"layers Q1, K1, V1): {why}") from None
    bad = [k for k, w in weights.items() if not torch.isfinite(w).all()]
    if bad:
        raise ValueError(f"{path}: {', '.join(bad)} hold non-finite values (NaN or inf); "
                         "not a usable network")
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
    check_new_file(out, force=None, flag="OUT")
    import_seed(args.directory, out)
    print(f"wrote {out}")
    return 0
