from __future__ import annotations

import json
import pickle
from pathlib import Path

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.protocol import ErrorResponse

GOLDEN = Path(__file__).parent / "golden" / "error_codes.json"


def test_codes_match_golden_file_and_only_grow() -> None:
    golden = json.loads(GOLDEN.read_text())
    current = {code.value: code.http_status for code in ErrorCode}
    # Every published code keeps its status; new codes must be added to the golden file.
    assert current == golden


def test_envelope_shape() -> None:
    err = OrchestratorError(ErrorCode.INVALID_REQUEST, "bad temperature", param="temperature")
    assert err.to_dict("r1") == {
        "error": {
            "message": "bad temperature",
            "type": "invalid_request_error",
            "code": "invalid_request",
            "param": "temperature",
            "request_id": "r1",
        }
    }
    assert err.status == 400


def test_every_envelope_is_the_documented_error_response() -> None:
    for code in ErrorCode:
        envelope = OrchestratorError(code, "m").to_dict(None)
        assert ErrorResponse.model_validate(envelope).model_dump(mode="json") == envelope


def test_error_survives_pickling_across_processes() -> None:
    err = OrchestratorError(ErrorCode.RATE_LIMIT_EXCEEDED, "slow down", headers={"Retry-After": "3"})
    back = pickle.loads(pickle.dumps(err))
    assert (back.code, back.message, back.headers) == (err.code, err.message, err.headers)
