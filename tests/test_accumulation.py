"""Contrastive accumulation: k micro-batches of B give the loss and gradients of one batch of kB."""

import pytest
import torch
from accelerate import Accelerator

from clipline.pretrain.loop import contrastive_step
from clipline.pretrain.loss import InfoNCELoss, LossConfig
from tests.helpers import global_batch, micro_model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_equals_large_batch(k):
    accelerator = Accelerator(cpu=True)
    images, texts = global_batch(8)
    loss_fn = InfoNCELoss(LossConfig())

    big = micro_model()
    big_loss, _ = contrastive_step(big, loss_fn, [(images, texts)], accelerator)
    acc = micro_model()
    micro = list(zip(images.chunk(k), texts.chunk(k), strict=True))
    acc_loss, _ = contrastive_step(acc, loss_fn, micro, accelerator)

    torch.testing.assert_close(acc_loss, big_loss)
    want, got = _grads(big), _grads(acc)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_naive_accumulation_is_not_the_large_batch():
    # Why the caching matters: averaging per-micro-batch losses sees fewer negatives.
    images, texts = global_batch(8)
    loss_fn = InfoNCELoss(LossConfig())
    model = micro_model()
    with torch.no_grad():
        big = loss_fn(*model(images, texts))
        naive = (
            sum(loss_fn(*model(i, t)) for i, t in zip(images.chunk(2), texts.chunk(2), strict=True))
            / 2
        )
    assert not torch.allclose(big, naive, rtol=1e-3)
