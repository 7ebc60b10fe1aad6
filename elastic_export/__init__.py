"""elastic-export: one elastic hybrid Mamba2-Attention model in, every deployable size out."""

from .build import default_model_path
from .config import ModelConfig, preset
from .elastic import LayerWidths, Subnet, full_subnet
from .errors import BudgetError, CheckpointError, ConfigError, ElasticExportError
from .hf_io import load, load_config
from .model import NemotronHForCausalLM, build_model
from .nested import load_nested, save_nested
from .slicing import slice_budget

__version__ = "0.1.0"

__all__ = ["ModelConfig", "preset", "LayerWidths", "Subnet", "full_subnet", "ElasticExportError", "ConfigError",
           "CheckpointError", "BudgetError", "load", "load_config", "NemotronHForCausalLM", "build_model",
           "load_nested", "save_nested", "slice_budget", "default_model_path"]
