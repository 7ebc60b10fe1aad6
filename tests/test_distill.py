import torch

from training.distill import ce_loss, distill_loss, kd_loss


def test_kd_zero_when_student_equals_teacher():
    logits = torch.randn(2, 7, 11) * 3
    assert kd_loss(logits, logits.clone()).item() == 0.0
    assert kd_loss(logits, logits.clone(), temperature=2.0).item() == 0.0


def test_kd_positive_and_forward_kl():
    s, t = torch.randn(3, 5, 9), torch.randn(3, 5, 9)
    got = kd_loss(s, t, temperature=1.0)
    p = t.softmax(-1)
    want = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    assert got > 0 and torch.allclose(got, want, atol=1e-6)
    T = 2.0
    pT = (t / T).softmax(-1)
    wantT = (pT * (pT.log() - (s / T).log_softmax(-1))).sum(-1).mean() * T * T
    assert torch.allclose(kd_loss(s, t, T), wantT, atol=1e-6)


def test_trainable_teacher_adds_alpha_ce():
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    y = torch.randint(0, 6, (2, 4))
    got = distill_loss(s, t, y, "trainable", alpha=0.5)
    assert torch.allclose(got, kd_loss(s, t) + 0.5 * ce_loss(t, y))
    assert torch.allclose(distill_loss(t, t, y, "trainable", alpha=0.5, same=True), 0.5 * ce_loss(t, y))
    assert torch.allclose(distill_loss(s, t, y, "frozen"), kd_loss(s, t))
