"""Schemathesis against /api/v1/openapi.json: every operation, in-process, bounded; no 5xx, no lies.

Each operation gets generated requests (valid and invalid by the document) with an admin key; half
of them aim at ids that exist (a workflow, a run of it, a secret) so the 200 paths are checked
too, not only the 404s. A response that is a 5xx, has an undocumented status or content type, or
whose body or headers do not match the documented schema fails the test. The figures are printed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
import schemathesis.specs.openapi.schemas  # noqa: F401
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import api.events
from tests.conftest import new_key

# schemathesis.specs.openapi.schemas is imported at collection, on purpose: schemathesis imports
# its OpenAPI module lazily, and CPython 3.11.7 can fail to compile a module ("AST constructor
# recursion depth mismatch", fixed in 3.11.8) once an earlier test in the process has recovered from
# a RecursionError.

EXAMPLES_PER_OPERATION = 100  # x 30 operations: ~2,700 cases, about 30 s in-process
MIN_CASES = 1_000
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
SECRET_NAME = "FUZZ_SECRET"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@dataclass
class Figures:
    """What the run did, printed at the end whatever the outcome."""

    operations: list[str] = field(default_factory=list)
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    violations: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    def report(self, elapsed_s: float) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return (
            f"fuzz: {len(self.operations)} operations, {self.cases} cases in {elapsed_s:.1f} s, "
            f"{self.server_errors} server errors, {self.violations} schema violations ({codes})"
        )


@pytest.fixture(scope="module")
def fuzz_key(services: Any) -> str:
    """An admin key of a company of its own (new_key makes admin keys)."""
    return new_key(services, "fuzz")


@pytest.fixture(scope="module")
def known_ids(app: Any, fuzz_key: str) -> dict[str, str]:
    """Ids that exist, so generated requests reach the handlers' success paths too."""
    client, headers = app.test_client(), {"x-api-key": fuzz_key}
    created = client.post(
        "/api/v1/workflows",
        json={"name": "fuzz", "steps": [{"id": "a", "action": "transform", "input": {"x": 1}}]},
        headers=headers,
    )
    assert created.status_code == 201, created.get_json()
    workflow_id = created.get_json()["data"]["id"]
    run = client.post(f"/api/v1/workflows/{workflow_id}/runs", json={"input": {}}, headers=headers)
    assert run.status_code == 202, run.get_json()
    secret = client.put(f"/api/v1/secrets/{SECRET_NAME}", json={"value": "s3cr3t-value"}, headers=headers)
    assert secret.status_code == 200, secret.get_json()
    run_id = run.get_json()["data"]["id"]
    # A retry of a run that has not failed: an action that selects nothing and touches no run.
    bulk = client.post("/api/v1/runs/bulk/retry", json={"runIds": [run_id]}, headers=headers)
    assert bulk.status_code == 202, bulk.get_json()
    return {
        "workflow_id": workflow_id,
        "run_id": run_id,
        "name": SECRET_NAME,
        "bulk_id": bulk.get_json()["data"]["id"],
    }


@pytest.fixture(scope="module")
def schema(app: Any) -> Any:
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)


def _documented_statuses(document: dict[str, Any]) -> dict[str, set[int]]:
    """Each operation's explicitly documented statuses (the catch-all ``default`` does not count)."""
    return {
        f"{method.upper()} {path}": {int(code) for code in operation["responses"] if code.isdigit()}
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if method in METHODS
    }


def _status_is_documented(statuses: dict[str, set[int]]) -> Any:
    """A check: the answer's status is one the operation lists (schemathesis accepts any status
    when a ``default`` response exists, and every operation has the error envelope as its default)."""

    def explicitly_documented_status(ctx: Any, response: Any, case: Any) -> None:
        documented = statuses[case.operation.label]
        assert response.status_code in documented, (
            f"{response.status_code} is not among the documented statuses {sorted(documented)}"
        )

    return explicitly_documented_status


def _operations(schema: Any) -> Iterator[Any]:
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # an operation the document cannot describe is a bug
        yield result.ok()


def _strategy(operation: Any, headers: dict[str, str], known: dict[str, str]) -> Any:
    """Valid and invalid requests, with generated ids and (when the path has ids) existing ones."""
    strategies = [
        operation.as_strategy(generation_mode=mode, headers=headers)
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    ]
    names = [p.name for p in operation.path_parameters]
    # Deleting the known workflow or secret would leave every later case a 404: those keep random ids.
    if names and all(n in known for n in names) and operation.method.upper() != "DELETE":
        fixed = {n: known[n] for n in names}
        strategies.append(operation.as_strategy(headers=headers, path_parameters=fixed))
    return st.one_of(strategies)


def _fuzz_operation(operation: Any, strategy: Any, checks: list[Any], figures: Figures) -> None:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,  # the same cases every run: a failure in CI reproduces locally
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call()
        figures.cases += 1
        figures.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks)
        except (Exception, FailureGroup):  # FailureGroup is a BaseExceptionGroup
            if response.status_code >= 500:
                figures.server_errors += 1
            else:
                figures.violations += 1
            raise

    try:
        run()
    except (Exception, FailureGroup) as exc:  # keep going: one report names every operation that failed
        figures.failures[operation.label] = str(exc)[:3000]


@pytest.mark.timeout(300)
def test_every_operation_answers_as_documented(
    app: Any, schema: Any, fuzz_key: str, known_ids: dict[str, str], capsys: Any, monkeypatch: Any
) -> None:
    # An event stream answers until its run ends or its time limit: here each one ends at once.
    monkeypatch.setattr(api.events, "STREAM_MAX_S", 0.05)
    figures = Figures()
    started = time.monotonic()
    headers = {"x-api-key": fuzz_key}
    statuses = _documented_statuses(app.test_client().get("/api/v1/openapi.json").get_json())
    checks = [*CHECKS, _status_is_documented(statuses)]
    for operation in _operations(schema):
        figures.operations.append(operation.label)
        _fuzz_operation(operation, _strategy(operation, headers, known_ids), checks, figures)
    with capsys.disabled():
        print("\n" + figures.report(time.monotonic() - started))
        for label, message in figures.failures.items():
            print(f"--- {label}\n{message}")
    assert not figures.failures, sorted(figures.failures)
    assert figures.server_errors == 0 and figures.violations == 0
    assert figures.cases >= MIN_CASES, figures.cases
    assert sorted(figures.operations) == sorted(statuses)  # every documented operation was fuzzed
