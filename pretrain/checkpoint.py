"""Checkpoints: ``run_dir/checkpoints/step_000123/``, sharded with torch.distributed.checkpoint.

Layout of one checkpoint:
  dcp/.metadata       DCP's index of the tensors below (which rank wrote which slice)
  dcp/__R_0.distcp    rank R's part: its shards of the model and of the optimizer state
                      (``model.*``, ``optim.*``) and of any extra state (``ema.*``, ...);
                      under DDP the replicated tensors are written once, spread over ranks
  state.json          step, epoch and counters of the loop; "stream": each rank's stream
                      position (epoch, per-worker list positions; data.loader.TrainLoader)
  config.json         the resolved run config

Every rank writes its own part (``get_state_dict(full_state_dict=False)``: no rank ever
holds the full optimizer state); the parts are written into ``step_N.tmp`` and the
directory is renamed into place by rank 0 after DCP committed ``.metadata`` and every file
is on disk, so a process killed while saving never leaves a directory that
``resume="latest"`` would pick. The run directory must be on a filesystem every rank sees.
With ``loop.async_checkpoint`` (:class:`AsyncCheckpointWriter`) the ranks copy their parts
to host memory and training goes on while DCP writes them; the rename waits for the write.

A checkpoint resumes on any number of ranks: DCP plans the reads of each rank's shards from
the saved slices (resharding). One process reads the whole model back with DCP's own
no-process-group load (:func:`consolidated_state`) for export and eval.

Unpickling: DCP's ``.metadata`` is a pickle. It is read here by :class:`_SafeReader`, whose
unpickler builds only DCP's metadata classes and torch's size/dtype types (anything else is
refused); the non-tensor values of the state (optimizer step counts, hyper-parameters) are
read by DCP itself with ``torch.load(weights_only=True)``, the tensors as raw bytes.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
DCP_DIR = "dcp"
# Each rank's own shards (DTensor under FSDP2, the local replica under DDP): never gathered.
_SHARDED = StateDictOptions(full_state_dict=False)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


class ModelState(Stateful):
    """A (wrapped) model's sharded state for DCP: saved and loaded in place on every rank."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=_SHARDED)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=_SHARDED)


class OptimizerState(Stateful):
    """An optimizer's sharded state keyed by parameter name (so it reshards with the model)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=_SHARDED)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=_SHARDED)


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Stateful] | None = None,
) -> dict[str, Stateful]:
    """What a checkpoint holds: ``model``, ``optim`` and ``extra`` (e.g. ``{"ema": ...}``),
    each a :class:`Stateful` whose ``state_dict()`` is a (nested) dict of tensors and plain
    values, sharded or not."""
    extra = extra or {}
    clash = {"model", "optim"} & set(extra)
    assert not clash, f"extra checkpoint state may not be named {clash}"
    return {"model": ModelState(model), "optim": OptimizerState(model, optimizer), **extra}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns that it assumes one process whenever no process group exists: meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _begin_save(run_dir: str | Path, step: int) -> tuple[Path, Path]:
    """Rank 0 clears what killed saves left and makes ``step_N.tmp``; returns (tmp, final).
    A collective (barrier): no rank writes before the directory exists."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:09d}"
    tmp = root / f"step_{step:09d}.tmp"
    if _is_main():
        for stale in root.glob("*.tmp"):  # left by a process killed while saving
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp, final


def _commit(
    run_dir: str | Path,
    tmp: Path,
    final: Path,
    *,
    step: int,
    state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
) -> None:
    """Rank 0, once DCP has written every rank's part and ``.metadata``: the JSON, then the
    rename that makes the checkpoint count, then keep-K over committed checkpoints."""
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    _fsync_tree(tmp)  # the rename is only atomic for data already on disk
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        # Out of the listing first: a kill mid-delete leaves a .tmp, not half a checkpoint.
        trash = old.with_name(old.name + ".tmp")
        os.replace(old, trash)
        shutil.rmtree(trash)
    log.info("saved checkpoint %s", final)


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    states: dict[str, Stateful],
    state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Writes checkpoint ``step`` and prunes old ones; a collective: call it on every rank.

    Args:
        run_dir: The run directory (shared by all ranks).
        step: The step just taken.
        states: From :func:`training_state`; each rank writes its own shards.
        state: The loop's small JSON state (rank 0's is written).
        config: The resolved run config.
        keep_last: Complete checkpoints kept (0: all).
    """
    tmp, final = _begin_save(run_dir, step)
    # A collective: every rank writes its shards; the coordinator writes .metadata last.
    with _single_process_ok():
        dcp.save(states, checkpoint_id=tmp / DCP_DIR, no_dist=not _distributed())
    if _is_main():
        _commit(run_dir, tmp, final, step=step, state=state, config=config, keep_last=keep_last)
    _barrier()
    return final


class AsyncCheckpointWriter:
    """``loop.async_checkpoint``: DCP's ``async_save`` writes a checkpoint while training
    goes on; at most one write is in flight, and it counts only once committed.

    :meth:`start` blocks while each rank copies its shards to host memory (DCP's default
    stager: one extra copy of the rank's state while the write is in flight), then DCP plans
    and writes them in a background thread, over a gloo process group of its own (the
    training's collectives would interleave with the thread's on a shared one; under NCCL
    it also needs a CPU backend). Rank 0 commits (:func:`_commit`: JSON, rename, keep-K)
    only after its future is done: DCP gathers every rank's write results before the
    coordinator writes ``.metadata``, so rank 0's future ends after all ranks wrote. Until
    then the directory is ``step_N.tmp``, which ``resume="latest"`` never picks.
    Create it on every rank (``new_group`` is a collective).
    """

    def __init__(self) -> None:
        self._group = dist.new_group(backend="gloo") if _distributed() else None
        if not _distributed():
            # DCP's thread warns that no process group exists on every save: meant here.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        self._future: Future | None = None
        self._pending_commit: Callable[[], None] | None = None

    def start(
        self, run_dir: str | Path, *, step: int, states: dict[str, Stateful], **commit: Any
    ) -> Path:
        """Finishes the write in flight (:meth:`wait`), then starts writing checkpoint
        ``step``; returns its final directory. A collective: call it on every rank.

        Args:
            run_dir, step, states: As :func:`save_checkpoint`.
            **commit: ``state``, ``config`` and ``keep_last`` of :func:`save_checkpoint`,
                written and applied when the write is committed.
        """
        self.wait()
        tmp, final = _begin_save(run_dir, step)
        self._future = dcp.async_save(
            states,
            checkpoint_id=tmp / DCP_DIR,
            process_group=self._group,
            no_dist=not _distributed(),
        )
        self._pending_commit = functools.partial(_commit, run_dir, tmp, final, step=step, **commit)
        return final

    def poll(self) -> None:
        """Commits the write in flight if it has finished; returns at once otherwise (no
        collective: call it as often as convenient, e.g. every step)."""
        if self._future is not None and self._future.done():
            self.wait()

    def wait(self) -> None:
        """Blocks until the write in flight (if any) has finished on every rank, and rank 0
        has committed it; no collective beyond DCP's own.

        Raises:
            torch.distributed.checkpoint.api.CheckpointException: the write failed on a
                rank (nothing is committed; its ``step_N.tmp`` is cleared by the next save).
        """
        future, commit = self._future, self._pending_commit
        self._future = self._pending_commit = None
        if future is None:
            return
        future.result()
        if _is_main():
            assert commit is not None
            commit()


def load_training_state(ckpt: Path, states: dict[str, Stateful]) -> None:
    """Restores ``states`` (from :func:`training_state`, after wrapping) in place on every
    rank, from a checkpoint written by any number of ranks; a collective."""
    with _single_process_ok():
        dcp.load(states, storage_reader=_reader(ckpt), no_dist=not _distributed())


def _reader(ckpt: Path) -> _SafeReader:
    """A reader whose metadata was checked here: DCP would wrap the refusal's ValueError
    into a multi-line ``CheckpointException``."""
    reader = _SafeReader(ckpt / DCP_DIR)
    reader.read_metadata()
    return reader


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's metadata is made of; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or (
            module == "torch" and name == "Size"
        ):
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        allowed = {
            ("collections", "OrderedDict"),
            ("builtins", "set"),
            ("torch.serialization", "_get_layout"),  # maps a name to a torch.layout only
            ("pathlib", "PosixPath"),  # the checkpoint_id DCP records; built from a str
            ("pathlib", "WindowsPath"),
        }
        if (module, name) in allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of DCP metadata")


class _SafeReader(FileSystemReader):
    """DCP's file reader with a restricted unpickler for ``.metadata`` (see module doc)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise ValueError(
                f"checkpoint metadata {str(path)!r} was refused ({type(e).__name__}: {e}); "
                "clipline's checkpoints hold only DCP metadata there, so the file was replaced "
                "or damaged: restore it from the run, or use another checkpoint"
            ) from e
        if not isinstance(metadata, Metadata):
            raise ValueError(f"checkpoint metadata {str(path)!r} is not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _is_checkpoint(path: Path) -> bool:
    return (path / DCP_DIR / ".metadata").is_file() and (path / "state.json").is_file()


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """Maps ``resume`` (None, ``latest``, or a checkpoint path) to a checkpoint directory.

    Raises:
        ValueError: an explicit path that is not a checkpoint directory.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not _is_checkpoint(path):
        raise ValueError(
            f"resume={resume!r} is not a checkpoint directory (no {DCP_DIR}/.metadata and "
            f"state.json); pass 'latest' or one of {[str(p) for p in list_checkpoints(run_dir)]}"
        )
    return path


def saved_parts(ckpt: Path) -> set[str]:
    """The top-level parts (``model``, ``optim``, ``ema``, ...) a checkpoint holds, from its
    DCP metadata (read by the restricted reader)."""
    return {key.split(".", 1)[0] for key in _reader(ckpt).read_metadata().state_dict_metadata}


def consolidated_state(ckpt: Path, key: str = "model") -> dict[str, Any]:
    """One part (``model``, ``optim``, ``ema``, ...) of a sharded checkpoint, whole, in this
    process (no process group): DCP's own planner reads every rank's slices into full
    tensors."""
    loaded: dict[str, Any] = {}
    # What dcp's _load_state_dict_from_keys does, with no_dist even where a process group
    # exists (dcp.load would keep only keys the empty dict already had).
    with _single_process_ok():
        _load_state_dict(
            loaded,
            storage_reader=_reader(ckpt),
            planner=_EmptyStateDictLoadPlanner(keys={key}),
            no_dist=True,
        )
    if key not in loaded:
        raise ValueError(f"checkpoint {ckpt} holds no {key!r} state (it holds {sorted(loaded)})")
    return loaded[key]


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Loads a checkpoint's weights into an unwrapped model (strict), in one process."""
    model.load_state_dict(consolidated_state(ckpt, "model"), strict=True)


def read_loop_state(ckpt: Path) -> dict[str, Any]:
    """The loop's saved state (``state.json``): step, counters, stream positions."""
    return json.loads((ckpt / "state.json").read_text())


def read_config(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "config.json").read_text())


def checkpoint_step(ckpt: Path) -> int:
    """The step of a checkpoint directory (``step_N``) that :func:`list_checkpoints` listed."""
    match = _STEP_DIR.match(ckpt.name)
    assert match is not None, f"{ckpt} is not a step_N checkpoint directory"
    return int(match.group(1))


def read_step(ckpt: Path) -> int:
    """The training step a checkpoint was saved at."""
    return read_loop_state(ckpt)["step"]


def model_files(ckpt: Path) -> list[Path]:
    """The files a checkpoint's model is read from: its shards, their index and the config."""
    return sorted((ckpt / DCP_DIR).iterdir()) + [ckpt / "config.json"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's latest checkpoint.

    Raises:
        ValueError: the path is neither, or the run has no complete checkpoint yet.
    """
    path = Path(path)
    if checkpoint_dir(path).is_dir():
        found = list_checkpoints(path)
        if not found:
            raise ValueError(f"run directory {path} has no complete checkpoint yet")
        path = found[-1]
    if not _is_checkpoint(path):
        raise ValueError(
            f"{path} is neither an export (clipline_export.json, open_clip_config.json, a "
            "transformers CLIP config.json or onnx_export.json, or the folder `clipline export "
            f"--format all` wrote), a checkpoint ({DCP_DIR}/.metadata) nor a run directory "
            "(checkpoints/)"
        )
    return path
