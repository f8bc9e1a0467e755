"""Which failures are the user's to fix, and which are worth a retry.

A user error (a config key, an input file, a locked folder, a missing bucket, an exception a training
rank raised) fails the same way every time it is tried: the `vlmft` command reports it as one line
without a traceback (vlmft.terminal) and no task retries it. Anything else is either a transient
failure (storage out of reach after its own retries, a training process killed from outside) or a
bug; a task with retries tries those again.
"""

from __future__ import annotations

from tasks.process import ProcessFailed
from vlm_core.config import ConfigError
from vlm_core.data.shards import PrepareError
from vlm_core.lock import LockHeld
from vlm_core.publish import MergeVerificationError
from vlm_core.storage import StorageError, TransientStorageError


class TrainingFailed(ProcessFailed):
    """A training rank raised an exception; the message names the first rank that did and its exception."""


class JobInterrupted(ProcessFailed):
    """The Slurm training job was preempted, hit its time limit or lost a node: a retry resumes from the
    newest complete checkpoint."""


class JobCancelled(ProcessFailed):
    """The Slurm training job was cancelled outside the flow (scancel by a person or an admin): not retried."""


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions a user fixes by changing the config, the inputs or the environment.
    (ConfigError covers its subclasses: IdentityMismatch, UnsafeCheckpointError, CheckpointError.)"""
    return ConfigError, PrepareError, StorageError, MergeVerificationError, ProcessFailed, LockHeld


def worth_retrying(exc: BaseException) -> bool:
    """True for storage out of reach, a training process that died without an exception of its own
    (killed, out of memory, preempted, a Slurm job that timed out or lost a node: a retry resumes from
    the newest complete checkpoint) and any error that is not a user error; False for user errors,
    which would fail the same way again."""
    if isinstance(exc, TransientStorageError):
        return True
    if type(exc) in (ProcessFailed, JobInterrupted):
        return True
    return not isinstance(exc, user_errors())


def retry_unless_user_error(task, task_run, state) -> bool:
    """`retry_condition_fn` of the tasks with retries (a failed state's data is its exception)."""
    return worth_retrying(state.data)
