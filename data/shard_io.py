"""Shard I/O: how every reader and writer of shards names, lists, opens and groups them.

Training (:mod:`clipline.data.stream`), eval sets (:mod:`clipline.data.evalsets`), the
doctor, ``clipline shards --index-only`` and the decode helpers all go through this module,
so one rule decides what a shard name means:

* A ``str`` that starts with ``pipe:`` is a shell command whose stdout is a tar. It runs only
  where the caller passes ``allow_pipe=True`` (training, with ``data.allow_pipe = true``);
  everywhere else it is refused with a ``ValueError``.
* ``scheme://...`` is an fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ...); ``file://``
  and anything else is a local path.
* **A local path is always a path.** A ``pathlib.Path`` is never read as a URL, and
  :func:`list_shards` spells the local files it finds so that they cannot read as one: a
  file under a folder literally named ``pipe:cmd`` comes back as ``./pipe:cmd/0.tar``
  (``Path`` itself would drop the ``./`` and turn the name into a command).

Tars are grouped into samples as webdataset groups them (the member name up to the first
dot of its file name is the key).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import braceexpand

# fsspec protocol -> the pip package that provides it (fsspec itself only knows the names).
BACKEND_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "az": "adlfs",
    "abfs": "adlfs",
    "hf": "huggingface_hub",
}
PIPE_HINT = "set data.allow_pipe=true"  # how training allows pipe: URLs
_REMOTE_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^pipe:")
_META_RE = re.compile(r"__[^/]*__($|/)")

Shard = str | Path  # a URL or local path (str), or a local path that is never a URL (Path)


def protocol(url: Shard) -> str:
    """``pipe``, an fsspec protocol (``s3``, ``http``, ...), or ``file`` for local paths."""
    if isinstance(url, Path):
        return "file"
    if url.startswith("pipe:"):
        return "pipe"
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    return m.group(1).lower() if m else "file"


def check_url(url: Shard, allow_pipe: bool, *, pipe_hint: str = PIPE_HINT) -> None:
    """Fails on a ``pipe:`` URL that is not allowed, or on a missing fsspec backend.

    Args:
        url: A shard or manifest URL or path.
        allow_pipe: Whether ``pipe:`` commands may run here.
        pipe_hint: How the user allows them, for the error message.

    Raises:
        ValueError: naming the URL and the fix.
    """
    proto = protocol(url)
    if proto == "pipe":
        if not allow_pipe:
            raise ValueError(
                f"{url!r} is a pipe: URL, which runs a shell command taken from the input; "
                f"{pipe_hint} to allow it (a local file of that name: write it as "
                f"'./{url}' or as an absolute path)"
            )
        return
    if proto == "file":
        return
    import fsspec  # on demand: 0.1 s, and shard-writer processes never need it

    try:
        fsspec.get_filesystem_class(proto)
    except ImportError as e:
        package = BACKEND_PACKAGES.get(proto, f"the fsspec backend for {proto}://")
        raise ValueError(f"reading {url!r} needs {package}: pip install {package} ({e})") from e
    except ValueError as e:
        raise ValueError(f"{url!r}: fsspec knows no protocol {proto!r} ({e})") from e


def open_shard(
    url: Shard, *, allow_pipe: bool, pipe_hint: str = PIPE_HINT
) -> tuple[IO[bytes], bool, Callable[[], None]]:
    """(binary stream, whether it is seekable, close) for a path, fsspec URL or pipe: command.

    Raises:
        ValueError: a ``pipe:`` URL without ``allow_pipe`` (nothing runs).
    """
    proto = protocol(url)
    if proto == "pipe":
        check_url(url, allow_pipe, pipe_hint=pipe_hint)
        proc = subprocess.Popen(str(url)[len("pipe:") :], shell=True, stdout=subprocess.PIPE)

        def close() -> None:
            proc.stdout.close()  # a command cut short gets SIGPIPE, which is fine here
            proc.wait()

        return proc.stdout, False, close
    if proto == "file":
        path = url if isinstance(url, Path) else url.removeprefix("file://")
        f = open(path, "rb")  # noqa: SIM115 (closed by the caller)
        return f, True, f.close
    import fsspec

    # Streaming, not random access: shards are read front to back, and many HTTP servers
    # (python's http.server among them) answer range requests with the whole file.
    options = {"block_size": 0} if proto in ("http", "https") else {}
    f = fsspec.open(url, "rb", **options).open()
    return f, False, f.close


def read_bytes(url: Shard, *, allow_pipe: bool = False) -> bytes:
    """The whole content of a (small) file, e.g. a manifest; see :func:`open_shard`."""
    f, _, close = open_shard(url, allow_pipe=allow_pipe)
    try:
        return f.read()
    finally:
        close()


# ------------------------------------------------------------------------------- listing


def is_remote(url: Shard) -> bool:
    """True for ``pipe:`` and ``scheme://`` URLs other than ``file://``."""
    return protocol(url) != "file"


def local_path(url: Shard) -> str:
    """The path of a local shard name (``file://`` removed)."""
    return str(url)[len("file://") :] if str(url).startswith("file://") else str(url)


def local_name(path: str | Path) -> str:
    """``path`` as a string that :func:`protocol` reads as a local path.

    ``str(Path("./pipe:cmd"))`` is ``"pipe:cmd"``, a command; such names get ``./`` back.
    (``scheme://`` cannot occur: ``Path`` collapses ``//``.)
    """
    s = str(path)
    return s if protocol(s) == "file" else os.path.join(".", s)


def _split_outside_braces(spec: str) -> list[str]:
    """Split on ',' except inside '{...}', where commas belong to brace alternatives."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def list_shards(spec: str | Path | list[str]) -> list[str]:
    """Expand a shard specification into a list of shard URLs/paths.

    Accepts a directory (all ``*.tar`` in it, sorted), a brace pattern
    (``/x/{000000..000009}.tar``), a glob (``/x/*.tar``), or several of these separated by
    ``::`` (open_clip's multi-source separator) or by commas outside braces. Remote URLs
    (``s3://``, ``https://``, ``pipe:``) pass through unchecked (:func:`check_url` gates
    them); local files come back spelled as paths (see :func:`local_name`).

    Args:
        spec: The specification, or a list of them.

    Returns:
        Shard paths/URLs in order.

    Raises:
        ValueError: If the spec is empty, a directory has no shards, or a local shard
            does not exist.
    """
    specs = [str(s) for s in spec] if isinstance(spec, list | tuple) else [str(spec)]
    parts = [
        p.strip() for s in specs for chunk in s.split("::") for p in _split_outside_braces(chunk)
    ]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"empty shard spec {spec!r}; pass a folder, a pattern or a list.")
    shards: list[str] = []
    for part in parts:
        if not is_remote(part) and Path(local_path(part)).is_dir():
            found = sorted(local_name(p) for p in Path(local_path(part)).glob("*.tar"))
            if not found:
                raise ValueError(
                    f"no *.tar shards in folder {part!r}; write some with `clipline shards` "
                    "or point at the folder that holds them."
                )
            shards.extend(found)
        elif not is_remote(part) and any(c in part for c in "*?["):
            found = sorted(local_name(p) for p in glob.glob(local_path(part)))
            if not found:
                raise ValueError(f"glob {part!r} matches no files; check the path.")
            shards.extend(found)
        else:
            shards.extend(braceexpand.braceexpand(part))
    missing = [s for s in shards if not is_remote(s) and not Path(local_path(s)).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(
            f"shard(s) not found: {missing[:3]}{more}; "
            "check the path/pattern (brace ranges like {000000..000009} must match the "
            "file names) or write the shards with `clipline shards`."
        )
    return shards


def read_manifest(shards_dir_or_pattern: str | Path | list[str]) -> dict[str, int]:
    """Sample counts per shard, from the ``sizes.json`` next to each shard.

    ``sizes.json`` is open_clip's format: ``{"000000.tar": n, ...}`` keyed by file name, in
    the shards' folder.

    Args:
        shards_dir_or_pattern: Anything :func:`list_shards` accepts (local shards only).

    Returns:
        ``{shard path: sample count}`` in shard order.

    Raises:
        ValueError: If a shard is remote, a ``sizes.json`` is missing, or it lacks a shard.
    """
    shards = list_shards(shards_dir_or_pattern)
    cache: dict[Path, dict[str, int]] = {}
    counts: dict[str, int] = {}
    for shard in shards:
        if is_remote(shard):
            raise ValueError(
                f"cannot read sizes.json for remote shard {shard!r}; give the sample count "
                "explicitly (e.g. num_samples=...) or copy sizes.json next to local shards."
            )
        folder = Path(local_path(shard)).parent
        if folder not in cache:
            sizes_path = folder / "sizes.json"
            if not sizes_path.is_file():
                raise ValueError(
                    f"no sizes.json in {str(folder)!r} (needed for shard {shard!r}); "
                    "shards written by `clipline shards` have one, otherwise write "
                    '{"<shard>.tar": <count>, ...} there or give the sample count explicitly.'
                )
            cache[folder] = {k: int(v) for k, v in json.loads(sizes_path.read_text()).items()}
        name = Path(shard).name
        if name not in cache[folder]:
            raise ValueError(
                f"{str(folder / 'sizes.json')!r} has no entry for {name!r} "
                f"(it lists {len(cache[folder])} shards); rewrite the shards or add the entry."
            )
        counts[shard] = cache[folder][name]
    return counts


# ------------------------------------------------------------------- tar -> sample grouping


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """``(key, lower-cased extension)`` of a tar member, or ``(None, None)`` without a dot.

    webdataset's own rule (``base_plus_ext``): the key is everything before the first dot of
    the file name, the extension everything after it.
    """
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


def iter_tar_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample of a local tar, grouped as webdataset does.

    Args:
        path: A local ``.tar`` (opened as a file, whatever its name).

    Yields:
        The samples in tar order.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    with open(local_path(path), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            if not m.isreg() or _META_RE.match(m.name):
                continue
            k, ext = split_member_name(m.name)
            if k is None:
                continue
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            data = tf.extractfile(m)
            members[ext] = data.read() if data is not None else b""
    if key is not None:
        yield key, members


def webdataset_samples(
    shards: list[Shard], *, allow_pipe: bool = False
) -> Iterator[dict[str, Any]]:
    """webdataset's samples (``__key__``, ``__url__``, one entry per extension) of each shard.

    webdataset's own tar expansion and grouping (so samples equal ``wds.WebDataset``'s, which
    clip_benchmark reads), on streams from :func:`open_shard` instead of webdataset's
    ``gopen``, which would run any name starting with ``pipe:``.

    Raises:
        ValueError: a ``pipe:`` shard without ``allow_pipe``, before anything runs.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    for shard in shards:
        check_url(shard, allow_pipe)
    for shard in shards:
        f, _, close = open_shard(shard, allow_pipe=allow_pipe)
        try:
            yield from group_by_keys(tar_file_expander([{"url": str(shard), "stream": f}]))
        finally:
            close()
