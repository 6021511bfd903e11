"""lbctl.kube.protobuf: message classes from a schema table, and the apiserver's envelope around
them (the magic, the runtime.Unknown). What the apiserver really sends is checked against it in
tests/integration/test_fields_protobuf.py."""

from __future__ import annotations

from typing import Any

import pytest

from lbctl.kube.protobuf import Field, messages, parse, unwrap

SCHEMA = {
    "Meta": [Field("name", 1, "string"), Field("labels", 11, "map"), Field("count", 7, "int64")],
    "Thing": [Field("metadata", 1, "Meta"), Field("tags", 2, "string", repeated=True), Field("on", 3, "bool"),
              Field("port", 4, "int32")],
}
THING = messages("test.things", SCHEMA)["Thing"]
ENVELOPE = messages("test.envelope", {"Unknown": [Field("raw", 2, "bytes"), Field("contentType", 4, "string")]})


def _body(raw: bytes) -> bytes:
    """A response body as the apiserver frames it."""
    envelope: Any = ENVELOPE["Unknown"](raw=raw, contentType="")
    return b"k8s\x00" + envelope.SerializeToString()


def test_a_schema_gives_messages_with_its_fields_and_numbers() -> None:
    thing: Any = THING(tags=["a", "b"], port=8080)
    thing.metadata.name = "web"
    thing.metadata.labels["app"] = "web"
    parsed: Any = parse(THING, _body(thing.SerializeToString()))
    assert (parsed.metadata.name, dict(parsed.metadata.labels), list(parsed.tags), parsed.port) == \
        ("web", {"app": "web"}, ["a", "b"], 8080)
    # proto2: whether a field was sent at all is known (Go's pointer fields: set or not)
    assert parsed.HasField("port") and not parsed.HasField("on") and not parsed.metadata.HasField("count")
    assert [f.number for f in THING.DESCRIPTOR.fields] == [1, 2, 3, 4]


def test_fields_a_schema_does_not_name_are_skipped() -> None:
    wider = messages("test.wider", {**SCHEMA, "Thing": [*SCHEMA["Thing"], Field("managedFields", 17, "Meta",
                                                                                repeated=True)]})["Thing"]
    sent: Any = wider(port=1)
    sent.managedFields.add(name="x" * 1000)
    parsed: Any = parse(THING, _body(sent.SerializeToString()))
    assert parsed.port == 1


@pytest.mark.parametrize("body", [b"", b"{\"kind\": \"ServiceList\"}", b"k8s\x00\xff\xff\xff", b"k8s"],
                         ids=["empty", "json", "truncated", "short magic"])
def test_what_is_not_a_protobuf_body_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse(THING, body)


def test_unwrap_gives_the_raw_object() -> None:
    assert unwrap(_body(b"\x08\x01")) == b"\x08\x01"
