"""``python -m rasterkube.jobs <kind> --spec <json|path|uri>``: the Ray job entrypoint."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from rasterkube.constants import RESULT_PREFIX, Kind
from rasterkube.errors import SchedulingTimeout, UserError
from rasterkube.jobs import run_job
from rasterkube.jobs.context import JobRequest
from rasterkube.manifests import format_validation_error
from rasterkube.runtime.progress import LogReporter

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    kinds = {k.value.lower(): k for k in Kind}
    parser = argparse.ArgumentParser(prog="python -m rasterkube.jobs", description=__doc__)
    parser.add_argument("kind", choices=sorted(kinds), help="resource kind")
    parser.add_argument("--spec", required=True, help="job request: inline JSON, a path or a URI")
    args = parser.parse_args(argv)
    try:
        request = JobRequest.load(args.spec)
        if request.kind is not kinds[args.kind]:
            raise UserError(f"kind: the spec is a {request.kind.value}, not a {kinds[args.kind].value}")
        result = run_job(request, LogReporter())
    except ValidationError as exc:
        return _fail(format_validation_error(exc, "spec"))
    except SchedulingTimeout as exc:
        return _fail(str(exc), reason=exc.reason)
    except UserError as exc:
        return _fail(str(exc))
    print(RESULT_PREFIX + json.dumps({"ok": True, **result.to_dict()}), flush=True)
    return 0


def _fail(message: str, reason: str | None = None) -> int:
    """The result line the operator reads; ``reason`` (a constants.Reason value) goes onto the
    status conditions instead of the generic JobFailed."""
    payload = {"ok": False, "error": message, **({"reason": reason} if reason else {})}
    print(RESULT_PREFIX + json.dumps(payload), flush=True)
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
