"""Property-based fuzzing of the API against its own OpenAPI document (schemathesis), on a real
``hpo serve`` with bearer tokens: no 5xx, and every response conforms to the documented schema
(status code, content type, headers, body), for valid and for invalid input.

One test per operation; MAX_EXAMPLES valid and MAX_EXAMPLES invalid cases each, so the run is
bounded (schemathesis' own pytest loader does not yet work with pytest 9, so the documented
``APIOperation.as_strategy`` + Hypothesis ``@given`` is used instead).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.errors import UnsupportedSchema

from service.api.app import create_app
from service.config import Settings
from tests.security.conftest import ALICE, TOKENS, start_secure_server

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 60
REQUEST_TIMEOUT_S = 30  # a request that takes longer is a denial of service: fail, do not hang
# Not negative_data_rejection: pydantic's lax mode accepts e.g. `true` for an integer field
# (as 1), which that check reports; invalid input is still generated (negative mode) and
# must never cause a 5xx or an undocumented answer.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
OPERATIONS = sorted(
    (method.upper(), path)
    for path, item in create_app(Settings(api_tokens=TOKENS)).openapi()["paths"].items()
    for method in item
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    server = start_secure_server(root, HPO_MAX_ACTIVE_JOBS_PER_OWNER="100000")
    yield server.url
    server.process.stop()
    log = server.process.log_tail(1_000_000)
    assert "Traceback" not in log, log[-5000:]


@pytest.fixture(scope="module")
def api_schema(fuzz_server: str) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json", headers=ALICE)
    # Unknown query parameters are ignored, as HTTP APIs customarily do (cache busters, tracing);
    # do not count them as schema-invalid input that must be rejected.
    schema.config.generation.update(allow_extra_parameters=False)
    return schema


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms_to_the_openapi_document(
    api_schema: schemathesis.BaseSchema,
    fuzz_server: str,
    method: str,
    path: str,
    figure: Callable[[str], None],
) -> None:
    operation = api_schema[path][method]
    ran: Counter[str] = Counter()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            _fuzz(operation, mode, fuzz_server, ran)
        except (Unsatisfiable, UnsupportedSchema) as e:
            # Negative cases need something to make invalid: an operation without parameters
            # has none, and schemathesis cannot negate the job spec's discriminated unions
            # (the malformed-spec corpus in test_security_hostile covers those by hand).
            if mode is GenerationMode.POSITIVE:
                raise
            ran[f"negative:unsupported ({type(e).__name__})"] += 1
    figure(f"{method} {path}: {dict(sorted(ran.items()))}")


def _fuzz(
    operation: schemathesis.APIOperation, mode: GenerationMode, base_url: str, ran: Counter[str]
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every CI run; raise MAX_EXAMPLES to explore
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=base_url, headers=ALICE, checks=CHECKS, timeout=REQUEST_TIMEOUT_S
        )
        ran[f"{mode.value}:{response.status_code}"] += 1

    run()
