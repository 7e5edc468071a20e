"""WiSE-FT: ``(1 - alpha) * zero-shot + alpha * fine-tuned`` weights, checked and swept.

The endpoints are the inputs bit for bit; a mid alpha is the hand computation; two models
of different architectures are one error naming each difference. End to end, the zero-shot
model is a real (2-step) pretraining run read from its run directory, the fine-tuned one
that model trained 3 more steps on other pairs and exported in open_clip's format; the
command scores each alpha with ``clipline eval``'s evaluators (the same numbers at alpha 0
and 1), and its export holds exactly the interpolated weights and loads in open_clip.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from clipline.data.builtin_data import generate_shapes
from clipline.launch.cli import main
from clipline.launch.config import load_run_config
from clipline.launch.run import load_encoders, run_pretrain
from clipline.pretrain.export import export
from clipline.pretrain.export_base import parity_inputs
from clipline.pretrain.export_clipline import export_model
from clipline.pretrain.loss import InfoNCELoss, LossConfig
from clipline.pretrain.model import DualEncoder
from clipline.pretrain.wise_ft import WeightSpaceEnsemble, interpolate
from tests.helpers import MICRO_CFG, make_shape_sets, micro_model, micro_recipe


def _bits(t: torch.Tensor) -> tuple:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype, as bytes
    return t.dtype, tuple(t.shape), raw.numpy().tobytes()


def _state_dicts() -> tuple[dict, dict]:
    """Two micro models' weights, plus the tensors where exactness is easy to lose: a
    negative zero, an integer buffer (position ids) and a bfloat16 tensor."""
    sd_0 = {k: v.clone() for k, v in micro_model(seed=0).clip.state_dict().items()}
    sd_1 = {k: v.clone() for k, v in micro_model(seed=1).clip.state_dict().items()}
    sd_0["ln_final.bias"][0] = -0.0
    sd_1["ln_final.bias"][1] = float("inf")
    sd_0["position_ids"] = torch.arange(16)
    sd_1["position_ids"] = torch.arange(16) + 1  # e.g. BatchNorm's num_batches_tracked
    sd_0["half"] = torch.randn(5, generator=torch.Generator().manual_seed(0)).bfloat16()
    sd_1["half"] = torch.randn(5, generator=torch.Generator().manual_seed(1)).bfloat16()
    return sd_0, sd_1


def test_endpoints_are_the_inputs_bit_for_bit():
    sd_0, sd_1 = _state_dicts()
    for alpha, want in ((0.0, sd_0), (1.0, sd_1)):
        got = interpolate(sd_0, sd_1, alpha)
        assert got.keys() == want.keys()
        assert all(_bits(got[k]) == _bits(want[k]) for k in want), alpha

    # The working model of an ensemble, too: every tensor of its state dict.
    zs, ft = micro_model(seed=0), micro_model(seed=1)
    want_0 = {k: _bits(v) for k, v in zs.clip.state_dict().items()}
    want_1 = {k: _bits(v) for k, v in ft.clip.state_dict().items()}
    ensemble = WeightSpaceEnsemble(zs, ft)
    for alpha, want in ((1.0, want_1), (0.3, None), (0.0, want_0), (1.0, want_1)):
        got = {k: _bits(v) for k, v in ensemble.at(alpha).clip.state_dict().items()}
        assert want is None or got == want, alpha


def test_mid_alpha_is_the_hand_computation():
    sd_0, sd_1 = _state_dicts()
    for alpha in (0.3, 0.7):
        got = interpolate(sd_0, sd_1, alpha)
        for key, t0 in sd_0.items():
            t1 = sd_1[key]
            if key == "position_ids":  # not interpolated: the nearer endpoint's
                want = t0 if alpha < 0.5 else t1
            elif key == "half":  # computed in float32, rounded back
                want = ((1 - alpha) * t0.float() + alpha * t1.float()).bfloat16()
            else:
                want = (1 - alpha) * t0 + alpha * t1
                # ... which is the real-number interpolation to float32 rounding
                exact = (1 - alpha) * t0.double() + alpha * t1.double()
                torch.testing.assert_close(got[key].double(), exact, rtol=1e-6, atol=1e-6)
            assert _bits(got[key]) == _bits(want), (alpha, key)

    # The working model holds that state dict, in place: one copy whatever the alphas.
    zs, ft = micro_model(seed=0), micro_model(seed=1)
    with torch.no_grad():
        ft.logit_scale.fill_(2.0)  # the log of the inverse temperature: interpolated as it is
    want = interpolate(zs.clip.state_dict(), ft.clip.state_dict(), 0.25)
    zs_scale = zs.logit_scale.detach().clone()
    ensemble = WeightSpaceEnsemble(zs, ft)
    pointers = [p.data_ptr() for p in zs.parameters()]
    ensemble.at(0.9)
    model = ensemble.at(0.25)
    assert model is zs and [p.data_ptr() for p in model.parameters()] == pointers
    assert all(torch.equal(v, want[k]) for k, v in model.clip.state_dict().items())
    assert model.logit_scale.item() == pytest.approx(0.75 * zs_scale.item() + 0.25 * 2.0)


def test_different_architectures_are_one_error_naming_each_difference():
    other_cfg = {**MICRO_CFG, "text_cfg": {**MICRO_CFG["text_cfg"], "width": 64}}
    other = DualEncoder(other_cfg, {"mean": [0.5, 0.5, 0.5]})
    with pytest.raises(ValueError) as err:
        WeightSpaceEnsemble(micro_model(seed=0), other, names=("zs/", "ft/"))
    msg = str(err.value)
    assert msg.startswith("zs/ and ft/ are not one architecture")
    assert "model config text_cfg.width: 32 vs 64" in msg
    assert "preprocessing mean: [0.48145466, 0.4578275, 0.40821073] vs [0.5, 0.5, 0.5]" in msg
    assert "tensor ln_final.weight: shape [32] vs [64]" in msg
    assert "more" in msg and "\n" not in msg  # the first few named, the rest counted

    short = DualEncoder({**MICRO_CFG, "text_cfg": {**MICRO_CFG["text_cfg"], "context_length": 8}})
    with pytest.raises(ValueError, match="tokenizer context_length: 16 vs 8"):
        WeightSpaceEnsemble(micro_model(seed=0), short)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Eval sets (``zs``, ``ret``), the zero-shot model (``run``: a 2-step pretraining run)
    and the fine-tuned one (``ft``: it, 3 more steps on other pairs, an open_clip export)."""
    root = make_shape_sets(tmp_path_factory.mktemp("wise_ft"), held_out=24)
    run_pretrain(load_run_config(micro_recipe(root / "shards", root / "run", steps=2)))
    model = load_encoders(root / "run").train()
    scenes = generate_shapes(16, seed=11, image_size=32)
    transform = model.image_transform(is_train=False)
    images = torch.stack([transform(s.image) for s in scenes])
    texts = model.tokenize([s.caption for s in scenes])
    loss_fn = InfoNCELoss(LossConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(*model(images, texts)[:3]).backward()
        optimizer.step()
    export(model.eval(), root / "ft", format="open_clip", run_config={})
    return root


def _interpolated(root: Path, alpha: float) -> dict[str, torch.Tensor]:
    """The hand computation on the two inputs as ``clipline eval`` reads them."""
    sd_0 = load_encoders(root / "run").clip.state_dict()
    sd_1 = load_encoders(root / "ft").clip.state_dict()
    return {k: sd_0[k] if alpha == 0 else (1 - alpha) * sd_0[k] + alpha * sd_1[k] for k in sd_0}


TASKS = ["--zeroshot", "shapes=zs", "--retrieval", "heldout=ret"]


def test_cli_sweeps_scores_plots_and_exports_the_best(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws)  # every path relative
    argv = ["wise-ft", "run", "ft", "sweep", "--alphas", "0,0.5,1", *TASKS]
    assert main([*argv, "--format", "open_clip", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(Path("sweep/wise_ft.json").read_text())
    rows = {r["alpha"]: r for r in results["alphas"]}
    assert list(rows) == [0.0, 0.5, 1.0]

    # Each alpha's numbers are clipline eval's; the endpoints are the two inputs'.
    for alpha, model in ((0.0, "run"), (1.0, "ft")):
        assert main(["eval", model, *TASKS, "--device", "cpu"]) == 0
        assert rows[alpha]["metrics"] == json.loads(capsys.readouterr().out)
    for row in rows.values():
        m = row["metrics"]
        recall = (m["heldout/image_retrieval_recall@1"] + m["heldout/text_retrieval_recall@1"]) / 2
        assert row["main"] == {"shapes/acc1": m["shapes/acc1"], "heldout/mean_recall@1": recall}
        assert row["mean"] == pytest.approx((m["shapes/acc1"] + recall) / 2)
    best = max(rows.values(), key=lambda r: r["mean"])["mean"]
    picked = results["picked"]
    assert picked["alpha"] == min(a for a, r in rows.items() if r["mean"] == best)
    assert picked["by"] == "the best mean of the tasks' main metrics"

    # The table: a header of main metrics, one row per alpha, the picked one starred.
    lines = printed.splitlines()
    assert lines[0].split() == ["alpha", "shapes/acc1", "heldout/mean_recall@1", "mean"]
    for line, (alpha, row) in zip(lines[1:4], rows.items(), strict=True):
        cells = line.replace("*", " ").split()
        assert float(cells[0]) == alpha and float(cells[-1]) == pytest.approx(row["mean"], 1e-3)
        assert ("*" in line) == (alpha == picked["alpha"])
    assert f"-> {Path('sweep/export')} (open_clip)" in printed
    assert Path("sweep/wise_ft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The export holds exactly the interpolated weights, and embeds like them in open_clip.
    want = _interpolated(ws, picked["alpha"])
    exported = load_encoders("sweep/export")
    assert all(torch.equal(v, want[k]) for k, v in exported.clip.state_dict().items())
    by_hand = load_encoders("run")
    by_hand.clip.load_state_dict(want)
    oc_model = open_clip.create_model_and_transforms("local-dir:sweep/export")[0].eval()
    assert oc_model.logit_scale.item() == exported.logit_scale.item()
    images, texts = parity_inputs(exported)
    with torch.no_grad():
        assert torch.equal(exported.encode_image(images), by_hand.encode_image(images))
        assert torch.equal(exported.encode_text(texts), by_hand.encode_text(texts))
        torch.testing.assert_close(
            oc_model.encode_image(images, normalize=True), exported.encode_image(images)
        )
        torch.testing.assert_close(
            oc_model.encode_text(texts, normalize=True), exported.encode_text(texts)
        )


def test_cli_pick_exports_that_alpha_in_clipline_format(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws)
    argv = ["wise-ft", "run", "ft", "picked", "--alphas", "0.25,1", "--pick", "0.25", *TASKS]
    assert main(argv) == 0
    picked = json.loads(Path("picked/wise_ft.json").read_text())["picked"]
    assert (picked["alpha"], picked["by"], picked["format"]) == (0.25, "--pick", "clipline")
    assert "alpha 0.25 (--pick) -> picked/export (clipline)" in capsys.readouterr().out
    meta = json.loads(Path("picked/export/clipline_export.json").read_text())
    assert meta["run_config"] == {"wise_ft": {"alpha": 0.25, "zero_shot": "run", "finetuned": "ft"}}
    want = _interpolated(ws, 0.25)
    exported = load_encoders("picked/export")
    assert all(torch.equal(v, want[k]) for k, v in exported.clip.state_dict().items())


def test_cli_bad_input_is_one_line(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws)
    other_cfg = {**MICRO_CFG, "embed_dim": 16}
    export_model(DualEncoder(other_cfg), "other", run_config={})
    cases = [
        (["run", "other", "x", *TASKS], "run and other are not one architecture"),
        (["run", "ft", "x", "--pick", "0.35", *TASKS], "--pick 0.35 is not among --alphas 0,0.1,"),
        (["run", "ft", "x", "--alphas", "0,half", *TASKS], "'half' is not a number"),
        (["run", "ft", "x", "--alphas", "0,1,1", *TASKS], "give distinct values"),
        (["run", "ft", "x"], "nothing to evaluate"),
        (["run", "nowhere", "x", *TASKS], "nowhere is neither an export"),
    ]
    for args, message in cases:
        assert main(["wise-ft", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("clipline wise-ft: error: ") and message in err, err
        assert "\n" not in err
    assert not Path("x").exists()
