"""The gateway's OpenAPI 3.1 document, written out rather than inferred from handlers.

Submit takes three body shapes on one path (CloudEvents structured and binary
mode, plain JSON), which a framework deriving schemas from function
signatures cannot say; so the contract is written here, and the tests hold
the app to it (schemathesis generates requests from this document and checks
every answer against it). The ``data`` schema is the pipeline's own schema for
the upstream topic's event type, and the limits are the running settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sluicegate.sinks.queries import AUDIT_KINDS

if TYPE_CHECKING:
    from sluicegate.gateway.app import Gateway

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }
    if retry_after:
        answer["headers"] = {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}
        }
    return answer


UNAUTHORIZED = _problem("No API key, or an unknown or revoked one")


def _data_schema(gateway: Gateway, components: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of the upstream type's ``data``, its definitions moved to components."""
    publisher = gateway.publisher
    model = None
    if publisher.registry is not None and publisher.default_type is not None:
        model = publisher.registry.model_for(publisher.default_type)
    if model is None:
        return {"type": "object"}
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return _ref(model.__name__)


def _schemas(gateway: Gateway) -> dict[str, Any]:
    components: dict[str, Any] = {}
    data = _data_schema(gateway, components)
    event_type = gateway.publisher.default_type
    common: dict[str, Any] = {
        "id": {
            "type": "string",
            "minLength": 1,
            "maxLength": 128,
            "description": "Your id for the task: a retry with the same id is the same task "
            "(the task id answered is derived from it and your tenant).",
        },
        "session": {"type": "string", "minLength": 1, "maxLength": 256},
        "subject": {"type": "string"},
        "time": {"type": "string", "format": "date-time"},
        "tenant": {
            "type": "string",
            "description": "Optional; if given it must be the API key's tenant.",
        },
        "data": data,
    }
    if event_type is not None:
        common["type"] = {"type": "string", "enum": [event_type]}
    components.update(
        {
            "PlainTask": {
                "type": "object",
                "required": ["session", "data"],
                "properties": common,
            },
            "CloudEvent": {
                "type": "object",
                "required": ["specversion", "session", "data"],
                "properties": {
                    "specversion": {"type": "string", "enum": ["1.0"]},
                    "source": {"type": "string", "minLength": 1, "maxLength": 512},
                    "traceparent": {"type": "string"},
                    "tracestate": {"type": "string"},
                    **common,
                },
            },
            "TaskAccepted": {
                "type": "object",
                "required": ["task_id"],
                "properties": {"task_id": {"type": "string"}},
            },
            "BatchAccepted": {
                "type": "object",
                "required": ["task_ids"],
                "properties": {"task_ids": {"type": "array", "items": {"type": "string"}}},
            },
            "Result": {
                "type": "object",
                "required": ["task_id", "status", "answer"],
                "properties": {
                    "task_id": {"type": "string"},
                    "status": {"type": "string"},
                    "answer": {},
                    "session": {"type": "string"},
                    "trace_id": {"type": ["string", "null"]},
                    "created_at": {"type": "string", "format": "date-time"},
                },
            },
            "AuditEvent": {
                "type": "object",
                "required": ["time", "event_id", "step", "event_type", "kind"],
                "properties": {
                    "time": {"type": "string", "format": "date-time"},
                    "event_id": {"type": "string"},
                    "causation_id": {"type": ["string", "null"]},
                    "step": {"type": "string"},
                    "event_type": {"type": "string"},
                    "kind": {"type": "string", "enum": list(AUDIT_KINDS)},
                    "decision": {"type": ["string", "null"]},
                    "reasons": {"type": "array", "items": {"type": "string"}},
                    "policy_version": {"type": ["string", "null"]},
                    "trace_id": {"type": ["string", "null"]},
                    "detail": {"type": "object"},
                    "chain": {"type": "object"},
                },
            },
            "SessionAudit": {
                "type": "object",
                "required": ["session", "events"],
                "properties": {
                    "session": {"type": "string"},
                    "events": {"type": "array", "items": _ref("AuditEvent")},
                },
            },
            "Approval": {
                "type": "object",
                "required": ["id", "tenant", "session", "task_id", "tool", "args", "reasons"],
                "properties": {
                    "id": {"type": "string"},
                    "tenant": {"type": "string"},
                    "session": {"type": "string"},
                    "task_id": {"type": "string"},
                    "tool": {"type": "string"},
                    "args": {"type": "object"},
                    "reasons": {"type": "array", "items": {"type": "string"}},
                    "deadline": {"type": "string"},
                    "status": {"type": "string", "enum": ["pending", "approved", "denied"]},
                    "created_at": {"type": "string"},
                    "policy_version": {"type": ["string", "null"]},
                    "trace_id": {"type": ["string", "null"]},
                    "decided_by": {"type": ["string", "null"]},
                    "decided_reason": {"type": ["string", "null"]},
                    "decided_at": {"type": ["string", "null"]},
                },
            },
            "Approvals": {
                "type": "object",
                "required": ["approvals"],
                "properties": {"approvals": {"type": "array", "items": _ref("Approval")}},
            },
            "Decision": {
                "type": "object",
                "required": ["reason"],
                "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 2000}},
            },
            "Health": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"type": "string"},
                    "publishing": {"type": "string", "enum": ["ok", "backed_up"]},
                    "pending": {"type": "integer"},
                },
            },
            "Problem": {
                "type": "object",
                "required": ["type", "title", "status", "detail"],
                "properties": {
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "reason": {"type": "string"},
                },
            },
        }
    )
    return components


def _submit_errors() -> dict[str, Any]:
    return {
        "400": _problem("Not JSON, or not a valid task (reason says which)"),
        "401": UNAUTHORIZED,
        "403": _problem("The task names a tenant that is not the key's"),
        "413": _problem("The body, or an event, is over the size limit"),
        "415": _problem("A content type the gateway does not take"),
        "429": _problem("Publishing is backed up: retry after Retry-After", retry_after=True),
        "503": _problem("The broker did not take the tasks", retry_after=True),
    }


def _decision(verb: str, bearer: list[dict[str, list[str]]]) -> dict[str, Any]:
    return {
        "post": {
            "summary": f"{verb.capitalize()} a held action, with a reason",
            "security": bearer,
            "parameters": [
                {
                    "name": "approval_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("Decision")}},
            },
            "responses": {
                "200": {
                    "description": "Decided; the gate resumes or drops the action",
                    "content": {"application/json": {"schema": _ref("Approval")}},
                },
                "400": _problem("No reason"),
                "401": UNAUTHORIZED,
                "404": _problem("No such held action for this tenant"),
                "409": _problem("Already decided, or past its deadline (then denied)"),
                "413": _problem("The body is over the size limit"),
                "503": _problem("The database is unavailable", retry_after=True),
            },
        }
    }


def document(gateway: Gateway) -> dict[str, Any]:
    settings = gateway.settings
    bearer: list[dict[str, list[str]]] = [{"apiKey": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sluicegate gateway",
            "version": "1",
            "description": "Submit tasks to a sluicegate pipeline and read their results "
            "and audit trail. Every call but /healthz and /openapi.json takes "
            "Authorization: Bearer KEY (`sluice keys create --tenant T`); the key's tenant is "
            "the tenant of everything the call publishes or reads.",
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(gateway),
        },
        "paths": {
            "/v1/tasks": {
                "post": {
                    "summary": "Submit one task",
                    "description": "As plain JSON, as a CloudEvent in structured mode, or in "
                    "binary mode (attributes in ce-* headers, ce-specversion among them, and "
                    "the body the event's data). A traceparent header continues into the "
                    "task's trace.",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": _ref("PlainTask")},
                            "application/cloudevents+json": {"schema": _ref("CloudEvent")},
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "On the topic (the broker acknowledged it)",
                            "content": {"application/json": {"schema": _ref("TaskAccepted")}},
                        },
                        **_submit_errors(),
                    },
                }
            },
            "/v1/tasks:batch": {
                "post": {
                    "summary": "Submit many tasks, all or none",
                    "security": bearer,
                    "requestBody": {
                        "required": True,
                        "content": {
                            media: {
                                "schema": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": settings.gateway_max_batch,
                                    "items": {"anyOf": [_ref("PlainTask"), _ref("CloudEvent")]},
                                }
                            }
                            for media in ("application/json", "application/cloudevents-batch+json")
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "All on the topic, ids in the order sent",
                            "content": {"application/json": {"schema": _ref("BatchAccepted")}},
                        },
                        **_submit_errors(),
                    },
                }
            },
            "/v1/tasks/{task_id}": {
                "get": {
                    "summary": "A task's result",
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "task_id",
                            "in": "path",
                            "required": True,
                            "description": "The task id the submit answered, or your own id",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "Seconds to wait for the result",
                            "schema": {
                                "type": "number",
                                "minimum": 0,
                                "maximum": settings.gateway_max_wait,
                            },
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The result",
                            "content": {"application/json": {"schema": _ref("Result")}},
                        },
                        "400": _problem("A bad wait"),
                        "401": UNAUTHORIZED,
                        "404": _problem("No result yet, or not this tenant's task"),
                        "503": _problem("The database is unavailable", retry_after=True),
                    },
                }
            },
            "/v1/results/stream": {
                "get": {
                    "summary": "The tenant's results as server-sent events (event: result)",
                    "description": "From now on, or after the result named by Last-Event-ID.",
                    "security": bearer,
                    "responses": {
                        "200": {
                            "description": "An endless text/event-stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "401": UNAUTHORIZED,
                    },
                }
            },
            "/v1/sessions/{session}/audit": {
                "get": {
                    "summary": "A session's audit timeline, in commit order",
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "session",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "kind",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": list(AUDIT_KINDS)},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The timeline (empty for a session unknown to "
                            "this tenant)",
                            "content": {"application/json": {"schema": _ref("SessionAudit")}},
                        },
                        "400": _problem("An unknown kind"),
                        "401": UNAUTHORIZED,
                        "503": _problem("The database is unavailable", retry_after=True),
                    },
                }
            },
            "/v1/approvals": {
                "get": {
                    "summary": "The tenant's held actions, oldest first (pending by default)",
                    "security": bearer,
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "string",
                                "enum": ["pending", "approved", "denied", "all"],
                            },
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "Held actions",
                            "content": {"application/json": {"schema": _ref("Approvals")}},
                        },
                        "400": _problem("A bad status or limit"),
                        "401": UNAUTHORIZED,
                        "503": _problem("The database is unavailable", retry_after=True),
                    },
                }
            },
            **{
                f"/v1/approvals/{{approval_id}}:{verb}": _decision(verb, bearer)
                for verb in ("approve", "deny")
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness, and whether publishing is backed up",
                    "responses": {
                        "200": {
                            "description": "Serving",
                            "content": {"application/json": {"schema": _ref("Health")}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }
