"""Model loading from a real local HTTP server (https:// and hf:// paths), the S3 server and
disk: cached by content, no pickle, TorchScript fallback, clear errors."""

from __future__ import annotations

import http.server
import json
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from helpers.torchmodels import ConvNet, conv_pt2
from rasterkube import storage
from rasterkube.models import DEMO_MODELS
from rasterkube.predict import models

pytestmark = pytest.mark.integration


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    root = tmp_path / "www"
    root.mkdir()
    _Handler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, _Handler.requests
    server.shutdown()


def test_https_download_is_cached_by_content(http_root, tmp_path: Path) -> None:
    url, root, requests = http_root
    conv_pt2(root / "seg.pt2", 3, 2, patch=32)
    cache = tmp_path / "cache"
    first = models.fetch(f"{url}/seg.pt2", cache)
    second = models.fetch(f"{url}/seg.pt2", cache)
    assert first.path == second.path and first.sha256 == second.sha256
    assert requests.count("/seg.pt2") == 1, "the second fetch is served from the cache"
    assert first.path.parent.name == first.sha256, "cache entries are named by their content"
    # A changed file at the same URL is downloaded again.
    conv_pt2(root / "seg.pt2", 3, 4, patch=32)
    third = models.fetch(f"{url}/seg.pt2", cache)
    assert third.sha256 != first.sha256
    assert models.load(third.path).signature.out_channels == 4


def test_hf_uri_resolves_to_the_resolve_url(http_root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, root, _ = http_root
    (root / "org" / "repo" / "resolve" / "v1").mkdir(parents=True)
    conv_pt2(root / "org" / "repo" / "resolve" / "v1" / "model.pt2", 2, 3, patch=16)
    monkeypatch.setenv("HF_ENDPOINT", url)
    assert models.resolve_uri("hf://org/repo/sub/m.pt2") == f"{url}/org/repo/resolve/main/sub/m.pt2"
    fetched = models.fetch("hf://org/repo@v1/model.pt2", tmp_path / "cache")
    assert models.load(fetched.path).signature == models.Signature(2, 3, 16, models.FORMAT_PT2, False)
    with pytest.raises(models.ModelError, match="spec.model.uri: hf://org/repo/missing.pt2: the server answered HTTP 404"):
        models.fetch("hf://org/repo/missing.pt2", tmp_path / "cache")
    with pytest.raises(models.ModelError, match="expected hf://org/repo/path"):
        models.resolve_uri("hf://org/repo")


def test_s3_model(s3: str, tmp_path: Path) -> None:
    local = conv_pt2(tmp_path / "m.pt2", 3, 2, patch=32)
    uri = "s3://rasterkube/test-models/m.pt2"
    fs, _ = storage.filesystem(uri)
    fs.put_file(str(local), uri)
    fetched = models.fetch(uri, tmp_path / "cache")
    assert fetched.sha256 == models.fetch(str(local)).sha256
    assert models.load(fetched.path, uri).signature.in_channels == 3
    with pytest.raises(models.ModelError, match="does not exist"):
        models.fetch("s3://rasterkube/test-models/nope.pt2", tmp_path / "cache")


def _rewrite(src: Path, dst: Path, edit: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, edit.get(item.filename.split("/", 1)[1], zin.read(item.filename)))
    return dst


def test_archives_that_would_unpickle_are_refused(tmp_path: Path) -> None:
    good = conv_pt2(tmp_path / "good.pt2", 2, 2, patch=16)
    with zipfile.ZipFile(good) as zf:
        name = next(n for n in zf.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(zf.read(name))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    bad = _rewrite(good, tmp_path / "bad.pt2", {name.split("/", 1)[1]: json.dumps(config).encode()})
    with pytest.raises(models.ModelError, match="stored with pickle"):
        models.load(bad)

    class Evil:
        def __reduce__(self):  # what a malicious sample input would do when unpickled
            return (print, ("pwned",))

    import io

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    evil = _rewrite(good, tmp_path / "evil.pt2", {"data/sample_inputs/model.pt": buf.getvalue()})
    with pytest.raises(models.ModelError, match="sample inputs are not plain tensors"):
        models.load(evil)
    (tmp_path / "junk.pt2").write_bytes(b"\x00" * 100)
    with pytest.raises(models.ModelError, match="is not a model archive"):
        models.load(tmp_path / "junk.pt2")


def test_torchscript_fallback_matches_the_module(tmp_path: Path) -> None:
    net = ConvNet(3, 2, seed=4).eval()
    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(net), str(path))
    loaded = models.load(path, probe_channels=3, probe_patch=24)
    assert loaded.signature == models.Signature(3, 2, None, models.FORMAT_TORCHSCRIPT, False)
    x = torch.randn(2, 3, 24, 24)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x).numpy(), net(x).numpy(), atol=1e-6)
    with pytest.raises(models.ModelError, match="fails on a \\(1, 5, 24, 24\\) input"):
        models.load(path, probe_channels=5, probe_patch=24)


@pytest.mark.parametrize("name", sorted(DEMO_MODELS))
def test_shipped_demo_models_load_with_their_card(name: str) -> None:
    demo = DEMO_MODELS[name]
    loaded = models.load(demo.path)
    sig = loaded.signature
    stacked = 2 if demo.actor == "changeDetection" else 1
    assert sig.in_channels == len(demo.features) * stacked
    assert sig.out_channels == len(demo.labels) and sig.patch == demo.patch_size and sig.has_transforms
    cards = json.loads((demo.path.parent / "cards.json").read_text())
    assert cards[name]["file"] == demo.file and cards[name]["held_out"]["accuracy"] > 0.75
