"""Property-based API testing with Schemathesis against the app's own OpenAPI schema (real Postgres + Redis).

Schemathesis generates requests from ``/openapi.json`` (valid and invalid bodies, headers, path and query
parameters) and checks every answer: no server error (5xx), status codes, content types, headers and
bodies as the schema documents them. Requests carry a valid bearer token, so they reach the handlers.

Excluded check: ``positive_data_acceptance``. A schema-valid request may still be refused with 422 for
reasons no schema can express (a teacher file that is valid multipart but not a valid SAE, an ``sae_id``
of the right shape that names no SAE); those refusals are exactly what the bad-input corpus tests.

Each operation's strategy is driven by Hypothesis directly (``operation.as_strategy()``):
``schemathesis.pytest.from_fixture`` does not work with pytest 9.
"""

from __future__ import annotations

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from support.servers import bearer

EXAMPLES_PER_OPERATION = 40


def test_api_conforms_to_its_openapi_schema(client: TestClient, api_token: str, sae_id: str) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=bearer(api_token), excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report all
            failures[op.label] = f"{type(e).__name__}: {e}"[:3000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def _has_example(node: object, schemas: dict) -> bool:
    if isinstance(node, dict):
        if "example" in node or "examples" in node:
            return True
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return _has_example(schemas[ref.rsplit("/", 1)[-1]], schemas)
        if "content" in node or "schema" not in node and all(isinstance(v, dict) for v in node.values()):
            node = node.get("content", node)  # a media-type map: any media type with an example will do
            return any(_has_example(v, schemas) for v in node.values())
        return any(_has_example(node[k], schemas) for k in ("schema", "items", "anyOf") if k in node)
    if isinstance(node, list):
        return any(_has_example(v, schemas) for v in node)
    return False


def test_every_operation_documents_an_example(client: TestClient) -> None:
    """Each operation's success response (and each request body) shows an example in the OpenAPI schema
    (a 204 No Content has no body to show, e.g. DELETE /saes/{id})."""
    spec = client.app.openapi()
    schemas = spec["components"]["schemas"]
    missing = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            ok = [r for code, r in op["responses"].items() if code.startswith("2") and code != "204"]
            if ok and not any(_has_example(r.get("content", {}), schemas) for r in ok):
                missing.append(f"{method.upper()} {path} response")
            body = op.get("requestBody")
            if (
                body is not None
                and not _has_example(body["content"], schemas)
                and not any("examples" in c for c in body["content"].values())
            ):
                missing.append(f"{method.upper()} {path} request body")
    assert not missing, missing
