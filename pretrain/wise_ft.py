"""WiSE-FT: weight-space ensembles of a zero-shot model and its fine-tuned descendant.

Wortsman et al., "Robust fine-tuning of zero-shot models" (CVPR 2022): the weights
``theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned`` keep most of the
fine-tuned model's gain on its task and most of the zero-shot model's robustness elsewhere.
As in the paper's reference code (``mlfoundations/wise-ft``, ``src/wise_ft.py``), every
tensor of the state dict is interpolated with the same alpha, the temperature included:
clipline's ``logit_scale`` (like open_clip's) is the logarithm of the inverse temperature,
so that is what is interpolated linearly (and ``logit_bias`` for SigLIP models).

Two departures from the reference, both for exactness:

* Tensors that are not floating point (integer position ids, BatchNorm's
  ``num_batches_tracked``, boolean masks) are copied from the nearer endpoint, not
  interpolated (the reference would write a float into them and truncate).
* ``alpha == 0`` and ``alpha == 1`` copy the endpoint, bit for bit (``1 * x + 0 * y`` is
  not ``x`` for ``x = -0.0``, nor for an ``inf`` or ``nan`` in ``y``).

Pure weights logic: the models come in built; reading them from paths, evaluating and
exporting is the wiring's (:mod:`clipline.launch.wise_ft`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from clipline.pretrain.export_base import PARITY_CAPTIONS, tokenizer_info
from clipline.pretrain.model import DualEncoder

log = logging.getLogger(__name__)

# Model-config keys that say where files are or how training ran, not what the model
# computes: an HF text tower's config and tokenizer folder (each export bundles its own
# copy, so two exports of one model name two folders; the tokenizer is compared by its
# output and the tower by its tensors instead), and FLIP's patch dropout (training only).
_NOT_ARCHITECTURE = {"hf_model_name", "hf_tokenizer_name", "patch_dropout"}
_MAX_LISTED = 8  # differences named in the error; the rest are counted


def interpolate(
    theta_0: Mapping[str, Tensor],
    theta_1: Mapping[str, Tensor],
    alpha: float,
    *,
    out: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``(1 - alpha) * theta_0 + alpha * theta_1``, tensor by tensor.

    Floating-point tensors are interpolated in their own precision (half and bfloat16 ones
    in float32, then rounded back); other tensors are copied from ``theta_0`` for
    ``alpha < 0.5`` and from ``theta_1`` otherwise. ``alpha`` 0 and 1 return exact copies
    of the endpoints. Values outside [0, 1] extrapolate.

    Args:
        theta_0: The zero-shot state dict.
        theta_1: The fine-tuned state dict (the same keys, shapes and dtypes).
        alpha: The weight of ``theta_1``.
        out: Tensors to write the result into (e.g. a working model's ``state_dict()``,
            whose tensors share the parameters' storage), so that one copy of the weights
            serves every alpha; new tensors when None.

    Returns:
        The interpolated state dict (``out``'s tensors when given).
    """
    result = {}
    for key, t0 in theta_0.items():
        t1 = theta_1[key]
        target = torch.empty_like(t0) if out is None else out[key]
        if alpha == 0.0 or (not t0.is_floating_point() and alpha < 0.5):
            target.copy_(t0)
        elif alpha == 1.0 or not t0.is_floating_point():
            target.copy_(t1)
        else:
            dtype = torch.promote_types(t0.dtype, torch.float32)
            target.copy_((1 - alpha) * t0.to(dtype) + alpha * t1.to(dtype))
        result[key] = target
    return result


def architecture_differences(zero_shot: DualEncoder, finetuned: DualEncoder) -> list[str]:
    """What stops the two models from being interpolated: model config, preprocessing,
    tokenizer, and state-dict keys, shapes and dtypes (an empty list: none)."""
    found = [
        f"{what} {path}: {a!r} vs {b!r}"
        for what, cfg_0, cfg_1 in (
            ("model config", zero_shot.model_cfg, finetuned.model_cfg),
            ("preprocessing", zero_shot.preprocess_cfg, finetuned.preprocess_cfg),
        )
        for path, a, b in _dict_differences(_as_json(cfg_0), _as_json(cfg_1))
    ]
    tok_0, tok_1 = tokenizer_info(zero_shot), tokenizer_info(finetuned)
    tokenizer = [
        f"tokenizer {path}: {a!r} vs {b!r}"
        for path, a, b in _dict_differences(tok_0, tok_1)
        if path != "name" or tok_0["type"] != "hf"  # an HF tokenizer's folder: compared below
    ]
    if not tokenizer and not torch.equal(
        zero_shot.tokenizer(PARITY_CAPTIONS), finetuned.tokenizer(PARITY_CAPTIONS)
    ):
        tokenizer.append("tokenizer: the same captions become different token ids")
    found += tokenizer
    sd_0, sd_1 = zero_shot.clip.state_dict(), finetuned.clip.state_dict()
    found += [f"tensor {k}: only in the zero-shot model" for k in sd_0.keys() - sd_1.keys()]
    found += [f"tensor {k}: only in the fine-tuned model" for k in sd_1.keys() - sd_0.keys()]
    for key in sd_0.keys() & sd_1.keys():
        t0, t1 = sd_0[key], sd_1[key]
        if t0.shape != t1.shape:
            found.append(f"tensor {key}: shape {list(t0.shape)} vs {list(t1.shape)}")
        elif t0.dtype != t1.dtype:
            found.append(f"tensor {key}: dtype {t0.dtype} vs {t1.dtype}")
    return sorted(found)


def check_same_architecture(
    zero_shot: DualEncoder,
    finetuned: DualEncoder,
    *,
    names: tuple[str, str] = ("the zero-shot model", "the fine-tuned model"),
) -> None:
    """Raises ValueError naming every difference that :func:`architecture_differences`
    finds (the first few, and how many more), with ``names`` saying which models."""
    found = architecture_differences(zero_shot, finetuned)
    if not found:
        return
    more = f"; and {len(found) - _MAX_LISTED} more" if len(found) > _MAX_LISTED else ""
    raise ValueError(
        f"{names[0]} and {names[1]} are not one architecture, so their weights cannot be "
        f"interpolated ({len(found)} differences, zero-shot vs fine-tuned: "
        f"{'; '.join(found[:_MAX_LISTED])}{more}); give the model the fine-tuning started "
        "from and the fine-tuned model"
    )


class WeightSpaceEnsemble:
    """The two endpoints' weights and one working model that every alpha is written into.

    Memory: three copies of the weights whatever the number of alphas (the zero-shot and
    fine-tuned state dicts, and the working model, which is ``zero_shot`` itself).

    Args:
        zero_shot: The model the fine-tuning started from; becomes the working model.
        finetuned: The fine-tuned model (only its weights are kept).
        names: How errors name the two models (e.g. their paths).

    Raises:
        ValueError: The two are not one architecture (see :func:`check_same_architecture`).
    """

    def __init__(
        self,
        zero_shot: DualEncoder,
        finetuned: DualEncoder,
        *,
        names: tuple[str, str] = ("the zero-shot model", "the fine-tuned model"),
    ) -> None:
        check_same_architecture(zero_shot, finetuned, names=names)
        self.theta_0 = {k: v.detach().clone() for k, v in zero_shot.clip.state_dict().items()}
        self.theta_1 = finetuned.clip.state_dict()  # detached views: the weights, not the module
        self.model = zero_shot

    def at(self, alpha: float) -> DualEncoder:
        """The working model with the weights of ``alpha`` (overwriting the last alpha's)."""
        with torch.no_grad():
            interpolate(self.theta_0, self.theta_1, alpha, out=self.model.clip.state_dict())
        return self.model


def _as_json(cfg: dict[str, Any]) -> Any:
    # A config read from JSON has lists where one built in Python may have tuples.
    return json.loads(json.dumps(cfg))


def _dict_differences(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted.path, a_value, b_value)`` where two nested config dicts differ."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [(path or "(value)", a, b)]
    found = []
    for key in sorted(a.keys() | b.keys()):
        if key in _NOT_ARCHITECTURE:
            continue
        sub = f"{path}.{key}" if path else key
        if key not in a or key not in b:
            found.append((sub, a.get(key, "(absent)"), b.get(key, "(absent)")))
        else:
            found += _dict_differences(a[key], b[key], sub)
    return found
