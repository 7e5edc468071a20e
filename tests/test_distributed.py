"""2-process gloo runs equal 1 process on the concatenated batch (loss and gradients)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipline.pretrain.loss import LossConfig, build_loss
from tests.helpers import global_batch, micro_model, torchrun

DIST = Path(__file__).parent / "dist"
CASES = [
    ("infonce", 0, 1),
    ("infonce", 1, 1),
    ("infonce", 0, 2),
    ("infonce", 1, 2),
    ("siglip", 0, 1),
    ("siglip", 0, 2),
]
PER_RANK = 4


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory) -> Path:
    """One torchrun (2 gloo ranks) takes a step for every case, each on its own model and
    DDP wrapper; a launch per case would pay the process start-up six times."""
    out = tmp_path_factory.mktemp("loss_equivalence")
    cases = [f"--case={kind}:{local}:{accum}" for kind, local, accum in CASES]
    torchrun(DIST / "loss_equivalence.py", f"--out-dir={out}", f"--per-rank={PER_RANK}", *cases)
    return out


@pytest.mark.parametrize(("loss_kind", "local_loss", "accum"), CASES)
def test_two_ranks_equal_one_process(two_rank_steps, loss_kind, local_loss, accum):
    """2 ranks (x accum micro-batches each) == 1 process on the concatenated batch."""
    got = load_file(two_rank_steps / f"{loss_kind}-{local_loss}-{accum}.safetensors")

    model = micro_model(loss=loss_kind)
    images, texts = global_batch(2 * PER_RANK)
    loss = build_loss(LossConfig(kind=loss_kind, local_loss=bool(local_loss)))(
        *model(images, texts)
    )
    loss.backward()

    torch.testing.assert_close(got["loss"][0], loss.detach(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert {k.removeprefix("grad/") for k in got if k.startswith("grad/")} == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(got[f"grad/{name}"], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pretrain_under_torchrun_two_ranks(two_rank_run):
    import json

    from clipline.pretrain.checkpoint import list_checkpoints

    _, run_dir = two_rank_run
    assert [p.name for p in list_checkpoints(run_dir)] == [
        "step_000000002",
        "step_000000004",
    ]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    # One writer (rank 0), and a global batch of 2 x 8 over 64 samples: 4 steps = 1 epoch.
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert last["train/epoch"] == 1.0
    assert last["train/samples_per_s_per_device"] * 2 == pytest.approx(last["train/samples_per_s"])
