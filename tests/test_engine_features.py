"""Loop features: torch.compile, MFU from counted FLOPs, W&B logging."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch
from accelerate.state import AcceleratorState
from torch.utils.flop_counter import FlopCounterMode

import clipline.launch.run as run
from clipline.launch.config import load_run_config
from clipline.pretrain.checkpoint import consolidated_state, list_checkpoints
from clipline.pretrain.flops import _tokens, count_model_flops
from clipline.pretrain.loss import InfoNCELoss, LossConfig
from clipline.pretrain.model import DualEncoder, ModelConfig
from tests.helpers import MICRO_CFG, make_shards, micro_model, micro_recipe


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n=48, per_shard=16)


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_compiled_training_equals_eager(tmp_path, shards, monkeypatch):
    # aot_eager traces and runs the same graphs as Inductor without a C++ toolchain; GPU runs
    # use Inductor (COMPILE_BACKEND).
    monkeypatch.setattr(run, "COMPILE_BACKEND", "aot_eager")
    results = {}
    for compile_ in (False, True):
        run_dir = tmp_path / f"compile_{compile_}"
        cfg = load_run_config(micro_recipe(shards, run_dir, steps=3, compile=compile_))
        run.run_pretrain(cfg)
        AcceleratorState._reset_state(reset_partial_state=True)
        results[compile_] = (_rows(run_dir), list_checkpoints(run_dir)[-1])
    for eager, compiled in zip(results[False][0], results[True][0], strict=True):
        assert compiled["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-5)
    eager_w = consolidated_state(results[False][1])
    compiled_w = consolidated_state(results[True][1])
    assert compiled_w.keys() == eager_w.keys()  # no "_orig_mod." in checkpoints
    for k in eager_w:
        torch.testing.assert_close(compiled_w[k], eager_w[k], rtol=1e-4, atol=1e-5)


def test_text_flops_are_exact_for_any_caption_length():
    model = micro_model()
    flops = count_model_flops(model)
    for length in (3, 7, 16):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.encode_text(_tokens(length))  # 2 captions
        assert 2 * flops.text(length) == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_train_step_flops_match_a_counted_forward_and_backward():
    model = micro_model()
    flops = count_model_flops(model)
    images = torch.randn(4, 3, 32, 32)
    texts = _tokens(9).repeat(2, 1)
    with FlopCounterMode(display=False) as counter:
        InfoNCELoss(LossConfig())(*model(images, texts)).backward()
    # 3x forward is the usual estimate (backward = 2x forward). It overcounts by what needs
    # no gradient: the patch embedding's input gradient, a large share of this 1-layer model
    # (about 1% of a ViT-B's backward).
    counted = counter.get_total_flops()
    assert counted < flops.train_step([(4, 9)]) < 1.2 * counted


def test_locked_image_tower_costs_one_forward():
    cfg = ModelConfig(name="custom", config=MICRO_CFG, lock_image=True)
    flops = count_model_flops(DualEncoder.from_config(cfg))
    assert not flops.image_backward
    assert flops.train_step([(2, 5)]) == pytest.approx(2 * (flops.image + 3 * flops.text(5)))


class _FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records init/log/finish calls."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        self.util = types.SimpleNamespace(generate_id=lambda: "abc123")

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def finish(self):
        self.finished += 1


def test_metrics_reach_wandb_with_mfu_and_a_stable_run_id(tmp_path, shards, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "run"
    recipe = micro_recipe(shards, run_dir, steps=2, wandb_project="clip", peak_tflops=0.5)
    run.run_pretrain(load_run_config(recipe))
    assert fake.inits[0]["project"] == "clip" and fake.inits[0]["id"] == "abc123"
    assert fake.inits[0]["config"]["loop"]["steps"] == 2  # the resolved run config
    step, metrics = fake.logged[-1]
    assert step == 2 and fake.finished == 1
    for key in ("train/samples_per_s", "train/data_wait_share", "train/peak_memory_mb"):
        assert metrics[key] >= 0
    assert metrics["train/mfu"] == pytest.approx(metrics["train/tflops_per_device"] / 0.5)
    assert _rows(run_dir)[-1]["train/mfu"] == metrics["train/mfu"]  # same numbers as JSONL

    AcceleratorState._reset_state(reset_partial_state=True)
    fake.util.generate_id = lambda: "other"  # a resumed run continues the same W&B run
    recipe["loop"]["steps"] = 3
    run.run_pretrain(load_run_config(recipe), resume="latest")
    assert fake.inits[1]["id"] == "abc123" and fake.inits[1]["resume"] == "allow"


def test_wandb_missing_is_a_clear_error(tmp_path, shards, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    recipe = micro_recipe(shards, tmp_path / "run", steps=2, wandb_project="clip")
    with pytest.raises(ValueError, match="pip install wandb"):
        run.run_pretrain(load_run_config(recipe))


def test_counting_flops_leaves_the_model_as_it_was():
    # BatchNorm statistics (timm ResNet), the mode and the RNG are untouched by the count.
    cfg = ModelConfig(name="custom", config=MICRO_CFG, image_tower="timm:resnet18")
    model = DualEncoder.from_config(cfg).eval()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    assert count_model_flops(model).image > 0
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=0, atol=0, msg=name)


def test_cpu_training_serves_large_blocks_from_the_heap():
    # glibc maps a block over its mmap threshold afresh (and unmaps it when freed), so its
    # pages fault in again every step; after keep_freed_memory() it comes from the heap,
    # which is never trimmed. malloc_info() counts the mmapped blocks. (The step-level
    # effect, 12k-35k faults per step down to 0, is measured in tests/benchmarks.)
    code = """
import ctypes, os, re, tempfile, torch
from clipline.pretrain.host_memory import keep_freed_memory
libc = ctypes.CDLL(None)
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
def mmapped_blocks():
    fd, path = tempfile.mkstemp()
    os.close(fd)
    f = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    text = open(path).read()
    os.unlink(path)
    return int(re.findall(r'<total type="mmap" count="([0-9]+)"', text)[-1])
def blocks_for_a_40_mb_tensor():
    before = mmapped_blocks()
    x = torch.ones(10 << 20)
    return mmapped_blocks() - before
assert blocks_for_a_40_mb_tensor() == 1
assert keep_freed_memory()
assert blocks_for_a_40_mb_tensor() == 0
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
