"""A bounded schemathesis run against the app's own OpenAPI spec: no input it generates may
produce a 5xx. The engine slots are short (64 tokens) so every generated request is cheap."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402

_model = DeepSeekModel.from_pretrained()
_model.set_batch_size(4, max_seq_len=64)
_model.engine.start()  # the app's lifespan starts it too; make sure it runs under the ASGI client
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_model, "stories260K"))


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error], timeout=30)
