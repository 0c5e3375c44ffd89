"""The ``ray`` backend: jobs on an existing Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import logging
from typing import Any

from rasterkube.runtime.progress import last_progress
from rasterkube_operator.backends.base import BackendName, JobSpec, JobState, JobStatus, Owner

log = logging.getLogger(__name__)

# Ray job states → ours (ray.job_submission.JobStatus values).
RAY_STATES = {
    "PENDING": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "SUCCEEDED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
    "STOPPED": JobState.STOPPED,
}
# How much of a failed job's log goes into the status message.
ERROR_TAIL_LINES = 3
ERROR_TAIL_CHARS = 600


def _is_missing(exc: Exception) -> bool:
    text = str(exc).lower()
    return "does not exist" in text or "not found" in text or "404" in text


class RayJobsBackend:
    """Submits ``python -m rasterkube.jobs ...`` with a deterministic submission id."""

    name = BackendName.RAY

    def __init__(self, address: str, client: Any | None = None) -> None:
        self.address = address.rstrip("/")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    def dashboard_url(self, job_id: str) -> str:
        return f"{self.address}/#/jobs/{job_id}"

    def submit(self, spec: JobSpec) -> str:
        try:
            self.client.submit_job(
                entrypoint=spec.entrypoint,
                submission_id=spec.job_id,
                runtime_env={"env_vars": spec.env} if spec.env else None,
                metadata={**spec.metadata, "job_submission_id": spec.job_id},
                entrypoint_num_cpus=0,  # the driver only schedules; blocks get the CPUs
            )
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise
            log.info("job %s already submitted; following it", spec.job_id)
        return self.dashboard_url(spec.job_id)

    def status(self, job_id: str, owner: Owner) -> JobStatus:
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as exc:
            if _is_missing(exc):
                return JobStatus(JobState.MISSING, str(exc))
            raise
        state = RAY_STATES.get(str(getattr(info.status, "value", info.status)), JobState.PENDING)
        progress, result = self._log_state(job_id)
        message = info.message or ""
        if state == JobState.FAILED and not (result or {}).get("error"):
            message = self._error_tail(job_id) or message
        return JobStatus(state, message, progress=progress, result=result, dashboard_url=self.dashboard_url(job_id))

    def _log_state(self, job_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        try:
            return last_progress(self.client.get_job_logs(job_id))
        except RuntimeError:
            return None, None

    def _error_tail(self, job_id: str) -> str:
        try:
            logs = self.client.get_job_logs(job_id).strip()
        except RuntimeError:
            return ""
        lines = [line for line in logs.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        if errors:
            return errors[-1].removeprefix("error: ")
        return "\n".join(lines[-ERROR_TAIL_LINES:])[-ERROR_TAIL_CHARS:]

    def stop(self, job_id: str, owner: Owner) -> None:
        try:
            self.client.stop_job(job_id)
        except RuntimeError as exc:
            if not _is_missing(exc):
                raise
