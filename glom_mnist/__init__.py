"""glom-mnist: GLOM's state grid of level embeddings on MNIST. See README.md."""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import GlomConfig
from .model import Glom

__version__ = "0.1.0"
__all__ = ["Glom", "GlomConfig", "load_checkpoint", "save_checkpoint", "__version__"]
