"""Distillation (pretrain/distill.py): the loss equals open_clip's DistillClipLoss where the
definitions meet, 2 gloo ranks equal 1 process, accumulation equals one large batch, and
an online teacher export trains through the real CLI without reaching the checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file

from clipline.data.stream import StreamConfig
from clipline.launch.config import load_run_config
from clipline.pretrain.checkpoint import consolidated_state, list_checkpoints
from clipline.pretrain.distill import (
    DistillLoss,
    OnlineTeacher,
    StoredTeacher,
    TeacherSpec,
    distill_loss,
)
from clipline.pretrain.export import export, find_export, load_exported
from clipline.pretrain.loop import contrastive_step
from clipline.pretrain.loss import DistillConfig, InfoNCELoss, LossConfig, SigLipLoss, build_loss
from clipline.pretrain.model import DualEncoder
from tests.helpers import (
    MICRO_CFG,
    global_batch,
    make_shards,
    micro_loader,
    micro_model,
    micro_recipe,
    to_toml,
    torchrun,
)

DIST = Path(__file__).parent / "dist"
SPEC_TWO = TeacherSpec(dims=[8, 12], logit_scales=[30.0, 70.0])  # an ensemble of two


def teacher_features(n: int, spec: TeacherSpec, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random teacher features laid out as the loss takes them: each part unit-norm."""
    g = torch.Generator().manual_seed(seed)
    parts = [
        [F.normalize(torch.randn(n, d, generator=g), dim=-1) for d in spec.dims] for _ in range(2)
    ]
    return torch.cat(parts[0], dim=1), torch.cat(parts[1], dim=1)


def _student(n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return img, txt, torch.tensor(math.log(1 / 0.07)).requires_grad_()


def _copies(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _distill(weight=0.5, temperature=1.0, kind="infonce", local_loss=False, spec=None):
    cfg = LossConfig(
        kind=kind,
        local_loss=local_loss,
        distill=DistillConfig(weight=weight, temperature=temperature),
    )
    contrastive = InfoNCELoss(cfg) if kind == "infonce" else SigLipLoss(cfg)
    return DistillLoss(contrastive, cfg, source=StoredTeacher(spec))


@pytest.mark.parametrize("local_loss", [False, True])
def test_equals_open_clip_distill_clip_loss(local_loss):
    """One teacher, temperature 1: open_clip's two terms, and (1 - w) c + w d of them."""
    spec = TeacherSpec(dims=[12], logit_scales=[50.0])
    t_img, t_txt = teacher_features(16, spec)
    ours_in, ref_in = _student(), None
    ref_in = _copies(ours_in)
    ours = _distill(weight=0.3, local_loss=local_loss, spec=spec)
    got = ours(ours_in[0], ours_in[1], ours_in[2].exp(), teacher_image=t_img, teacher_text=t_txt)
    ref = open_clip.loss.DistillClipLoss(local_loss=local_loss)
    c, d = ref(ref_in[0], ref_in[1], ref_in[2].exp(), t_img, t_txt, torch.tensor(50.0))
    torch.testing.assert_close(ours.parts["loss_contrastive"], c.detach())
    torch.testing.assert_close(ours.parts["loss_distill"], d.detach())
    torch.testing.assert_close(got, 0.7 * c + 0.3 * d)
    got.backward()
    (0.7 * c + 0.3 * d).backward()
    for a, b in zip(ours_in, ref_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_temperature_and_an_ensemble_of_teachers():
    """T: student and teacher logits divided by T, the term scaled by T^2 (so with one
    teacher it is T^2 x open_clip's term at scales / T); several teachers: their softmax
    distributions averaged (MobileCLIP's average_after_softmax), both directions."""
    img, txt, scale = _student()
    spec = TeacherSpec(dims=[12], logit_scales=[50.0])
    t_img, t_txt = teacher_features(16, spec)
    ref = open_clip.loss.DistillClipLoss()
    _, d = ref(img, txt, scale.exp() / 2, t_img, t_txt, torch.tensor(50.0) / 2)
    got = distill_loss(img, txt, scale.exp(), t_img, t_txt, spec, temperature=2.0)
    torch.testing.assert_close(got, 4 * d)

    t_img, t_txt = teacher_features(16, SPEC_TWO)
    lo = [slice(0, 8), slice(8, 20)]
    p_i2t = sum(
        F.softmax(s * t_img[:, sl] @ t_txt[:, sl].T / 3, dim=1)
        for s, sl in zip(SPEC_TWO.logit_scales, lo, strict=True)
    )
    p_t2i = sum(
        F.softmax(s * t_txt[:, sl] @ t_img[:, sl].T / 3, dim=1)
        for s, sl in zip(SPEC_TWO.logit_scales, lo, strict=True)
    )
    logits = scale.exp() * img @ txt.T / 3
    naive = -((p_i2t / 2) * logits.log_softmax(1)).sum(1).mean()
    naive = naive - ((p_t2i / 2) * logits.T.log_softmax(1)).sum(1).mean()
    got = distill_loss(img, txt, scale.exp(), t_img, t_txt, SPEC_TWO, temperature=3.0)
    torch.testing.assert_close(got, 9 * naive / 2)


def test_weight_zero_is_the_plain_loss_and_siglip_combines():
    assert type(build_loss(LossConfig())) is InfoNCELoss  # off by default: nothing wraps it
    t_img, t_txt = teacher_features(16, SPEC_TWO)
    for kind, plain in (("infonce", InfoNCELoss(LossConfig())), ("siglip", SigLipLoss())):
        bias = torch.tensor(-10.0) if kind == "siglip" else None
        ours_in = _student()
        plain_in = _copies(ours_in)
        ours = _distill(weight=0.0, kind=kind, spec=SPEC_TWO)
        got = ours(*ours_in[:2], ours_in[2].exp(), bias, teacher_image=t_img, teacher_text=t_txt)
        want = plain(*plain_in[:2], plain_in[2].exp(), bias)
        assert torch.equal(got, want)
        got.backward()
        want.backward()
        for a, b in zip(ours_in, plain_in, strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
        # and weighted: SigLIP (or InfoNCE) as the contrastive part, the same distill term
        half = _distill(weight=0.5, kind=kind, spec=SPEC_TWO)
        img, txt, scale = _student()
        mixed = half(img, txt, scale.exp(), bias, teacher_image=t_img, teacher_text=t_txt)
        term = distill_loss(img, txt, scale.exp(), t_img, t_txt, SPEC_TWO)
        torch.testing.assert_close(mixed, 0.5 * plain(img, txt, scale.exp(), bias) + 0.5 * term)


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_equals_one_large_batch(k):
    accelerator = Accelerator(cpu=True)
    images, texts = global_batch(8)
    t_img, t_txt = teacher_features(8, SPEC_TWO)
    loss_fn = _distill(weight=0.5, temperature=2.0, spec=SPEC_TWO)

    big = micro_model()
    whole = [{"teacher_image": t_img, "teacher_text": t_txt}]
    extra = loss_fn.step_inputs(whole, big.preprocess_config())
    big_loss, _ = contrastive_step(big, loss_fn, [(images, texts)], accelerator, **extra)
    acc = micro_model()
    micro = [
        {"teacher_image": i, "teacher_text": t}
        for i, t in zip(t_img.chunk(k), t_txt.chunk(k), strict=True)
    ]
    extra = loss_fn.step_inputs(micro, acc.preprocess_config())
    inputs = list(zip(images.chunk(k), texts.chunk(k), strict=True))
    acc_loss, _ = contrastive_step(acc, loss_fn, inputs, accelerator, **extra)

    torch.testing.assert_close(acc_loss, big_loss)
    for (name, p), q in zip(big.named_parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


CASES = [("infonce", 0, 1), ("infonce", 1, 2), ("siglip", 0, 2)]


def test_two_ranks_equal_one_process(tmp_path):
    """2 gloo ranks (x accum micro-batches each) == 1 process on the global batch, for each
    case in one torchrun launch: loss value and every gradient."""
    per_rank = 4
    out = tmp_path / "rank0.safetensors"
    cases = [f"{kind}:{local}:{accum}" for kind, local, accum in CASES]
    torchrun(DIST / "distill_equivalence.py", f"--out={out}", f"--per-rank={per_rank}", *cases)
    got = load_file(out)
    for kind, local, accum in CASES:
        case = f"{kind}:{local}:{accum}"
        model = micro_model(loss=kind)
        images, texts = global_batch(2 * per_rank)
        t_img, t_txt = teacher_features(2 * per_rank, SPEC_TWO)
        loss_fn = _distill(0.5, 2.0, kind=kind, local_loss=bool(local), spec=SPEC_TWO)
        loss = loss_fn(*model(images, texts), teacher_image=t_img, teacher_text=t_txt)
        loss.backward()
        torch.testing.assert_close(got[f"{case}/loss"][0], loss.detach(), rtol=1e-5, atol=1e-6)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert {k.split("/", 2)[2] for k in got if k.startswith(f"{case}/grad/")} == set(grads)
        for name, grad in grads.items():
            want = got[f"{case}/grad/{name}"]
            torch.testing.assert_close(want, grad, rtol=1e-4, atol=1e-6, msg=f"{case} {name}")


def test_distill_config_from_recipes_and_its_bad_values(tmp_path):
    cfg = load_run_config(
        "cpu-debug", ["data.shards=/d", "loss.distill.weight=0.25", "loss.distill.temperature=2"]
    )
    assert cfg.loss.distill == DistillConfig(weight=0.25, temperature=2.0)
    assert load_run_config("cpu-debug", ["data.shards=/d"]).loss.distill.weight == 0.0
    bad = [
        ("loss.distill.weight=1.5", r"loss.distill.weight must be in \[0, 1\]"),
        ("loss.distill.temperature=0", "loss.distill.temperature must be > 0, got 0.0"),
        ("loss.distill.teacher_precision=fp16", r"loss.distill.teacher_precision: 'fp16'"),
        ("loss.distill.wieght=0.5", r"unknown config key\(s\) \['loss.distill.wieght'\]"),
    ]
    for override, message in bad:
        with pytest.raises(ValueError, match=message):
            load_run_config("cpu-debug", ["data.shards=/d", override])


# ------------------------------------------------------------------------- online teacher

# A teacher that differs from the micro student in everything the student's batch fixes:
# embedding width, context length, image normalisation (and, in the CLI run, image size).
TEACHER_CFG = {
    **MICRO_CFG,
    "embed_dim": 24,
    "text_cfg": {**MICRO_CFG["text_cfg"], "context_length": 24},
}
TEACHER_NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def _export_teacher(out: Path, image_size: int = 32) -> Path:
    torch.manual_seed(7)
    cfg = {**TEACHER_CFG, "vision_cfg": {**TEACHER_CFG["vision_cfg"], "image_size": image_size}}
    teacher = DualEncoder(cfg, TEACHER_NORM)
    export(teacher, out, format="clipline", run_config={"model": {"name": "custom"}})
    return out


def test_online_teacher_features_equal_the_exports_own_encoders(tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, per_shard=16)
    path = _export_teacher(tmp_path / "teacher")
    student = micro_model()
    cfg = StreamConfig(shards=str(shards), batch_size=4, workers=0, shuffle_buffer=8)
    loader = micro_loader(cfg)
    raw = next(iter(loader.epoch(0)))  # uint8 pixels and caption strings
    # As the loop gets it: normalised for the student (what data.loader.ModelReady does)
    ready = dict(raw, image=loader.stream.decoder.model_input(raw["image"]))

    teacher = OnlineTeacher(str(path))
    teacher.complete([ready], student.preprocess_config())
    assert teacher.spec.dims == [24]
    own = load_exported(*find_export(path))
    assert teacher.spec.logit_scales == [pytest.approx(float(own.logit_scale.detach().exp()))]
    mean, std = (torch.tensor(v)[:, None, None] for v in TEACHER_NORM.values())
    with torch.no_grad():
        want_img = own.encode_image((raw["image"].float() / 255 - mean) / std)
        want_txt = own.encode_text(own.tokenize(raw["caption"]))
    torch.testing.assert_close(ready["teacher_image"], want_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ready["teacher_text"], want_txt)
    encoders = teacher.encoders
    assert not encoders.training and not any(p.requires_grad for p in encoders.parameters())


def _clipline(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "clipline", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_training_with_an_online_teacher_through_the_cli(tmp_path):
    """A teacher export with another size, normalisation, width and tokenizer length, named
    by a relative path: training runs, logs both terms, and no checkpoint holds the teacher
    (weights or optimizer state). A missing teacher stops the start with one line."""
    shards = make_shards(tmp_path / "shards", n=32, per_shard=16)
    _export_teacher(tmp_path / "teacher", image_size=48)
    recipe = micro_recipe(shards, tmp_path / "run", steps=3, checkpoint_every=3, accum_steps=2)
    recipe["loss"] = {"distill": {"weight": 0.5, "teacher": "teacher", "temperature": 2.0}}
    (tmp_path / "r.toml").write_text(to_toml(recipe))
    res = _clipline("pretrain", "--recipe", "r.toml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/loss" in r][-1]
    mixed = 0.5 * last["train/loss_contrastive"] + 0.5 * last["train/loss_distill"]
    assert last["train/loss"] == pytest.approx(mixed, rel=1e-5)
    (ckpt,) = list_checkpoints(tmp_path / "run")
    student = micro_model()
    assert set(consolidated_state(ckpt)) == set(student.state_dict())
    optim = consolidated_state(ckpt, "optim")["state"]
    assert len(optim) == sum(p.requires_grad for p in student.parameters())

    missing = ["loss.distill.teacher=nowhere", "run_dir=run2"]
    res = _clipline("pretrain", "--recipe", "r.toml", *missing, cwd=tmp_path)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "loss.distill.teacher='nowhere' does not exist" in err[0], err
