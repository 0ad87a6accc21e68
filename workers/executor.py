"""Execute a step, record it, and keep going inline while the next step is due now (DESIGN §11).

A database or Redis outage never strands a step: before the claim the message is retried with
back-off (Dramatiq's Retries, transient errors only); once a step is claimed its result is
recorded with retries while the heartbeat keeps its lease.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from app import engine, logs, redaction, slots, templating
from app import secrets as secret_store
from app.actions import ActionContext, Park, StepError
from app.actions import get as get_action
from app.config import Config
from app.engine import Claim, Outcome
from app.errors import is_transient
from app.services import Services
from app.timeutil import duration_ms, utcnow
from models.states import StepStatus
from workers import foreach
from workers.middleware import LeaseHeartbeat, StepTimeLimit, StepTimeout

logger = logging.getLogger("baton.worker")
# urllib3 logs every request line at DEBUG: URLs carry rendered secrets and query credentials.
logging.getLogger("urllib3.connectionpool").setLevel(logging.INFO)
S = StepStatus
T = TypeVar("T")
PERSIST_FOR_S = 120.0  # how long a held step's record is retried through an outage


def run_action(
    claim: Claim,
    step_input: Any,
    config: Config | None = None,
    *,
    attempt: int | None = None,
    item_index: int | None = None,
) -> Any:
    """Call the step's action (the caller holds the step's time limit); errors are ``StepError``.
    A ``forEach`` item passes its index and its own attempt number."""
    step = claim.step
    func = get_action(step["action"])
    if func is None:
        raise StepError("UNKNOWN_ACTION", f"Unknown action {step['action']!r}")
    ctx = ActionContext(
        claim.run_id,
        claim.step_id,
        attempt or claim.attempt,
        step["timeoutMs"] / 1000,
        claim.started_at,
        config,
        item_index,
    )
    return func(ctx, step_input)


def execute(
    claim: Claim,
    time_limit: StepTimeLimit,
    config: Config | None = None,
    secrets: dict[str, str] | None = None,
    host: foreach.Host | None = None,
) -> Outcome:
    """Evaluate ``if``, render and run the action, all within the step's ``timeoutMs`` (a
    ``forEach`` step's: each item within it); never raises for a step failure."""
    started = utcnow()
    if claim.waited_since is not None:
        # A delay that is now due: it completes without running anything.
        output = {"delayedMs": duration_ms(claim.waited_since, started)}
        return Outcome(S.SUCCESS, input=claim.resumed_input, output=output, started_at=claim.waited_since)
    token = time_limit.arm(claim.step["timeoutMs"] / 1000)
    acting, step_input = False, None
    try:
        if "forEach" in claim.step:
            items = _render_items(claim, started, secrets)
            if isinstance(items, Outcome):
                return items
            time_limit.disarm(token)  # each item runs within the step's timeoutMs, not the lot
            return _fan_out(claim, items, started, time_limit, config, secrets or {}, host or foreach.Host())
        rendered = _render(claim, started, secrets)
        if isinstance(rendered, Outcome):
            return rendered
        acting, step_input = True, rendered
        return _act(claim, step_input, started, config)
    except StepTimeout:
        timeout_ms = claim.step["timeoutMs"]
        if not acting:  # a template ran past the step's timeout (its own limits should stop it first)
            message = f"Rendering took longer than the step's {timeout_ms} ms"
            return Outcome(S.ERROR, error={"code": "TEMPLATE_ERROR", "message": message}, started_at=started)
        message = f"Step {claim.step_id!r} exceeded its timeout of {timeout_ms} ms"
        error = {"code": "STEP_TIMEOUT", "message": message}
        return Outcome(S.ERROR, input=step_input, error=error, retriable=True, started_at=started)
    finally:
        time_limit.disarm(token)


def _render(claim: Claim, started: Any, secrets: dict[str, str] | None = None) -> Any:
    """The step's rendered input, or the Outcome that ends it here (``if`` false, template error)."""
    step, context = claim.step, _context(claim, secrets)
    try:
        if "if" in step and not templating.truthy(step["if"], context):
            return Outcome(S.SKIPPED, started_at=started)
        return templating.render(step.get("input", {}), context, "input")
    except templating.TemplateError as exc:
        return _template_error(str(exc), started)
    except (RecursionError, MemoryError, OverflowError) as exc:
        return _template_error(f"Template could not be rendered: {type(exc).__name__}", started)


def _context(claim: Claim, secrets: dict[str, str] | None) -> dict[str, Any]:
    """What the step's templates see: the steps it needs (``Claim.step_context``), its secrets."""
    context = claim.step_context()
    if secrets:
        context["secrets"] = secrets
    return context


def _template_error(message: str, started: Any) -> Outcome:
    return Outcome(S.ERROR, error={"code": "TEMPLATE_ERROR", "message": message}, started_at=started)


def _render_items(claim: Claim, started: Any, secrets: dict[str, str] | None) -> Any:
    """A ``forEach`` step's items (its ``if`` is evaluated once, before), or the Outcome that ends
    it here (``if`` false, template error, not a list)."""
    step, context = claim.step, _context(claim, secrets)
    try:
        if "if" in step and not templating.truthy(step["if"], context):
            return Outcome(S.SKIPPED, started_at=started)
        items = templating.render(step["forEach"], context, "forEach")
    except templating.TemplateError as exc:
        return _template_error(str(exc), started)
    except (RecursionError, MemoryError, OverflowError) as exc:
        return _template_error(f"Template could not be rendered: {type(exc).__name__}", started)
    error = foreach.items_error(items)
    if error is not None:
        return Outcome(S.ERROR, input={"forEach": items}, error=error, started_at=started)
    return items


def _fan_out(
    claim: Claim,
    items: list[Any],
    started: Any,
    time_limit: StepTimeLimit,
    config: Config | None,
    secrets: dict[str, str],
    host: foreach.Host,
) -> Outcome:
    """Run the step once per item (``item`` and ``index`` in its templates), each attempt of each
    item within the step's ``timeoutMs``, in the item's thread."""
    context = _context(claim, secrets)
    timeout_ms = claim.step["timeoutMs"]

    def attempt(index: int, number: int, item: Any) -> Outcome:
        began = utcnow()
        token = time_limit.arm(timeout_ms / 1000)
        acting, step_input = False, None
        try:
            item_context = {**context, "item": item, "index": index}
            try:
                step_input = templating.render(claim.step.get("input", {}), item_context, "input")
            except templating.TemplateError as exc:
                return _template_error(str(exc), began)
            except (RecursionError, MemoryError, OverflowError) as exc:
                return _template_error(f"Template could not be rendered: {type(exc).__name__}", began)
            acting = True
            outcome = _act(claim, step_input, began, config, attempt=number, item_index=index)
        except StepTimeout:
            if not acting:
                return _template_error(f"Rendering took longer than the step's {timeout_ms} ms", began)
            message = (
                f"forEach item {index} of step {claim.step_id!r} exceeded its timeout of {timeout_ms} ms"
            )
            error = {"code": "STEP_TIMEOUT", "message": message}
            return Outcome(S.ERROR, input=step_input, error=error, retriable=True, started_at=began)
        finally:
            time_limit.disarm(token)
        if outcome.status == S.WAITING:  # a delay or an approval: a step may wait, an item cannot
            error = {"code": foreach.FOREACH_ERROR, "message": f"Action {claim.step['action']!r} waits"}
            return Outcome(S.ERROR, input=step_input, error=error, started_at=began)
        return outcome

    return foreach.fan_out(claim, items, attempt, host, secrets, started)


def _act(
    claim: Claim,
    step_input: Any,
    started: Any,
    config: Config | None,
    *,
    attempt: int | None = None,
    item_index: int | None = None,
) -> Outcome:
    """Run the action on the rendered input: its output, a park, or its error."""
    try:
        result = run_action(claim, step_input, config, attempt=attempt, item_index=item_index)
        if isinstance(result, Park):
            return Outcome(S.WAITING, input=step_input, started_at=started, park=result)
        output = templating.to_json(result)
    except StepError as exc:
        return Outcome(
            S.ERROR,
            input=step_input,
            error=exc.to_dict(),
            retriable=exc.retriable,
            retry_after_ms=exc.retry_after_ms,
            started_at=started,
        )
    except StepTimeout:
        raise
    except Exception as exc:  # an action's bug must fail the step, not the worker
        logger.exception("action %s of step %s crashed", claim.step["action"], claim.step_id)
        error = {"code": "ACTION_ERROR", "message": f"{type(exc).__name__}: {exc}"}
        return Outcome(S.ERROR, input=step_input, error=error, retriable=True, started_at=started)
    return Outcome(S.SUCCESS, input=step_input, output=output, started_at=started)


_uses_secrets: dict[tuple[int, int], tuple[dict[str, Any], bool]] = {}


def uses_secrets(claim: Claim) -> bool:
    """Whether the step's ``input`` or ``if`` mentions ``secrets`` (cached per definition version:
    steps without secrets never query the store)."""
    key = (id(claim.definition), claim.position)
    cached = _uses_secrets.get(key)
    if cached is not None and cached[0] is claim.definition:
        return cached[1]
    step = claim.step
    found = "secrets" in repr(step.get("input")) or "secrets" in repr(step.get("if", ""))
    if len(_uses_secrets) > 10_000:
        _uses_secrets.clear()
    _uses_secrets[key] = (claim.definition, found)
    return found


def step_secrets(services: Services, claim: Claim) -> dict[str, str]:
    """The company's decrypted secrets when the step uses any, else nothing (no query)."""
    if not uses_secrets(claim):
        return {}

    def load() -> dict[str, str]:
        with services.db.session() as session:
            return secret_store.values_for(session, services.config, claim.company_id)

    return persist(load)


def redact(claim: Claim, outcome: Outcome, secrets: dict[str, str]) -> Outcome:
    """The outcome as it may be recorded: secret values, sensitive headers and URL credentials
    replaced by [REDACTED] in its input, output and error."""
    values = redaction.forms(secrets.values()) if secrets else []
    outcome.input, outcome.output, outcome.error = redaction.step_record(
        claim.step.get("action", ""), outcome.input, outcome.output, outcome.error, values
    )
    return outcome


def persist(write: Callable[..., T], *args: Any, for_s: float = PERSIST_FOR_S) -> T:
    """Call ``write(*args)`` until it gets through a database or Redis outage (bounded back-off)."""
    deadline, pause = time.monotonic() + for_s, 0.1
    while True:
        try:
            return write(*args)
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + pause > deadline:
                raise
            name = getattr(write, "__name__", "write")
            logger.warning("%s failed (%s); retrying in %.1f s", name, type(exc).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def execute_step(
    services: Services,
    leases: LeaseHeartbeat,
    time_limit: StepTimeLimit,
    run_id: str,
    step_id: str,
    attempt: int,
    company_id: str | None = None,
) -> None:
    """Handle one ``execute_step`` message: take the company's step slot (or park the message),
    claim, execute, record and chain inline; then hand the slot to the company's next parked
    message, if any, and run that one too."""
    message = slots.Message(run_id, step_id, attempt, company_id) if company_id else None
    if message is not None and not slots.enter(services, message):
        return  # parked: the thread that frees one of the company's slots runs it
    while True:
        member = message.member if message is not None else None
        try:
            execute_message(services, leases, time_limit, run_id, step_id, attempt, member)
        except BaseException:
            if message is not None:  # an outage before the claim: Dramatiq retries the message
                slots.release(services, message.company_id, message.member)
            raise
        if message is None:
            return
        message = slots.leave(services, message.company_id, message.member)
        if message is None:
            return
        run_id, step_id, attempt = message.run_id, message.step_id, message.attempt


def execute_message(
    services: Services,
    leases: LeaseHeartbeat,
    time_limit: StepTimeLimit,
    run_id: str,
    step_id: str,
    attempt: int,
    slot: str | None = None,
) -> None:
    """Claim the message's step and run its chain (nothing if the message is stale or cancelled:
    the claim refuses a step of a run that is no longer running, so no cancel flag is read).
    ``slot``: the company step slot the message holds, renewed by the heartbeat with the chain."""
    # An outage: the message is retried. A pure step's claim commits with its result.
    claim = engine.claim_step(services, run_id, step_id, attempt, defer_pure=True)
    if claim is None:
        return
    claim.slot = slot
    try:
        run_chain(services, leases, time_limit, claim)
    finally:
        if claim.tx is not None:  # never left open, whatever stopped the chain
            engine.abandon_claim(claim)


def run_chain(
    services: Services, leases: LeaseHeartbeat, time_limit: StepTimeLimit, claim: Claim | None
) -> None:
    """Execute a claimed step, record it, and keep going inline while the next step is claimed (the
    record claims it only while the run is running: a cancel committed before stops the chain)."""
    while claim is not None:
        # A pure step's deferred claim is not visible to the heartbeat's lease renewal (which would
        # wait on its row); an outage while recording it rolls the claim back, and the message is
        # retried by Dramatiq as before a claim.
        deferred = claim.tx is not None
        if not deferred:
            leases.hold(claim)
        logged = logs.bind(
            run_id=claim.run_id, step_id=claim.step_id, attempt=claim.attempt, company_id=claim.company_id
        )
        try:
            values = step_secrets(services, claim)
            if values:
                logs.redact_in_context(redaction.forms(values.values()))
            host = foreach.Host(services, leases)
            outcome = redact(claim, execute(claim, time_limit, services.config, values, host), values)
            outcome.completed_at = outcome.completed_at or utcnow()
            if deferred and outcome.status not in (S.SUCCESS, S.SKIPPED):
                engine.commit_claim(claim)  # retries, failures and parks take the general way
            if claim.tx is not None:  # the claim commits with the result, or neither does
                nxt = engine.record_result(services, claim, outcome)
            else:
                nxt = persist(engine.record_result, services, claim, outcome)
        except BaseException as exc:
            if claim.tx is not None:
                engine.abandon_claim(claim, exc)
            raise
        finally:
            logs.reset(logged)
            if not deferred:
                leases.release(claim)
        claim = nxt.claim
