"""Elastic training (Nemotron Elastic, arXiv 2511.16664): one run that produces every budget.

- :mod:`training.space`    elastic axes, choices, differentiable parameter / memory cost, repair into the band
- :mod:`training.router`   one MLP per axis, Gumbel-Softmax with straight-through hard choices, budget loss
- :mod:`training.distill`  forward KL from a frozen teacher; trainable-teacher KD + alpha * CE
- :mod:`training.sampler`  budget sampling per step (uniform or weighted; the trainer's sandwich trains all)
- :mod:`training.data`     byte-level / HF tokenizers, packed windows from text, JSONL, tokens, the CPython stdlib
- :mod:`elastic_export.tasks` synthetic multi-step arithmetic with worked steps; exact-match evaluation
- :mod:`training.recipe`   TOML recipes, validated before training
- :mod:`training.trainer`  stages, exact resume, torchrun (DDP), nested checkpoint output
"""
