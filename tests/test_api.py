"""Response → Outcome: a 2xx is not proof of success; the errors array and the status decide."""

from __future__ import annotations

import json

import pytest

from capbatch.api import Kind, classify


def body(**kw):
    return json.dumps(kw).encode()


@pytest.mark.parametrize("status,raw,kind,code", [
    (200, body(cardId=1, customerId=2, cardExternalId="E", warnings=[]), Kind.SUCCESS, None),
    (200, body(warnings=[], errors=[]), Kind.SUCCESS, None),
    (201, body(errors=[{"code": 3010, "message": "Card number does not exist"}]), Kind.REJECTED, "3010"),
    (200, body(errors=[{"code": 3045, "message": "exists"}]), Kind.REJECTED, "3045"),
    (400, body(errors=[{"code": 3046, "message": "mismatch"}]), Kind.REJECTED, "3046"),
    (500, body(errors=[{"code": 3010, "message": "x"}]), Kind.REJECTED, "3010"),  # card codes are about the row
    (500, body(errors=[{"code": 500, "message": "All requests have failed due to errors"}]), Kind.RETRY, "500"),
    (503, b"", Kind.RETRY, "503"),
    (521, b"", Kind.RETRY, "521"),
    (429, b"", Kind.RETRY, "429"),
    (403, body(errors=[{"code": 403, "message": "v2 not enabled"}]), Kind.FATAL, "403"),
    (401, body(errors=[{"code": 401, "message": "Unauthorized"}]), Kind.FATAL, "401"),
    (401, body(errors=[{"code": 498, "message": "Token expired"}]), Kind.FATAL, "498"),
    (404, b"<html>nope</html>", Kind.FATAL, "404"),
    (200, b"<html>a login page</html>", Kind.FATAL, "not_json"),
    (422, body(errors=[{"code": 9999, "message": "odd"}]), Kind.REJECTED, "9999"),
])
def test_classify(status, raw, kind, code):
    outcome = classify(status, raw, None, 1.0)
    assert outcome.kind is kind
    assert outcome.error_code == code


def test_429_carries_retry_after_and_is_marked_throttled():
    o = classify(429, b"", 2.5, 1.0)
    assert o.throttled and o.retry_after == 2.5


def test_success_reads_ids_and_the_get_shapes():
    o = classify(200, body(cardId=7, customerId=9, cardExternalId="X"), None, 1.0)
    assert (o.card_id, o.customer_id, o.external_id) == ("7", "9", "X")
    wrapped = classify(200, body(entity={"cardExternalId": "Y", "cardId": 1}), None, 1.0)
    assert wrapped.external_id == "Y"
    generated = classify(200, body(entity="GEN000000000001", warnings=[]), None, 1.0)
    assert generated.external_id == "GEN000000000001"
