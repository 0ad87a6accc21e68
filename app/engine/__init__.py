"""The run and step state machine (DESIGN §2.1, §5): the public face used by the API, the CLI,
the workers and the scheduler.

- ``states``: the legal moves, the owner and deadline of every non-final state;
- ``transitions``: one function per move, the only code that writes a status;
- ``trigger`` / ``batch`` / ``restart``: new runs (idempotency shared); ``control``: cancel and resume;
- ``execution``: claim and record (chain, retry, fail, complete, park); ``sweeps``: recovery.
"""

from app.engine.batch import trigger_batch
from app.engine.control import cancel_run, resume_run
from app.engine.execution import claim_step, record_result, release_claim, renew_leases
from app.engine.hotpath import abandon_claim, commit_claim
from app.engine.reads import (
    definition_for,
    get_run,
    get_workflow,
    restarted_run_ids,
    step_attempts,
    step_runs,
)
from app.engine.restart import RestartPlan, deep_merge, plan_restart, start_restart
from app.engine.retry import RetryPolicy
from app.engine.states import IllegalTransition, is_terminal, shown_in_results
from app.engine.sweeps import sweep
from app.engine.trigger import IDEMPOTENCY_TTL, request_hash, trigger_run
from app.engine.types import Claim, Next, Outcome

__all__ = [
    "IDEMPOTENCY_TTL",
    "Claim",
    "IllegalTransition",
    "Next",
    "Outcome",
    "RestartPlan",
    "RetryPolicy",
    "abandon_claim",
    "cancel_run",
    "claim_step",
    "commit_claim",
    "deep_merge",
    "definition_for",
    "get_run",
    "get_workflow",
    "is_terminal",
    "plan_restart",
    "record_result",
    "release_claim",
    "renew_leases",
    "request_hash",
    "restarted_run_ids",
    "resume_run",
    "shown_in_results",
    "start_restart",
    "step_attempts",
    "step_runs",
    "sweep",
    "trigger_batch",
    "trigger_run",
]
