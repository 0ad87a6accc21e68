"""Field names of the Runs API spec, shared by the contract tests."""

LIST_ITEM_FIELDS = (
    "id",
    "workflowId",
    "status",
    "triggerType",
    "startedAt",
    "completedAt",
    "durationMs",
    "error",
    "createdAt",
)
LIST_ITEM_KEYS = set(LIST_ITEM_FIELDS)
DETAIL_KEYS = LIST_ITEM_KEYS | {"input", "output", "stepResults"}
STEP_KEYS = {
    "stepId",
    "status",
    "startedAt",
    "completedAt",
    "durationMs",
    "input",
    "output",
    "error",
    "attempt",
}
LOGS_KEYS = {"runId", "workflowId", "status", "logs", "startedAt", "completedAt", "durationMs", "error"}
