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


# ---- answers the documentation leaves open (capillary-api.md) ------------------------------------
def test_card_codes_decide_under_any_status_and_bare_500s_are_marked():
    assert classify(500, body(errors=[{"code": 3045, "message": "exists"}]), None, 1.0).kind is Kind.REJECTED
    odd = classify(500, body(errors=[{"code": 8015, "message": "odd"}]), None, 1.0)
    assert (odd.kind, odd.error_code, odd.bare_500) == (Kind.REJECTED, "8015", False)
    bare = classify(500, body(warnings=[], errors=[{"status": False, "code": 500, "message": "All requests "
                                                    "have failed due to errors"}]), None, 1.0)
    assert (bare.kind, bare.bare_500) == (Kind.RETRY, True)
    assert classify(500, b"", None, 1.0).bare_500
    assert not classify(503, body(errors=[{"code": 503, "message": "x"}]), None, 1.0).bare_500


@pytest.mark.parametrize("status,kind,code", [(502, Kind.RETRY, "502"), (503, Kind.RETRY, "503"),
                                               (520, Kind.RETRY, "520"), (403, Kind.FATAL, "not_capillary"),
                                               (401, Kind.FATAL, "not_capillary"), (200, Kind.FATAL, "not_json")])
def test_html_pages_from_a_cdn(status, kind, code):
    page = b"<html><head><title>Attention Required! | Cloudflare</title></head><body>blocked</body></html>"
    o = classify(status, page, None, 1.0, "text/html; charset=UTF-8")
    assert (o.kind, o.error_code, o.auth_problem) == (kind, code, False)
    if kind is Kind.FATAL:
        assert o.error_message.startswith(f"something other than the Capillary API answered (HTTP {status}, "
                                          "text/html, page title 'Attention Required! | Cloudflare')")


def test_mandatory_field_403_names_the_fix():
    o = classify(403, body(errors=[{"code": 403, "message": "Mandatory field is missing"}]), None, 1.0)
    assert o.kind is Kind.FATAL and "--extra-field statusLabel=" in o.error_message


def test_warnings_are_read_from_any_answer():
    ok = classify(200, body(cardExternalId="E", cardNumber="C",
                            warnings=[{"status": True, "code": 3039, "message": "No update in status label"}]),
                  None, 1.0)
    assert ok.warnings == (("3039", "No update in status label"),)
    failed = classify(400, body(warnings=["plain"], errors=[{"code": 3010, "message": "x"}]), None, 1.0)
    assert failed.warnings == (("", "plain"),)


def test_a_2xx_that_contradicts_the_request_is_not_a_success():
    from capbatch.api import contradiction

    def answer(**kw):
        return classify(200, body(**kw), None, 1.0)

    assert contradiction(answer(cardNumber="C", cardExternalId="E"), "C", "E") is None
    assert contradiction(answer(cardNumber="C", cardExternalId="OLD"), "C", "E")[0] == "contradicts"
    assert contradiction(answer(cardNumber="D", cardExternalId="E"), "C", "E")[0] == "contradicts"
    assert contradiction(answer(cardNumber="C"), "C", "E")[0] == "no_echo"
    assert contradiction(answer(cardExternalId="E"), "C", "E") is None   # no card number echoed: the ID decides


def test_the_put_body_is_json_dumps_byte_for_byte_for_any_text():
    """put_body skips building a dict and an encoder per row; what it sends must not change."""
    import random

    from capbatch.api import CapillaryClient
    from capbatch.config import Credentials

    client = CapillaryClient("http://127.0.0.1:9", Credentials(username="u", password="p"))
    extra = CapillaryClient("http://127.0.0.1:9", Credentials(username="u", password="p"),
                            extra_fields={"statusLabel": "Active"})
    rnd = random.Random(7)
    alphabet = 'ab09 "\\/\n\t\x00\x1f\x7f\u00e9\u2028\u4e2d\U0001F600'
    for _ in range(2000):
        card = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 10)))
        ext = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 10)))
        assert client.put_body(card, ext) == json.dumps({"cardNumber": card, "cardExternalId": ext}).encode()
    assert extra.put_body("1", "E") == b'{"statusLabel": "Active", "cardNumber": "1", "cardExternalId": "E"}'


@pytest.mark.parametrize("raw", ['\ufeff{"entity": {"cardExternalId": "E1"}}'.encode("utf-8"),
                                 '{"entity": {"cardExternalId": "E1"}}'.encode("utf-16"),
                                 '{"entity": {"cardExternalId": "E1"}}'.encode("utf-32")])
def test_answers_with_a_bom_or_in_utf16_32_are_still_read(raw):
    out = classify(200, raw, None, 1.0)
    assert (out.kind, out.external_id) == (Kind.SUCCESS, "E1")
