"""InfoNCE equals open_clip's ClipLoss, and a naive reference, in value and gradients."""

import math

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F

from clipline.pretrain.loss import InfoNCELoss, LossConfig


def _features(n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07)).requires_grad_()
    return img, txt, scale


def _naive(img, txt, scale):
    # -log softmax of the diagonal, both directions, written out without cross_entropy.
    logits = scale.exp() * img @ txt.T
    i2t = -(logits.diag() - logits.logsumexp(dim=1)).mean()
    t2i = -(logits.diag() - logits.logsumexp(dim=0)).mean()
    return (i2t + t2i) / 2


@pytest.mark.parametrize("local_loss", [False, True])
def test_matches_open_clip_and_naive(local_loss):
    ours_in = _features()
    ref_in = [t.detach().clone().requires_grad_() for t in ours_in]
    naive_in = [t.detach().clone().requires_grad_() for t in ours_in]

    ours = InfoNCELoss(LossConfig(local_loss=local_loss))(ours_in[0], ours_in[1], ours_in[2].exp())
    ref = open_clip.loss.ClipLoss(local_loss=local_loss)(ref_in[0], ref_in[1], ref_in[2].exp())
    naive = _naive(*naive_in)
    ours.backward()
    ref.backward()
    naive.backward()

    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours, naive)
    for a, b, c in zip(ours_in, ref_in, naive_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(a.grad, c.grad)


def test_loss_is_fp32_under_bf16_inputs():
    img, txt, scale = _features()
    loss = InfoNCELoss(LossConfig())(img.bfloat16(), txt.bfloat16(), scale.exp().bfloat16())
    assert loss.dtype == torch.float32


def test_perfect_alignment_gives_low_loss():
    img = torch.eye(8)
    loss = InfoNCELoss(LossConfig())(img, img, torch.tensor(100.0))
    assert loss.item() < 1e-6


def test_siglip_matches_open_clip():
    from clipline.pretrain.loss import SigLipLoss

    img, txt, scale = _features()
    bias = torch.tensor(-10.0).requires_grad_()
    ref_in = [t.detach().clone().requires_grad_() for t in (img, txt, scale, bias)]
    ours = SigLipLoss()(img, txt, scale.exp(), bias)
    ref = open_clip.loss.SigLipLoss()(ref_in[0], ref_in[1], ref_in[2].exp(), ref_in[3])
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    for a, b in zip((img, txt, scale, bias), ref_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
