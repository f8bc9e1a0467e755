"""What a flow run reported, read back through the Prefect API of the server the test runs against."""

from __future__ import annotations


def flow_run_artifacts(flow_run_id) -> dict:
    """{key: artifact} of one flow run, read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a for a in run_coro_as_sync(read())}


def flow_run_logs(flow_run_id) -> list[str]:
    """Every log message of one flow run (and its task runs), read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return [log.message for log in run_coro_as_sync(read())]


def flow_run_log_records(flow_run_id) -> list:
    """Every log record (Prefect `Log`: timestamp, task_run_id, message) of one flow run and its task runs,
    oldest first, read back through the Prefect API page by page (the server answers 200 at most)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read():
        found = []
        async with get_client() as client:
            while page := await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                                 limit=200, offset=len(found)):
                found += page
        return found

    return run_coro_as_sync(read())
