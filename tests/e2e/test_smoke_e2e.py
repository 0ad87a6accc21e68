"""End to end: HTTP trigger → real worker on the real broker → Runs API."""

from __future__ import annotations


def test_two_step_workflow_completes(worker, client, headers, target, make_workflow, trigger, wait_run):
    target.reply(200, {"id": "contact-42", "ok": True})
    workflow_id = make_workflow(
        [
            {
                "id": "create-contact",
                "action": "http.request",
                "input": {
                    "method": "POST",
                    "url": f"{target.url}/contacts",
                    "json": {"email": "{{ input.email }}", "amount": "{{ input.amount }}"},
                },
            },
            {
                "id": "summarise",
                "action": "transform",
                "input": {
                    "contactId": "{{ steps['create-contact'].output.body.id }}",
                    "text": "Paid {{ input.amount }}",
                },
            },
        ],
        output={"contactId": "{{ steps.summarise.output.contactId }}"},
    )
    run = trigger(workflow_id, {"email": "a@example.com", "amount": 9900})
    assert run["status"] == "pending"
    done = wait_run(run["id"])
    assert done["status"] == "completed", done
    assert target.requests[0]["json"] == {"email": "a@example.com", "amount": 9900}
    assert done["output"] == {"contactId": "contact-42"}
    first, second = done["stepResults"]
    assert first["stepId"] == "create-contact" and first["attempt"] == 1 and first["status"] == "success"
    assert first["input"]["json"] == {"email": "a@example.com", "amount": 9900}
    assert second["input"] == {"contactId": "contact-42", "text": "Paid 9900"}


def test_step_output_with_nul_is_stored_not_lost(worker, target, make_workflow, trigger, wait_run):
    """PostgreSQL refuses NUL in text and JSONB; a target that sends one must not wedge the run."""
    target.reply(200, {"text": "a\u0000b", "k\u0000": 1})
    workflow_id = make_workflow(
        [{"id": "fetch", "action": "http.request", "input": {"url": f"{target.url}/x"}}]
    )
    done = wait_run(trigger(workflow_id)["id"])
    assert done["status"] == "completed", done
    assert done["stepResults"][0]["output"]["body"] == {"text": "a\ufffdb", "k\ufffd": 1}


def test_unexpected_error_is_an_internal_error_envelope_without_trace(config, services):
    from app.factory import create_app

    app = create_app(config, services)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail in a traceback")

    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.get_json() == {
        "success": False,
        "error": {"code": "INTERNAL_ERROR", "message": "Internal server error"},
    }
    assert b"Traceback" not in response.data and b"secret detail" not in response.data
