"""Shards and manifests over HTTP (a real server on loopback), fsspec backends, pipe: gating."""

import functools
import http.server
import threading

import pytest

from clipline.data.stream import StreamConfig, epoch_shape
from tests.helpers import make_shards, micro_loader


def _keys(spec: str, **kw) -> list[str]:
    cfg = StreamConfig(shards=spec, batch_size=4, workers=kw.pop("workers", 0), **kw)
    loader = micro_loader(cfg)
    return [k for b in loader.epoch(0) for k in b["key"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(shard folder, its http:// URL) served by http.server in a thread."""
    shards = make_shards(tmp_path_factory.mktemp("http") / "s", n=48, per_shard=12)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(shards))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield shards, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_shards_and_manifest_read_like_local_ones(served):
    shards, url = served
    local = _keys(str(shards))
    assert len(local) == 48
    assert _keys(url + "/{000000..000003}.tar") == local  # brace-expanded; sizes.json over HTTP
    listed = "::".join(f"{url}/{i:06d}.tar" for i in range(4))
    assert _keys(listed, workers=2) == _keys(str(shards), workers=2)


def test_http_without_a_manifest_is_a_clear_error(served):
    _, url = served
    with pytest.raises(ValueError, match=r"cannot read the shard manifest .*/nowhere/sizes.json"):
        epoch_shape(StreamConfig(shards=url + "/nowhere/{000000..000001}.tar", workers=0), 1)


def test_pipe_urls_need_allow_pipe(served, tmp_path):
    shards, _ = served
    spec = f"pipe:cat {shards}/{{000000..000003}}.tar"
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        epoch_shape(StreamConfig(shards=spec, workers=0), 1)
    with pytest.raises(ValueError, match="data.manifest"):
        epoch_shape(StreamConfig(shards=spec, workers=0, allow_pipe=True), 1)
    got = _keys(spec, allow_pipe=True, manifest=str(shards / "sizes.json"))
    assert got == _keys(str(shards))


def test_a_missing_fsspec_backend_names_the_package(monkeypatch):
    def missing(protocol):
        raise ImportError(f"Install the package for {protocol}")

    import fsspec  # shard_io imports it on demand: patch the module itself

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(ValueError, match="pip install s3fs"):
        epoch_shape(StreamConfig(shards="s3://bucket/{000000..000001}.tar", workers=0), 1)
    with pytest.raises(ValueError, match="pip install gcsfs"):
        epoch_shape(StreamConfig(shards="gs://bucket/000000.tar", workers=0), 1)


def test_a_missing_shard_in_an_exact_epoch_is_a_clear_error(served):
    shards, url = served
    cfg = StreamConfig(shards=f"{url}/{{000000..000003}}.tar", batch_size=4, workers=0)
    loader = micro_loader(cfg)
    (shards / "000002.tar").rename(shards / "gone.tar")  # 404 from now on
    try:
        with pytest.raises(RuntimeError, match=r"000002.tar is missing .*data.mode='resampled'"):
            list(loader.epoch(0))
    finally:
        (shards / "gone.tar").rename(shards / "000002.tar")


def test_an_unreachable_shard_costs_its_samples_not_the_run(served, monkeypatch):
    # Resampled mode: the shard is retried, then given up; its samples are replaced.
    from clipline.data import shard_io

    monkeypatch.setattr(shard_io, "RETRY_SECONDS", 0.01)
    shards, url = served
    spec = f"{url}/{{000000..000003}}.tar"
    cfg = StreamConfig(
        shards=spec, batch_size=4, workers=0, mode="resampled", num_samples=192, seed=3
    )
    loader = micro_loader(cfg)
    (shards / "000002.tar").rename(shards / "gone.tar")  # 404 from now on
    try:
        batches = list(loader.epoch(0))
    finally:
        (shards / "gone.tar").rename(shards / "000002.tar")
    assert len(batches) == loader.batches_per_epoch == 48  # refilled from the other shards
    lost = sum(b["skipped"].get("shard_read_error", 0) for b in batches)
    assert lost >= 1  # each draw of the missing shard: tried 3 times, then counted once
    keys = [k for b in batches for k in b["key"]]
    assert not {f"{i:09d}" for i in range(24, 36)} & set(keys)
