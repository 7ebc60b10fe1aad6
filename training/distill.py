"""Distillation losses (Nemotron Elastic Eqs. 14-16).

- Frozen teacher: L = T^2 * KL(p_teacher^T || p_student^T), forward KL on temperature-softened
  logits, averaged over tokens. Exactly zero when the student's logits equal the teacher's.
- Trainable teacher (Eq. 15): L = KD(sg(teacher) -> student) + alpha * CE(teacher), where the
  teacher is the model's own full budget; CE keeps self-distillation from collapsing. When the
  sampled budget is the full model, student == teacher and only alpha * CE remains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher || student) per token, mean over tokens, scaled by T^2. Logits [..., V]."""
    T = temperature
    log_s = F.log_softmax(student_logits.float() / T, dim=-1).flatten(0, -2)
    log_t = F.log_softmax(teacher_logits.float() / T, dim=-1).flatten(0, -2)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") / log_s.shape[0]
    return kl * T * T


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; logits [B, L, V], targets [B, L]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def distill_loss(student_logits, teacher_logits, targets, mode: str = "frozen", temperature: float = 1.0,
                 alpha: float = 1.0, same: bool = False) -> torch.Tensor:
    """The task loss of one elastic step. ``same``: the student is the teacher (full budget)."""
    if mode == "frozen":
        return kd_loss(student_logits, teacher_logits.detach(), temperature)
    if mode == "trainable":
        ce = alpha * ce_loss(teacher_logits, targets)
        return ce if same else kd_loss(student_logits, teacher_logits.detach(), temperature) + ce
    raise ValueError(f"unknown distillation mode {mode!r}")
