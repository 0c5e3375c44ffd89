"""`rasterkube view`: the HTTP endpoints on generated stores (multiscale and plain), GeoParquet
and PMTiles, and a screenshot of the page in a real headless Chromium that must show the data.

The Chromium comes from the npm registry (`@sparticuz/chromium`, pinned, sha256-checked,
cached in ~/.cache/rasterkube on first use; needs npm and node). Nothing here is skipped."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import geopandas
import numpy as np
import pytest
import shapely
import xarray as xr
from PIL import Image
from pyproj import Transformer

from helpers.stores import UTM33, write_store
from rasterkube import multiscale
from rasterkube.cli import main
from rasterkube.viewer import BackgroundServer, tiles

pytestmark = pytest.mark.integration

H, W = 200, 300
X0, Y1, RES = 400000.0, 5600000.0, 10.0  # helpers.stores.grid: UTM 33N, 10 m
HOLE = (slice(80, 120), slice(100, 160))  # NaN everywhere, all times and bands


def _data() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    data = np.stack([np.stack([xx / W + t, np.sin(yy / 20) + t]) for t in range(2)]).astype(np.float32)
    data[:, :, HOLE[0], HOLE[1]] = np.nan
    return data


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> str:
    uri = write_store(str(tmp_path_factory.mktemp("viewer") / "scores.zarr"), _data(), chunk=32, bands=["a", "b"])
    assert len(multiscale.build_committed(uri, min_size=32)) == 4
    return uri


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_store(str(tmp_path_factory.mktemp("viewer") / "plain.zarr"), _data()[:1], chunk=64)


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two squares inside the store: GeoParquet (EPSG:4326) and the same as PMTiles."""
    from rasterkube.vectorize.tiles import write_pmtiles

    polys = [shapely.box(X0 + 500, Y1 - 1500, X0 + 1200, Y1 - 600), shapely.box(X0 + 2000, Y1 - 1800, X0 + 2800, Y1 - 1200)]
    times = np.array(["2017-01-01", "2018-01-01"], dtype="datetime64[ms]")
    gdf = geopandas.GeoDataFrame({"label": [1, 2], "score_mean": [0.5, 0.9], "time": times}, geometry=polys, crs=UTM33)
    gdf = gdf.to_crs(4326)
    d = tmp_path_factory.mktemp("features")
    gdf.to_parquet(d / "polygons.parquet", write_covering_bbox=True)
    write_pmtiles(gdf, str(d / "polygons.pmtiles"), RES)
    return str(d / "polygons.parquet"), str(d / "polygons.pmtiles")


@pytest.fixture(scope="module")
def url(pyramid: str, plain: str, features: tuple[str, str]) -> Iterator[str]:
    with BackgroundServer([pyramid, plain, *features]) as base:
        yield base


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))


def expected_tile(z: int, x: int, y: int, level: int, values: np.ndarray) -> np.ndarray:
    """Nearest-neighbour samples of a level's (y, x) ``values``, computed independently."""
    xs, ys = tiles.pixel_centres(tiles.tile_bounds(z, x, y))
    ex, ey = Transformer.from_crs(3857, UTM33, always_xy=True).transform(xs, ys)
    res = RES * 2**level
    cols, rows = np.floor((ex - X0) / res).astype(int), np.floor((Y1 - ey) / res).astype(int)
    inside = (cols >= 0) & (cols < values.shape[1]) & (rows >= 0) & (rows < values.shape[0])
    return np.where(inside, values[np.clip(rows, 0, values.shape[0] - 1), np.clip(cols, 0, values.shape[1] - 1)], np.nan)


def tile_at(lon: float, lat: float, z: int) -> tuple[int, int]:
    mx, my = Transformer.from_crs(4326, 3857, always_xy=True).transform(lon, lat)
    n, size = 2**z, 2 * tiles.MERCATOR_HALF / 2**z
    return int((mx + tiles.MERCATOR_HALF) // size) % n, int((tiles.MERCATOR_HALF - my) // size)


def centre_lonlat() -> tuple[float, float]:
    return Transformer.from_crs(UTM33, 4326, always_xy=True).transform(X0 + RES * W / 2, Y1 - RES * H / 2)


def test_layers_describe_bounds_levels_bands_and_times(url: str) -> None:
    status, headers, body = get(url + "api/layers")
    assert status == 200 and headers["Content-Type"] == "application/json"
    layers = {layer["id"]: layer for layer in json.loads(body)["layers"]}
    assert set(layers) == {"scores", "plain", "polygons", "polygons-2"}
    scores = layers["scores"]
    assert scores["kind"] == "raster" and scores["levels"] == 4 and layers["plain"]["levels"] == 1
    assert [b["name"] for b in scores["bands"]] == ["a", "b"] and scores["times"] == ["2017-01-01", "2018-01-01"]
    assert 0 <= scores["bands"][0]["vmin"] < 0.2 and 1.8 < scores["bands"][0]["vmax"] <= 2.0
    lon, lat = centre_lonlat()
    w, s, e, n = scores["bounds"]
    assert w < lon < e and s < lat < n and (e - w) < 0.05
    assert scores["maxzoom"] == 14  # the first zoom with tile pixels ≤ 10 m at 50.5° N (6 m)
    assert layers["polygons"]["kind"] == "features" and layers["polygons"]["count"] == 2
    assert layers["polygons"]["times"] == ["2017-01-01T00:00:00", "2018-01-01T00:00:00"]
    pm = layers["polygons-2"]
    assert pm["kind"] == "pmtiles" and pm["vector_layers"] == ["features"] and pm["maxzoom"] >= pm["minzoom"]
    assert pm["bounds"][0] == pytest.approx(layers["polygons"]["bounds"][0], abs=1e-4)


def test_tile_has_data_where_the_store_has_data_and_is_transparent_elsewhere(url: str) -> None:
    z = 15  # tile pixels ≈ 3 m: level 0 (10 m)
    x, y = tile_at(*centre_lonlat(), z)
    status, headers, body = get(url + f"tiles/scores/{z}/{x}/{y}.png?band=a&time=0")
    assert status == 200 and headers["Content-Type"] == "image/png"
    rgba = png(body)
    values = expected_tile(z, x, y, 0, _data()[0, 0])
    data = np.isfinite(values)
    assert data.any() and (~data).any()  # the hole is in this tile
    assert (rgba[..., 3] == 255)[data].all() and (rgba[..., 3] == 0)[~data].all()
    layer = json.loads(get(url + "api/layers")[2])["layers"][0]
    colours = tiles.colorize(values, layer["bands"][0]["vmin"], layer["bands"][0]["vmax"])
    np.testing.assert_array_equal(rgba[data], colours[data])


def test_coarse_zoom_reads_a_coarser_level(url: str, pyramid: str) -> None:
    z = 12  # tile pixels ≈ 24 m at this latitude: level 1 (20 m)
    x, y = tile_at(*centre_lonlat(), z)
    rgba = png(get(url + f"tiles/scores/{z}/{x}/{y}.png?band=b&time=1&colormap=magma&vmin=0&vmax=2")[2])
    level1 = xr.open_datatree(pyramid, engine="zarr")["1"]["variables"].values[1, 1]
    values = expected_tile(z, x, y, 1, level1)
    data = np.isfinite(values)
    assert data.sum() > 1000
    np.testing.assert_array_equal(rgba[..., 3] == 255, data)
    np.testing.assert_array_equal(rgba[data], tiles.colorize(values, 0, 2, "magma")[data])


def test_tiles_outside_the_data_are_empty_and_bad_requests_say_why(url: str) -> None:
    far = png(get(url + "tiles/scores/10/0/0.png")[2])
    assert far.shape == (256, 256, 4) and not far[..., 3].any()
    status, _, body = get(url + "tiles/scores/12/1/1.png?band=nir")
    assert status == 400 and b"'nir' not in scores (its bands are a, b)" in body
    assert get(url + "tiles/scores/1/5/0.png")[0] == 400
    assert get(url + "tiles/scores/12/1/1.png?colormap=jet")[0] == 400
    assert get(url + "tiles/scores/12/1/1.png?vmin=low")[0] == 400
    assert get(url + "tiles/scores/12/1/1.png?time=2")[0] == 400
    assert get(url + "tiles/nope/1/0/0.png")[0] == 400
    assert get(url + "tiles/polygons/1/0/0.png")[0] == 400  # a vector layer has no raster tiles


def test_plain_store_and_rgb_composite(url: str) -> None:
    z = 14
    x, y = tile_at(*centre_lonlat(), z)
    values = expected_tile(z, x, y, 0, _data()[0, 0])
    plain = png(get(url + f"tiles/plain/{z}/{x}/{y}.png")[2])
    np.testing.assert_array_equal(plain[..., 3] == 255, np.isfinite(values))
    rgb = png(get(url + f"tiles/scores/{z}/{x}/{y}.png?rgb=a,b,a")[2])
    np.testing.assert_array_equal(rgb[..., 3] == 255, np.isfinite(values))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    assert len(np.unique(rgb[np.isfinite(values)][:, :3], axis=0)) > 50


def test_geojson_of_geoparquet(url: str) -> None:
    status, headers, body = get(url + "features/polygons.geojson")
    assert status == 200 and headers["Content-Type"] == "application/geo+json"
    fc = json.loads(body)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
    props = [f["properties"] for f in fc["features"]]
    assert [p["label"] for p in props] == [1, 2] and "bbox" not in props[0]  # covering column dropped
    assert props[1]["time"] == "2018-01-01T00:00:00"  # as in Vectorization's PMTiles
    lon, lat = np.array(fc["features"][0]["geometry"]["coordinates"][0]).T
    assert 13 < lon.mean() < 14.5 and 50 < lat.mean() < 51


def test_pmtiles_are_served_with_range_requests(url: str, features: tuple[str, str]) -> None:
    whole = Path(features[1]).read_bytes()
    status, headers, body = get(url + "files/polygons-2.pmtiles", {"Range": "bytes=0-126"})
    assert status == 206 and body == whole[:127] and body.startswith(b"PMTiles")
    assert headers["Content-Range"] == f"bytes 0-126/{len(whole)}" and headers["Accept-Ranges"] == "bytes"
    assert get(url + "files/polygons-2.pmtiles", {"Range": "bytes=-10"})[2] == whole[-10:]
    assert get(url + "files/polygons-2.pmtiles", {"Range": f"bytes=100-{len(whole) + 50}"})[2] == whole[100:]
    assert get(url + "files/polygons-2.pmtiles")[2] == whole
    assert get(url + "files/polygons-2.pmtiles", {"Range": f"bytes={len(whole)}-"})[0] == 416


def test_page_and_bundled_scripts_are_served_locally(url: str) -> None:
    status, _, page = get(url)
    assert status == 200 and b"static/vendor/maplibre-gl.js" in page and b"https://" not in page
    status, headers, js = get(url + "static/vendor/maplibre-gl.js")
    assert status == 200 and "javascript" in headers["Content-Type"] and len(js) > 500_000
    assert get(url + "static/vendor/pmtiles.js")[0] == 200
    assert get(url + "static/../server.py")[0] == 404
    assert get(url + "static/%2e%2e/server.py")[0] == 404


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["view", str(tmp_path / "missing.zarr"), "--no-browser"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["view", str(tmp_path / "notes.txt"), "--no-browser"]) == 2
    assert "not a GeoZarr store" in capsys.readouterr().err


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_view_command_serves_until_stopped(plain: str, url: str, stop: str) -> None:
    """Served until Ctrl-C or SIGTERM, also when started the way a non-interactive shell
    starts a background job (SIGINT inherited as ignored)."""
    import re
    import signal
    import subprocess
    import sys

    busy_port = url.rstrip("/").rsplit(":", 1)[1]
    assert main(["view", plain, "--no-browser", "--port", busy_port]) == 2  # in use: says so
    cmd = [sys.executable, "-m", "rasterkube.cli", "view", plain, "--no-browser", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert m, line + proc.stderr.read() if proc.stderr else line
        layers = json.loads(get(m.group(1) + "api/layers")[2])["layers"]
        assert [layer["id"] for layer in layers] == ["plain"]
    finally:
        proc.send_signal(getattr(signal, stop))
        try:
            assert proc.wait(20) == 0
        finally:
            proc.kill()


@pytest.mark.slow
def test_screenshot_in_headless_chromium_shows_the_data(
    pyramid: str, features: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "view.png"
    assert main(["view", pyramid, *features, "--screenshot", str(out), "--size", "1000x700"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    shot = png(out.read_bytes())[..., :3].astype(int)
    assert shot.shape == (700, 1000, 3)
    # The map fits the data's bounds right of the layer panel (≈ 300 px wide): most of that
    # part of the page is data, not the plain background, in many colours of the colormap.
    background = np.array([0xEE, 0xF0, 0xF2])
    right = shot[:, 320:]
    not_background = np.abs(right - background).sum(axis=-1) > 12
    assert not_background.mean() > 0.4
    colours = np.unique(right[not_background].reshape(-1, 3), axis=0)
    assert len(colours) > 100
    viridis = tiles.lut("viridis").astype(int)
    near = np.abs(right[not_background][:, None, :] - viridis[None, ::8, :]).sum(axis=-1).min(axis=1) < 30
    assert near.mean() > 0.3  # raster pixels outside the polygons are viridis colours
    # The polygons (red fill over the raster, orange PMTiles outline) are drawn too.
    reddish = (right[..., 0] > right[..., 2] + 40) & (right[..., 0] > 120)
    assert reddish.sum() > 2000


@pytest.mark.slow
def test_page_draws_every_layer_and_its_selectors_switch_band_and_time(url: str) -> None:
    from rasterkube.viewer import READY
    from rasterkube.viewer.browser import HeadlessBrowser

    with HeadlessBrowser() as browser:
        browser.open(url, 900, 600)
        browser.wait_for(READY)
        assert browser.evaluate("window.rasterkube.errors") == []
        for layer in ("polygons-fill", "polygons-2-features-fill"):  # GeoParquet and PMTiles
            count = browser.evaluate(f"window.rasterkube.map.queryRenderedFeatures({{layers: ['{layer}']}}).length")
            assert count >= 2, layer
        # "plain" (drawn above "scores", same footprint) is switched off with its checkbox.
        covered = png(browser.screenshot())
        browser.evaluate("document.querySelectorAll('.layer')[1].querySelector('input[type=checkbox]').click()")
        browser.wait_for(READY)
        assert browser.evaluate("window.rasterkube.map.getLayoutProperty('plain', 'visibility')") == "none"
        before = png(browser.screenshot())
        # The same data underneath, in other colours: "scores" stretches over both times.
        assert np.abs(before.astype(int) - covered.astype(int)).sum(axis=-1).astype(bool).mean() > 0.1
        browser.evaluate("""(() => {
            const [band, time] = document.querySelectorAll('.layer')[0].querySelectorAll('select');
            band.value = '1'; band.dispatchEvent(new Event('change'));
            time.value = '1'; time.dispatchEvent(new Event('change'));
        })()""")
        browser.wait_for(READY)
        tiles_url = browser.evaluate("window.rasterkube.map.getSource('scores').tiles[0]")
        assert "band=b" in tiles_url and "time=1" in tiles_url
        after = png(browser.screenshot())
        # The GeoParquet layer has a `time` column: its time selector shows one time step.
        browser.evaluate("""(() => {
            const time = document.querySelectorAll('.layer')[2].querySelector('select');
            time.value = '2'; time.dispatchEvent(new Event('change'));
        })()""")
        browser.wait_for(READY)
        shown = browser.evaluate("[...new Set(window.rasterkube.map.queryRenderedFeatures({layers: ['polygons-fill']})"
                                 ".map(f => f.properties.label))]")  # a feature may come in parts (tiles)
        assert shown == [2]
        assert np.abs(after.astype(int) - before.astype(int)).sum(axis=-1).astype(bool).mean() > 0.2
        assert browser.console == [] or not any("exception" in line for line in browser.console)


def test_geoparquet_without_extension_is_recognised_by_content(features: tuple[str, str], tmp_path: Path) -> None:
    """A Vectorization's default output name has no extension."""
    import shutil

    from rasterkube.viewer.layers import FeatureLayer, open_layers

    plain = tmp_path / "s2-water-polygons"
    shutil.copy(features[0], plain)
    (layer,) = open_layers([str(plain)]).values()
    assert isinstance(layer, FeatureLayer)
