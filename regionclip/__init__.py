"""RegionCLIP: region-based language-image pretraining and open-vocabulary detection."""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import get_cfg, load_config
from .modeling.build import build_model

__version__ = "0.1.0"

__all__ = ["build_model", "get_cfg", "load_checkpoint", "load_config", "save_checkpoint"]
