"""Model FLOPs per sample and model FLOPs utilisation (MFU).

The FLOPs are counted, not guessed: torch's ``FlopCounterMode`` runs one forward of each
tower on a single sample, so the figure holds for any tower (open_clip ViT, timm, HF) and
includes FLIP's patch dropout. The text tower's cost depends on the caption length ``L``
(batches are trimmed to their longest caption), and a transformer's cost is exactly
``a + b·L + c·L²`` (projections and MLPs are linear in L, attention scores quadratic), so
three counts fix it for every length.

Per optimizer step, with ``F_img`` and ``F_txt(L)`` the forward FLOPs of one sample:

    model FLOPs = Σ_micro-batches B · (k_img · F_img + 3 · F_txt(L))

where the factor 3 is forward + backward (the backward costs twice the forward), and
``k_img`` is 1 for a locked image tower (LiT: no backward through it) and 3 otherwise.
The extra no-grad forward of contrastive gradient accumulation is recomputation, so like
activation checkpointing it is not counted (MFU, not hardware FLOPs utilisation).

    MFU = model FLOPs per second per device / peak FLOPs per device

The peak is the dense tensor-core figure of the device for the training precision
(``PEAK_TFLOPS``), or ``loop.peak_tflops`` where the device is not listed (e.g. a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipline.pretrain.model import DualEncoder

# Dense (no sparsity) peak TFLOP/s by device-name substring, first match wins; from the
# vendors' data sheets. "fp32" is plain fp32; "tf32" applies when TF32 matmuls are allowed.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.2, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
]


def peak_tflops(device: torch.device, mixed_precision: str) -> float | None:
    """The device's dense peak for this precision, or None when it is not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    precision = mixed_precision if mixed_precision in ("bf16", "fp16") else "fp32"
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    for key, table in PEAK_TFLOPS:
        if key in name:
            return table[precision]
    return None


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs of one sample: the image tower, and the text tower as a + b·L + c·L²."""

    image: float
    text_coeffs: tuple[float, float, float]
    image_backward: bool

    def text(self, length: int) -> float:
        a, b, c = self.text_coeffs
        return a + b * length + c * length * length

    def train_step(self, micro_batches: list[tuple[int, int]]) -> float:
        """Model FLOPs of one optimizer step over (batch size, text length) micro-batches."""
        k_img = 3 if self.image_backward else 1
        return sum(b * (k_img * self.image + 3 * self.text(length)) for b, length in micro_batches)


def count_model_flops(model: DualEncoder) -> ModelFlops:
    """Counts per-sample forward FLOPs in train mode (patch dropout included).

    Runs on the model itself, not a copy (a copy would double host memory on every rank of
    a large model); its buffers (e.g. BatchNorm statistics), mode and the RNG are restored.
    """
    size = model.preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    context = model.context_length
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.train()
            # Two samples, halved: BatchNorm in train mode needs more than one value per channel.
            image = _count(lambda: model.encode_image(torch.zeros(2, 3, height, width))) / 2
            lengths = (context, max(2, context // 2), max(1, context // 4))
            if not model.tokenize.trim:  # fixed length: the fit is a constant
                lengths = (context, context, context)
            counts = [_count(lambda n=n: model.encode_text(_tokens(n))) / 2 for n in lengths]
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
    if len(set(lengths)) < 3:
        coeffs = (float(counts[0]), 0.0, 0.0)
    else:
        vandermonde = torch.tensor([[1.0, n, n * n] for n in lengths], dtype=torch.float64)
        coeffs = torch.linalg.solve(vandermonde, torch.tensor(counts, dtype=torch.float64))
        coeffs = tuple(float(c) for c in coeffs)
    trains_image = any(p.requires_grad for p in model.clip.visual.parameters())
    return ModelFlops(image=float(image), text_coeffs=coeffs, image_backward=trains_image)


def _tokens(length: int) -> torch.Tensor:
    """A 2 x length batch whose last token has the largest id (where EOT pooling looks)."""
    text_2L = torch.ones(2, length, dtype=torch.long)
    text_2L[:, -1] = 2
    return text_2L
