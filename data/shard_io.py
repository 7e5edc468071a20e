"""Shard I/O: how every reader and writer of shards names, lists, opens and groups them.

Training (:mod:`clipline.data.stream`), eval sets (:mod:`clipline.data.benchmark_sets`), the
doctor and ``clipline shards --index-only`` all go through this module, so one rule decides
what a shard name means and one reader (:class:`TarSamples`) what a tar holds:

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
dot of its file name is the key). :func:`open_retrying` retries network blips.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import subprocess
import tarfile
import time
from collections import Counter
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
log = logging.getLogger(__name__)

OPEN_ATTEMPTS = 3  # tries to open a shard before it is given up (resampled) or lost
RETRY_SECONDS = 0.5  # first wait between tries; doubled each time
PIPE_HINT = "set data.allow_pipe=true"  # how training allows pipe: URLs
# A URL rather than a path (file:// included): what the shard writer does not download.
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^pipe:")
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


def check_local(urls: list[str], need: str) -> None:
    """Raises ``ValueError`` for the first remote shard among ``urls``.

    Args:
        urls: Shards from :func:`list_shards`.
        need: Why local shards are needed and the fix, with ``{url}`` for the remote one.
    """
    remote = [u for u in urls if is_remote(u)]
    if remote:
        raise ValueError(
            f"{need.format(url=remote[0])} (a local folder whose name starts with pipe: is "
            "read as a folder when written ./pipe:... or as an absolute path)."
        )


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


def shard_name(url: str) -> str:
    """The ``sizes.json`` key of a shard: its file name (for pipe:, the last ``*.tar`` word)."""
    if protocol(url) == "pipe":
        names = re.findall(r"([^/\s'\"]+\.tar)\b", url)
        return names[-1] if names else url
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def shard_sizes(
    shards: str, *, manifest: str | None = None, allow_pipe: bool = False
) -> list[tuple[str, int]]:
    """[(shard URL, samples in it)] for one source, from its manifest(s), local or remote.

    Args:
        shards: Anything :func:`list_shards` accepts.
        manifest: The ``sizes.json`` to read; None: the one beside each shard.
        allow_pipe: Whether ``pipe:`` shards may run (their manifest never may).

    Raises:
        ValueError: a missing shard, gated pipe:, missing backend, or unreadable manifest.
    """
    urls = list_shards(shards)
    manifests: dict[str, dict[str, int]] = {}
    out = []
    for url in urls:
        check_url(url, allow_pipe)
        where = manifest
        if where is None:
            if protocol(url) == "pipe":
                raise ValueError(
                    f"pipe: shard {url!r} has no folder to find sizes.json in; give its "
                    "location with data.manifest (or manifest in [[data.sources]])"
                )
            where = url.rsplit("/", 1)[0] + "/sizes.json" if "/" in url else "sizes.json"
        if where not in manifests:
            check_url(where, allow_pipe=False)
            try:
                sizes = json.loads(read_bytes(where))
            except Exception as e:  # missing file, HTTP 404, bad JSON: all need the same fix
                raise ValueError(
                    f"cannot read the shard manifest {where!r} ({type(e).__name__}: {e}); "
                    "shards written by `clipline shards` have one, otherwise write "
                    '{"<shard>.tar": <count>, ...} there or point data.manifest at it'
                ) from e
            manifests[where] = {k: int(v) for k, v in sizes.items()}
        name = shard_name(url)
        if name not in manifests[where]:
            raise ValueError(
                f"{where!r} has no entry for {name!r} (it lists {len(manifests[where])} "
                "shards); rewrite the shards or add the entry"
            )
        out.append((url, manifests[where][name]))
    if Path(shards).is_dir():  # a folder: every shard its manifest lists should be there
        listed = set().union(*manifests.values())
        absent = sorted(listed - {shard_name(u) for u, _ in out})
        if absent:
            raise ValueError(
                f"{shards}/sizes.json lists {len(absent)} shard(s) that are not in the "
                f"folder, e.g. {absent[:3]}; restore them or rewrite sizes.json "
                "(`clipline shards --index-only`)"
            )
    return out


# ------------------------------------------------------------------- tar -> sample grouping


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """``(key, lower-cased extension)`` of a tar member, or ``(None, None)`` without a dot.

    webdataset's own rule (``base_plus_ext``): the key is everything before the first dot of
    the file name, the extension everything after it.
    """
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


class _WatchedTarInfo(tarfile.TarInfo):
    """Records why a tar ended: tarfile ends silently on a cut or garbled header."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exn:
            tarfile_.end_error = exn  # type: ignore[attr-defined]
            raise


class TarSamples:
    """The one tar reader: a tar's members grouped into samples as webdataset groups them.

    Consecutive regular members whose names share the part before the first dot of the file
    name (:func:`split_member_name`) form a sample ``{"__key__": key, extension: bytes}``;
    ``__*__`` meta members and names without a dot are passed over. Iterating yields
    ``(index in the tar, sample)``; a sample is yielded once the next one begins (or the tar
    ends), so a sample cut short by damage is never yielded when the damage raises.

    Args:
        f: The tar, open for reading (see :func:`open_shard`).
        seekable: ``f`` can seek: passed-over members are skipped without reading them.
        start: Samples before this index are passed over without reading their data.
        stop: Reading ends before this sample index (None: at the end of the tar).
        want: Which indices are read; the others come back as ``None``, unread.
        read: Which extensions are read; the others come back as ``None`` values, unread.
        checked: Where tarfile stops silently, raise instead (and keep the last sample back):
            for a seekable file a member that runs past the file's end (``ReadError``) or
            anything but zero padding after the last member (``ReadError``); for a stream a
            cut header (``EOFError``) or a garbled one (``ReadError``).

    Attributes:
        duplicates: Keys found in two samples, or twice in one (webdataset splits or merges
            such samples), in the order found.
    """

    def __init__(
        self,
        f: IO[bytes],
        *,
        seekable: bool,
        start: int = 0,
        stop: int | None = None,
        want: Callable[[int], bool] | None = None,
        read: Callable[[str], bool] | None = None,
        checked: bool = False,
    ):
        self.f, self.seekable, self.start, self.stop = f, seekable, start, stop
        self.want, self.read, self.checked = want, read, checked
        self.duplicates: list[str] = []

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        start, stop, want, read = self.start, self.stop, self.want, self.read
        size = self._size() if self.checked and self.seekable else None
        index, key, sample = -1, None, None
        seen: set[str] = set()
        mode = "r:" if self.seekable else "r|"
        with tarfile.open(fileobj=self.f, mode=mode, tarinfo=_WatchedTarInfo) as tar:
            for member in tar:
                tar.members = []  # tarfile keeps every header otherwise: memory grows
                if size is not None and member.offset_data + member.size > size:
                    raise tarfile.ReadError(
                        f"truncated: member {member.name!r} ends at byte "
                        f"{member.offset_data + member.size} but the file has {size}"
                    )
                if not member.isreg() or _META_RE.match(member.name):
                    continue
                prefix, suffix = split_member_name(member.name)
                if prefix is None:
                    continue
                if prefix != key:
                    if index >= start:
                        yield index, sample
                    if prefix in seen:
                        self.duplicates.append(prefix)
                    seen.add(prefix)
                    index, key = index + 1, prefix
                    if stop is not None and index >= stop:
                        return
                    wanted = index >= start and (want is None or want(index))
                    sample = {"__key__": prefix} if wanted else None
                elif sample is not None and suffix in sample:
                    self.duplicates.append(prefix)
                if sample is not None:
                    if read is None or read(suffix):
                        sample[suffix] = tar.extractfile(member).read()
                    else:
                        sample[suffix] = None
            if self.checked:
                self._check_end(tar, size)
        if start <= index and (stop is None or index < stop):
            yield index, sample

    def _size(self) -> int:
        here = self.f.tell()
        size = self.f.seek(0, os.SEEK_END)
        self.f.seek(here)
        return size

    def _check_end(self, tar: tarfile.TarFile, size: int | None) -> None:
        if size is None:  # a stream: why did tarfile stop?
            end = getattr(tar, "end_error", None)
            if end is None or isinstance(end, tarfile.EOFHeaderError):
                return
            # Empty/short header: the data stops between or inside headers. Invalid header:
            # bytes that are not a tar header where one should be.
            if isinstance(end, tarfile.InvalidHeaderError):
                raise tarfile.ReadError(f"ends early: {end!r}")
            raise EOFError(f"ends early: {end!r}")
        end = tar.offset
        self.f.seek(end)
        while block := self.f.read(1 << 20):
            if block.count(0) != len(block):
                raise tarfile.ReadError(f"truncated or damaged: no valid tar header at byte {end}")


def shard_samples(
    shards: list[Shard], *, allow_pipe: bool = False, counts: Counter | None = None
) -> Iterator[dict[str, Any]]:
    """The samples (``__key__``, ``__url__``, one entry per extension) of each shard in turn.

    Each shard is opened with :func:`open_shard` (never webdataset's ``gopen``, which would
    run any name starting with ``pipe:``) and read by :class:`TarSamples`.

    Args:
        shards: Shard paths or URLs.
        allow_pipe: Whether ``pipe:`` commands may run.
        counts: None: a damaged shard raises. Else bad data never raises: a shard that
            cannot be opened or has a garbled header counts ``shard_read_error``; one that
            ends mid-member or without its end-of-archive block (a cut download or copy)
            counts ``truncated_tar``. Either way the complete samples read so far are
            kept, the one being read is dropped, and reading goes on with the next shard
            (so a cut sample never merges with the next shard's first one).

    Raises:
        ValueError: a ``pipe:`` shard without ``allow_pipe``, before anything runs.
    """
    for shard in shards:
        check_url(shard, allow_pipe)
    for shard in shards:
        url = str(shard)
        try:
            f, _, close = open_shard(shard, allow_pipe=allow_pipe)
            try:
                # Front to back as a stream, as webdataset reads: a sample is complete once
                # the next one begins, whatever comes after it.
                for _, sample in TarSamples(f, seekable=False, checked=counts is not None):
                    sample["__url__"] = url
                    yield sample
            finally:
                close()
        except (tarfile.ReadError, EOFError) as e:
            if counts is None:
                raise
            # "unexpected end of data": a member cut short.
            truncated = isinstance(e, EOFError) or "unexpected end" in str(e)
            counts["truncated_tar" if truncated else "shard_read_error"] += 1
            log.warning("shard %s: %s; skipping the rest of it", url, e)
        except OSError as e:  # missing file, network error, permission
            if counts is None:
                raise
            counts["shard_read_error"] += 1
            log.warning("shard %s unreadable: %s", url, e)


def open_retrying(
    url: Shard,
    *,
    allow_pipe: bool,
    attempts: int = OPEN_ATTEMPTS,
    final: tuple[type[Exception], ...] = (),
) -> tuple[IO[bytes], bool, Callable[[], None]]:
    """:func:`open_shard`, tried ``attempts`` times (network blips), waiting
    :data:`RETRY_SECONDS`, doubled after each try, in between.

    Args:
        url: As :func:`open_shard`.
        allow_pipe: As :func:`open_shard`.
        attempts: Tries before the last error is raised.
        final: Errors raised at once, without retrying.
    """
    for attempt in range(attempts):
        try:
            return open_shard(url, allow_pipe=allow_pipe)
        except final:
            raise
        except Exception as e:
            if attempt + 1 == attempts:
                raise
            log.debug("opening %s failed (%r); retrying", url, e)
        time.sleep(RETRY_SECONDS * 2**attempt)
    raise AssertionError("unreachable")
