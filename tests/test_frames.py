"""The tolerant reader of AMQP properties (worker/broker/frames.py): whatever the bytes,
it never raises; what py-amqp reads it reads the same; what py-amqp can not read it
replaces, saying where and what to fix; and what it kept the worker can send again."""

from __future__ import annotations

import math
import struct
from datetime import datetime
from typing import Any

import pytest
from amqp import serialization
from amqp.basic_message import Message as AmqpMessage
from amqp.spec import Basic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import worker.broker.connection  # noqa: F401  (installs the reader, as every connection does)
from worker.broker.decoding import MAX_PREVIEW_CHARS
from worker.broker.frames import (
    DAMAGE_KEY,
    Damage,
    damage_of,
    decode_properties,
    read_properties,
    unreadable,
)

from .amqp_frames import (
    MAX_DEPTH,
    MAX_HEADERS_BYTES,
    UNKNOWN_TYPE,
    VOID,
    Headers,
    array,
    decimal,
    header_tables,
    headers,
    hostile_properties,
    nested_arrays,
    number,
    properties,
    table,
    text,
    timestamp,
)

PROPERTY_NAMES = {
    "content_type", "content_encoding", "application_headers", "delivery_mode", "priority",
    "correlation_id", "reply_to", "expiration", "message_id", "timestamp", "type", "user_id",
    "app_id", "cluster_id",
}
FRAME_MAX = 131072  # RabbitMQ's default: a header frame past it ends the connection
# What a header frame holds besides the properties (frame header and end, class, weight,
# body size), and what the worker adds to a dead letter's headers.
ROOM_FOR_THE_WORKER = 8 + 12 + 1024
strict = serialization.decode_properties_basic  # py-amqp's own reader

# Drawing header tables is what takes the time: 100 of them are a few seconds.
HYPOTHESIS = settings(max_examples=100, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """Properties as a hostile publisher writes them, then cut short, with bytes changed,
    or with bytes put in, now and then."""
    raw = properties(
        content_type=b"application/json",
        application_headers=draw(header_tables()),
        **draw(hostile_properties()).values,
    )
    mangle = draw(st.sampled_from(["none", "cut", "change", "insert"]))
    at = draw(st.integers(0, max(len(raw) - 1, 0)))
    if mangle == "cut":
        return raw[:at]
    if mangle == "change":
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    if mangle == "insert":
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    return raw


# --- never raises ---------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_read_without_raising(raw: bytes):
    properties_read, end = read_properties(raw, 0)
    assert set(properties_read) <= PROPERTY_NAMES | {DAMAGE_KEY}
    assert 0 <= end <= len(raw)


@HYPOTHESIS
@given(frames())
def test_mangled_frames_are_read_without_raising(raw: bytes):
    decode_properties(raw, 0)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4000))
def test_tables_nested_to_any_depth_are_read_without_raising(levels: int):
    raw = b"V"
    for level in range(levels):
        raw = (b"A" + struct.pack(">I", len(raw)) + raw if level % 2 else
               b"F" + struct.pack(">I", len(raw) + 2) + b"\x01k" + raw)
    decode_properties(properties(application_headers=struct.pack(">I", len(raw) + 2) + b"\x01k"
                                 + raw), 0)


# --- reads what py-amqp reads the same ------------------------------------------------------


@HYPOTHESIS
@given(header_tables(hostile=False), hostile_properties())
def test_what_py_amqp_reads_is_read_the_same(table_sent: Headers, sent: Any):
    raw = properties(content_type=b"application/json", application_headers=table_sent,
                     **sent.values)
    try:
        expected, expected_end = strict(raw, 0)
    except UnicodeDecodeError:  # a property that is not UTF-8: compared below
        assert sent.unreadable
        return
    got, end = read_properties(raw, 0)
    if table_sent.unreadable:  # too big or too deep for the worker: checked elsewhere
        return
    assert _same(got, expected) and end == expected_end
    assert damage_of(got) is None


@HYPOTHESIS
@given(header_tables(hostile=False))
def test_properties_py_amqp_reads_within_the_limits_are_its_own(table_sent: Headers):
    raw = properties(application_headers=table_sent)
    got, _ = decode_properties(raw, 0)
    assert (damage_of(got) is not None) == table_sent.unreadable
    if not table_sent.unreadable:
        assert _same(got, strict(raw, 0)[0])


@HYPOTHESIS
@given(header_tables())
def test_header_values_are_read_as_py_amqp_reads_them_or_replaced(table_sent: Headers):
    """Every value py-amqp can read comes out as it reads it; those it can not, as None."""
    got, _ = decode_properties(properties(application_headers=table_sent), 0)
    if table_sent.refused or len(table_sent.raw) - 4 > MAX_HEADERS_BYTES:
        return  # refused: RabbitMQ never hands it over; too big: some headers dropped
    assert _same(got["application_headers"], table_sent.value)
    assert (damage_of(got) is not None) == table_sent.unreadable


# --- what could not be read -----------------------------------------------------------------


@pytest.mark.parametrize("seconds", [253402300800, 2**63, 2**64 - 1])
def test_a_timestamp_past_9999_is_replaced_and_named(seconds: int):
    sent = headers([(b"before", text(b"kept")), (b"sent-at", timestamp(seconds)),
                    (b"after", number("I", ">i", 7))])
    got, _ = decode_properties(properties(application_headers=sent), 0)
    assert got["application_headers"] == {"before": "kept", "sent-at": None, "after": 7}
    problem = unreadable(got)
    assert problem is not None
    assert "header 'sent-at' is a timestamp past the year 9999" in problem
    assert "send one from 1970 to 9999" in problem


def test_a_timestamp_past_9999_inside_an_array_in_a_table_is_replaced():
    inner = table([(b"when", array([timestamp(2**62), timestamp(0)]))])
    got, _ = decode_properties(properties(application_headers=headers([(b"x-outer", inner)])), 0)
    assert got["application_headers"] == {"x-outer": {"when": [None, datetime(1970, 1, 1)]}}
    assert "header 'x-outer' (in a table or array 2 level(s) down)" in (unreadable(got) or "")


def test_an_unknown_field_type_loses_the_rest_of_its_table_only():
    sent = headers([(b"a", text(b"kept")), (b"t", table([(b"in", VOID), (b"z", UNKNOWN_TYPE),
                                                         (b"lost", VOID)])),
                    (b"b", number("b", ">b", -1))])
    got, _ = decode_properties(properties(application_headers=sent, message_id=b"m-1"), 0)
    assert got["application_headers"] == {"a": "kept", "t": {"in": None, "z": None}, "b": -1}
    assert got["message_id"] == "m-1"
    assert "has field type 'Z', which AMQP 0-9-1 does not define" in (unreadable(got) or "")


def test_a_header_table_cut_short_keeps_what_came_before():
    sent = headers([(b"a", text(b"kept")), (b"b", text(b"x" * 40))])
    raw = properties(application_headers=sent)[:-20]
    got, _ = decode_properties(raw, 0)
    assert got["application_headers"] == {"a": "kept", "b": None}
    assert "cut short" in (unreadable(got) or "")


def test_a_property_that_is_not_utf8_is_read_with_replacement_characters():
    got, _ = decode_properties(properties(message_id=b"id-\xff\xfe", app_id=b"app"), 0)
    assert (got["message_id"], got["app_id"]) == ("id-\ufffd\ufffd", "app")
    assert "property message_id is not UTF-8 (b'id-\\xff\\xfe'); send UTF-8 text" in (
        unreadable(got) or "")


def test_a_property_of_255_bad_bytes_fits_in_a_short_string_again():
    got, _ = decode_properties(properties(correlation_id=b"\xff" * 255), 0)
    assert len(got["correlation_id"].encode()) <= 255
    assert unreadable(got) is not None


@pytest.mark.parametrize("levels", [MAX_DEPTH, 40, 990, 3000])
def test_headers_nested_past_the_limit_are_cut_there(levels: int):
    """Those py-amqp reads (40 levels) too: the worker's copies would have to nest them."""
    sent = headers([(b"deep", nested_arrays(levels)), (b"next", VOID)])
    got, _ = decode_properties(properties(application_headers=sent), 0)
    assert got["application_headers"] == {"deep": sent.value["deep"], "next": None}
    assert f"nests tables and arrays more than {MAX_DEPTH} levels deep" in (
        unreadable(got) or "")


def test_headers_nested_up_to_the_limit_are_read_whole():
    sent = headers([(b"deep", nested_arrays(MAX_DEPTH - 1))])
    got, _ = decode_properties(properties(application_headers=sent), 0)
    assert got["application_headers"] == sent.value and damage_of(got) is None


def test_headers_larger_than_the_limit_keep_those_within_it():
    sent = headers([(b"small", text(b"kept")), (b"big", text(b"x" * MAX_HEADERS_BYTES)),
                    (b"after", VOID)])
    got, _ = decode_properties(properties(application_headers=sent), 0)
    assert got["application_headers"] == {"small": "kept", "big": None}
    problem = unreadable(got) or ""
    assert f"only the first {MAX_HEADERS_BYTES} are read" in problem
    assert "cut short" not in problem  # said once, as the size


def test_a_rejection_quotes_at_most_40_characters_of_a_name():
    name = b"n" * 255
    got, _ = decode_properties(properties(application_headers=headers(
        [(name, timestamp(2**63))])), 0)
    problem = unreadable(got) or ""
    assert "n" * MAX_PREVIEW_CHARS not in problem and "n" * (MAX_PREVIEW_CHARS - 1) in problem


def test_a_damage_description_lists_a_few_problems_and_counts_the_rest():
    sent = headers([(f"t{index}".encode(), timestamp(2**63)) for index in range(7)])
    got, _ = decode_properties(properties(application_headers=sent), 0)
    problem = unreadable(got) or ""
    assert problem.count("past the year 9999") == 3 and problem.endswith("(and 4 more)")


# --- a publisher can not forge the marker ---------------------------------------------------


@HYPOTHESIS
@given(st.binary(max_size=300) | frames())
def test_only_the_reader_sets_the_damage_marker(raw: bytes):
    got, _ = decode_properties(raw, 0)
    assert DAMAGE_KEY not in got or isinstance(got[DAMAGE_KEY], Damage)


def test_a_header_named_like_the_marker_is_a_header():
    sent = headers([(DAMAGE_KEY.encode(), text(b"the worker must reject this"))])
    got, _ = decode_properties(properties(application_headers=sent), 0)
    assert damage_of(got) is None and damage_of(got["application_headers"]) is None


# --- the hook, and sending again ------------------------------------------------------------


def test_connections_read_properties_with_the_tolerant_reader():
    frame = struct.pack(">HxxQ", Basic.CLASS_ID, 2) + properties(
        application_headers=headers([(b"ts", timestamp(2**64 - 1))]))
    message = AmqpMessage()
    message.inbound_header(frame)
    assert damage_of(message.properties) is not None


@HYPOTHESIS
@given(frames())
def test_what_was_read_py_amqp_can_send_again_within_a_frame(raw: bytes):
    got, _ = decode_properties(raw, 0)
    kept = {name: value for name, value in got.items() if name != DAMAGE_KEY}
    sent_again = AmqpMessage(b"", **kept)._serialize_properties()
    assert len(sent_again) <= FRAME_MAX - ROOM_FOR_THE_WORKER


def test_decimals_of_any_scale_are_read_as_py_amqp_reads_them():
    sent = headers([(b"d", decimal(255, -(2**31))), (b"e", decimal(0, 2**31 - 1))])
    got, _ = decode_properties(properties(application_headers=sent), 0)
    assert got["application_headers"] == sent.value and damage_of(got) is None


def _same(a: Any, b: Any) -> bool:
    """Equal, with types (1 is not True, b"" is not ""); NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)
