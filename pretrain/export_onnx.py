"""ONNX format: one graph per tower, each returning L2-normalised embeddings.

An ONNX export directory holds:
  image.onnx          image f32[B, 3, H, W] (preprocessed) -> image_embeds f32[B, D]
  text.onnx           text i64[B, L] (open_clip token ids) -> text_embeds f32[B, D]
  onnx_export.json    preprocessing, tokenizer, embedding dim, logit scale, the graphs' I/O

B is dynamic. L is dynamic up to the context length when the text tower is causal and pooled
at the end-of-text token (then a batch may be cut after its longest caption, as clipline
does); otherwise it is fixed to the context length. Graphs over 2 GB keep their weights in
``*.onnx.data`` files beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from clipline.data.preprocess import PreprocessConfig
from clipline.pretrain.export_base import (
    EXPORT_FORMATS,
    ExportFormat,
    check_parity,
    parity_inputs,
    tokenizer_info,
)
from clipline.pretrain.model import DualEncoder, Tokenize, open_clip_preprocess_config

FORMAT = "clipline-onnx"
VERSION = 1
META_FILE = "onnx_export.json"
IMAGE_FILE = "image.onnx"
TEXT_FILE = "text.onnx"
FILES = (META_FILE, IMAGE_FILE, TEXT_FILE)  # the first marks an export folder
REQUIRES = ("onnx", "onnxruntime")  # the export extra: imported where used


class _ImageTower(nn.Module):
    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image_BCHW)


class _TextTower(nn.Module):
    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, text_BL: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text_BL)


def export_onnx(model: DualEncoder, out_dir: str | Path) -> Path:
    """Writes ``model`` as two ONNX graphs and checks onnxruntime reproduces it (atol 1e-5).

    Args:
        model: The dual encoder (unwrapped, in eval mode).
        out_dir: Output folder (created if needed).
    """
    import onnx  # an optional extra (clipline[export]), imported where used

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images_BCHW, text_BL = (t.to(model.device) for t in parity_inputs(model, batch=2))
    batch = torch.export.Dim("batch", min=1)
    dynamic_length = model.tokenize.trim
    text_axes = {0: batch}
    if dynamic_length:
        # Traced on a shorter batch, so that the graph is the trimmed path for every L.
        text_BL = text_BL[:, : model.context_length - 1]
        text_axes[1] = torch.export.Dim("length", min=2, max=model.context_length)
    with torch.no_grad():
        _export(_ImageTower(model), images_BCHW, out / IMAGE_FILE, "image", {0: batch})
        _export(_TextTower(model), text_BL, out / TEXT_FILE, "text", text_axes)
    opset = {op.domain or "ai.onnx": op.version for op in onnx.load(out / TEXT_FILE).opset_import}
    size = model.preprocess_cfg["size"]
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "embed_dim": model.embed_dim,
        "preprocess": model.preprocess_cfg,
        "tokenizer": tokenizer_info(model),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
        "image": {
            "file": IMAGE_FILE,
            "input": {"name": "image", "dtype": "float32", "shape": ["B", 3, *_hw(size)]},
            "output": {"name": "image_embeds", "dtype": "float32", "shape": ["B", model.embed_dim]},
        },
        "text": {
            "file": TEXT_FILE,
            "input": {
                "name": "text",
                "dtype": "int64",
                "shape": ["B", "L" if dynamic_length else model.context_length],
                "max_length": model.context_length,
            },
            "output": {"name": "text_embeds", "dtype": "float32", "shape": ["B", model.embed_dim]},
        },
        "opset": opset,
        "model_cfg": model.model_cfg,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))

    reloaded = OnnxEncoders(out)
    check_parity(
        model,
        reloaded.encode_image,
        reloaded.encode_text,
        what=f"ONNX export {out}",
        atol=1e-5,
    )
    return out


def _hw(size: int | list[int]) -> list[int]:
    return [size, size] if isinstance(size, int) else list(size)


def _export(tower: nn.Module, example: torch.Tensor, path: Path, name: str, axes: dict) -> None:
    program = torch.onnx.export(
        tower.eval(),
        (example,),
        dynamo=True,
        input_names=[name],
        output_names=[f"{name}_embeds"],  # "embedding" would collide with a node name
        dynamic_shapes=(axes,),
        verbose=False,
    )
    program.save(path)


class OnnxEncoders:
    """An ONNX export run by onnxruntime, behind clipline's encoders protocol.

    ``encode_image`` / ``encode_text`` take torch tensors or numpy arrays and return
    L2-normalised float32 torch tensors, so clipline's evaluators can score the export.
    """

    def __init__(self, export_dir: str | Path, providers: list[str] | None = None):
        import onnxruntime as ort  # an optional extra (clipline[export]), imported where used

        export_dir = Path(export_dir)
        path = export_dir / META_FILE
        if not path.is_file():
            raise ValueError(f"{export_dir} is not an ONNX export: {META_FILE} is missing")
        self.meta: dict[str, Any] = json.loads(path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise ValueError(
                f"{path}: format {self.meta.get('format')!r} v{self.meta.get('version')} is not "
                f"{FORMAT!r} v{VERSION}; re-export it with this clipline version"
            )
        providers = providers or ["CPUExecutionProvider"]
        self.image = ort.InferenceSession(export_dir / IMAGE_FILE, providers=providers)
        self.text = ort.InferenceSession(export_dir / TEXT_FILE, providers=providers)
        self.embed_dim = int(self.meta["embed_dim"])
        self.tokenize = self._tokenize()

    def _tokenize(self) -> Tokenize:
        """open_clip's tokenizer as the graph expects it (cut after the longest caption only
        when the text graph's length is dynamic, which is when cutting is exact)."""
        info = self.meta["tokenizer"]
        if info["type"] != "open_clip_bpe":
            raise ValueError(
                f"this ONNX export's tokenizer is {info['type']!r} ({info['name']}), which the "
                "export does not bundle; evaluate or embed with the clipline export instead"
            )
        tokenizer = SimpleTokenizer(context_length=info["context_length"])
        trim = self.meta["text"]["input"]["shape"][1] == "L"
        return Tokenize(tokenizer=tokenizer, pad_id=info["pad_id"], trim=trim)

    def preprocess_config(self) -> PreprocessConfig:
        """The export's image input as plain numbers, what the evaluators take (as a
        :class:`DualEncoder` gives it)."""
        return open_clip_preprocess_config(self.meta["preprocess"])

    def image_transform(self, is_train: bool = False):
        """open_clip's eval transform with the export's preprocessing (training: none)."""
        if is_train:
            raise ValueError("an ONNX export only embeds; train from a checkpoint")
        return image_transform_v2(PreprocessCfg(**self.meta["preprocess"]), is_train=False)

    def encode_image(self, image_BCHW: torch.Tensor | np.ndarray) -> torch.Tensor:
        image = np.asarray(torch.as_tensor(image_BCHW).cpu(), dtype=np.float32)
        return torch.from_numpy(self.image.run(None, {"image": image})[0])

    def encode_text(self, text_BL: torch.Tensor | np.ndarray) -> torch.Tensor:
        text = np.asarray(torch.as_tensor(text_BL).cpu(), dtype=np.int64)
        return torch.from_numpy(self.text.run(None, {"text": text})[0])


def load_onnx(export_dir: str | Path, providers: list[str] | None = None) -> OnnxEncoders:
    """Opens an ONNX export with onnxruntime (CPU unless ``providers`` says otherwise)."""
    return OnnxEncoders(export_dir, providers)


def _read(export_dir: Path, device: str | torch.device = "cpu") -> OnnxEncoders:
    """The export as encoders: onnxruntime on CUDA where ``device`` is a CUDA device and
    onnxruntime has CUDA, else on the CPU."""
    import onnxruntime

    gpu = str(device).startswith("cuda")
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return load_onnx(export_dir, ["CUDAExecutionProvider"] if gpu and cuda else None)


def _write(model: DualEncoder, out: Path, **_: Any) -> Path:
    return export_onnx(model, out)


EXPORT_FORMATS.add("onnx", ExportFormat(write=_write, read=_read, files=FILES, requires=REQUIRES))
