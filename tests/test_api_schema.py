"""Schemathesis against the server's own /openapi.json: no 5xx, every response as documented.

Driven through Hypothesis directly (`operation.as_strategy()`), one bounded run per operation: the
schemathesis pytest plugin does not run under the pytest version this project uses.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

MODEL = "tiny-schema"
MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
POSITIVE = GenerationMode.POSITIVE
NEGATIVE = GenerationMode.NEGATIVE


@pytest.fixture(scope="module")
def server(serve_tiny_model):
    # A short context keeps each generated request cheap, whatever n and max_tokens it asks for.
    with serve_tiny_model(MODEL, num_kv_blocks=256, max_model_len=48) as running:
        yield running


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [
        ("POST", "/v1/chat/completions", POSITIVE),
        ("POST", "/v1/chat/completions", NEGATIVE),
        ("POST", "/v1/completions", POSITIVE),
        ("POST", "/v1/completions", NEGATIVE),
        ("GET", "/v1/models", POSITIVE),
        ("GET", "/v1/models/{model_id}", POSITIVE),
        ("GET", "/health", POSITIVE),
        ("GET", "/metrics", POSITIVE),
    ],
)
def test_the_api_matches_its_openapi_schema(server, schema, method, path, mode):
    operation = schema[path][method]
    checks = CHECKS + ([negative_data_rejection] if mode == NEGATIVE else [])

    @given(case=operation.as_strategy(generation_mode=mode), real_model_id=st.booleans())
    # Derandomized: the same generated examples every run, so a CI result can be reproduced.
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case, real_model_id: bool) -> None:
        # A random model name is always a 404; valid requests name the served model so that they
        # reach the engine. (Negative cases stay as generated: fixing their model could make them
        # valid, and they must be rejected.)
        if mode == POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL
        if real_model_id and case.path_parameters and "model_id" in case.path_parameters:
            case.path_parameters["model_id"] = MODEL
        case.call_and_validate(base_url=server.url, checks=checks, timeout=60)

    check()
