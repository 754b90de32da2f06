"""The backend's OpenAPI schema says what the server does: schemathesis sends generated requests (valid ones and
broken ones) to every operation and runs its default checks, response-schema conformance included."""

import schemathesis
from hypothesis import settings

from lvlm_interpret import ExplainService
from lvlm_interpret.analysis.ablation import REPLACEMENTS
from lvlm_interpret.analysis.token_sets import KINDS
from lvlm_interpret.export import EXPORT_KINDS
from lvlm_interpret.methods import METHODS
from lvlm_interpret.methods.attention import AGGREGATIONS
from lvlm_interpret.server import create_api

API = create_api(ExplainService(default_model="demo", device="cpu"))  # the model loads only if a request needs it
# A request the schema allows may still be refused (400) for what JSON Schema cannot say: whether the uploaded bytes
# are a readable image and the prompt fits the model, whether an option exists for the chosen method, whether the
# export's and trust's options string is JSON naming methods, whether a feature number exists in the SAE. Elsewhere a
# valid request gets an answer or 404 (unknown id).
CHECKED_BEYOND_THE_SCHEMA = ("/v1/generate", "/v1/explain", "/v1/explain_answer",
                             "/v1/export/{request_id}/{token_index}/{kind}", "/v1/trust/{request_id}/{token_index}",
                             "/v1/sae/feature", "/v1/sae/steer")
CONFIG = schemathesis.Config.from_dict({"operations": [
    {"include-path": path, "checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", "400", "404", "429", "5xx"]}}}  # 5xx: not_a_server_error reports those
    for path in CHECKED_BEYOND_THE_SCHEMA]})
schema = schemathesis.openapi.from_asgi("/openapi.json", API, config=CONFIG)


@schema.parametrize()
@settings(max_examples=10, deadline=None)  # about 50 cases per operation with the coverage phase's, in seconds
def test_the_server_keeps_to_its_schema(case):
    case.call_and_validate()


def test_errors_and_fixed_lists_are_declared():
    document = API.openapi()
    components = document["components"]["schemas"]
    assert components["ErrorBody"]["properties"] == {"error": {"type": "string", "title": "Error"}}
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            declared = operation["responses"]
            assert "422" not in declared, (verb, path)  # refused input is 400 here
            refusals = ["413", "500"]
            if path not in ("/v1/health", "/v1/methods"):
                # 404: unknown request id; a job's status and cancel compute nothing, so are never busy (503)
                refusals += ["400"] + ([] if path.startswith("/v1/jobs/") else ["503"]) + \
                    ([] if path == "/v1/generate" else ["404"])
            for status in refusals:
                body = declared[status]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorBody"}, (verb, path, status)
    assert "Retry-After" in document["paths"]["/v1/explain"]["post"]["responses"]["503"]["headers"]

    def enum(model: str, field: str) -> list:
        schema_ = components[model]["properties"][field]
        return next(option["enum"] for option in schema_.get("anyOf", [schema_]) if "enum" in option)

    assert enum("ExplainRequest", "method") == sorted(METHODS)
    assert enum("TokenSetRequest", "method") == sorted(METHODS)
    assert enum("TokenSetRequest", "kind") == list(KINDS)
    assert enum("AblationRequest", "replacement") == list(REPLACEMENTS)
    assert enum("ReverseRequest", "aggregation") == list(AGGREGATIONS)
    export = document["paths"]["/v1/export/{request_id}/{token_index}/{kind}"]["get"]
    assert next(p for p in export["parameters"] if p["name"] == "kind")["schema"]["enum"] == list(EXPORT_KINDS)
