"""The shipped default model: a nested checkpoint (full / 75% / 50%) trained by training/recipes/default.toml.

``PATH`` is the checkpoint directory (model.safetensors, elastic.json, config.json, router.safetensors,
tokenizer/, and recipe.toml, the recipe that reproduces it).
"""

from pathlib import Path

PATH = Path(__file__).resolve().parent
