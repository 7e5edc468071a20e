"""Loading weights without running code: safetensors, or ``torch.load(weights_only=True)``.

A pickle (``torch.save``'s default, ``.pt``/``.bin``/``.pth`` files) can run any code when it
is loaded. clipline reads weights only from safetensors files, and the optimizer state of its
own checkpoints with ``weights_only=True``. Anything else is refused with one
``ValueError`` naming the file and what it is instead, before a byte of it is unpickled.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header's size


def _what_it_is(head: bytes) -> str:
    """A guess at what a file that is not safetensors is, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "a torch.save zip archive (a pickle inside)"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"c"):
        return "a Python pickle"
    return "not a safetensors file"


def check_safetensors(path: str | Path, what: str = "weights") -> None:
    """Refuses a file that does not start like a safetensors file, without reading the rest.

    A safetensors file starts with an 8-byte little-endian header length, then that many
    bytes of JSON.

    Raises:
        ValueError: one line naming ``path``, what it looks like and the fix.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    size = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if 0 < size <= min(_HEADER_LIMIT, path.stat().st_size - 8) and head[8:9] == b"{":
        return
    raise ValueError(
        f"{what} {str(path)!r} is {_what_it_is(head)}: clipline loads weights only from "
        "safetensors files, because unpickling can run arbitrary code; convert it where you "
        "trust it (safetensors.torch.save_file(torch.load(f, weights_only=True), "
        "'x.safetensors')) and point clipline at the .safetensors file"
    )


def load_safetensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; anything else is refused unread.

    Raises:
        ValueError: one line naming ``path`` and why (a pickle, a damaged file).
    """
    check_safetensors(path, what)
    try:
        return load_file(path)
    except (SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{what} {str(path)!r} is a damaged safetensors file ({_one_line(e)}); "
            "write it again (a copy cut short?)"
        ) from e


def load_weights_only(path: str | Path, what: str = "state", **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain types, never code.

    Raises:
        ValueError: one line naming ``path`` when it holds anything else (a pickle of
            arbitrary objects is refused before any of them is built).
    """
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except RuntimeError as e:
        # A damaged archive is a RuntimeError from torch's zip reader; others (out of
        # memory, a map_location device) are not about the file and pass through.
        if "zip" not in str(e).lower():
            raise
        raise ValueError(_refused(path, what, e)) from e
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(_refused(path, what, e)) from e


def _refused(path: str | Path, what: str, e: BaseException) -> str:
    return (
        f"{what} {str(path)!r} was refused: it is not a weights-only torch file "
        f"({_one_line(e)}); clipline writes only tensors and plain types there, so the "
        "file was replaced or damaged: restore it from the run, or resume from another "
        "checkpoint"
    )


def _one_line(e: BaseException) -> str:
    """The line of an exception's message that says why (torch's run over many lines and
    start with advice to load the file unsafely, which we do not repeat)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    boilerplate = ("Check the documentation", "Please file an issue")
    reasons = [line for line in lines[1:] if not line.startswith(boilerplate)]
    reason = reasons[0] if reasons else (lines[0] if lines else "")
    return f"{type(e).__name__}: {reason}"[:300]
