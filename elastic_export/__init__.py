"""elastic-export: one elastic hybrid Mamba2-Attention model in, every deployable size out.

The public API is flat (``elastic_export.load``, ``slice_budget``, ``build``...) but imported on
first use, so ``elastic-export --help`` and the CLI's argument errors never pay for importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "config", "preset": "config",
    "LayerWidths": "elastic", "Subnet": "elastic", "full_subnet": "elastic",
    "ElasticExportError": "errors", "ConfigError": "errors", "CheckpointError": "errors", "BudgetError": "errors",
    "load": "loading", "load_config": "hf_io",
    "NemotronHForCausalLM": "model", "build_model": "model",
    "load_nested": "nested", "save_nested": "nested",
    "slice_budget": "slicing",
    "default_model_path": "build",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
