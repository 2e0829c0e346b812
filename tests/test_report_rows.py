"""report_rows.rows against ijson and json.loads: the same rows for any layout, chunking and
content a report can have, and NotJSON for anything that is not the document."""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import ijson
import pytest

from dirpull.connectors import report_rows
from dirpull.connectors.report_rows import NoRowsList, NotJSON


def rows_of(body: bytes, key: str, chunk_size: int = 7) -> list[Any]:
    return [row for _, row, _ in report_rows.rows(io.BytesIO(body), key, chunk_size=chunk_size)]


def ijson_rows(body: bytes, key: str) -> list[Any]:
    return list(ijson.items(io.BytesIO(body), f"{key}.item", use_float=True))


TRICKY = [
    {"id": "1", "note": "},{", "x": None},
    {"id": "2", "note": '"},{"id":"3"}', "n": 12, "f": 1.5, "t": True},
    {"id": "4", "name": "Zoë 山田 \u2028", "e": "a\\\"},{\\"},
    {"id": "5", "nested": {"a": {"b": [1, {"c": "},{"}]}}, "list": [{"k": 1}, {"k": 2}]},
    {},
    {"id": "7", "deep": [[{"x": "}"}], [{"y": "{"}]]},
]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_the_same_rows_as_ijson_whatever_the_layout_and_chunking(chunk_size: int, indent: int | None) -> None:
    doc = {"title": "dirpull", "fields": [{"id": "employees", "employees": []}], "employees": TRICKY, "after": {"a": 1}}
    body = json.dumps(doc, indent=indent, ensure_ascii=False).encode()
    assert rows_of(body, "employees", chunk_size) == ijson_rows(body, "employees") == TRICKY


@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 20])
@pytest.mark.parametrize("recognizer", [None, lambda: lambda text: None])
def test_the_documents_other_values_come_with_the_rows(chunk_size: int, recognizer: Any) -> None:
    """A report's header (BambooHR's `fields`, the fields it sent) before the array or after it."""
    doc = {"title": "dirpull", "fields": [{"id": "workEmail"}], "employees": TRICKY, "after": {"a": "},{"}}
    body = json.dumps(doc).encode()
    others: dict[str, Any] = {}
    rows = [row for _, row, _ in report_rows.rows(io.BytesIO(body), "employees", recognizer,
                                                  chunk_size=chunk_size, others=others)]  # fmt: skip
    assert rows == TRICKY and others == {k: v for k, v in doc.items() if k != "employees"}


def test_random_rows_with_every_awkward_character() -> None:
    rng = random.Random(7)
    alphabet = ['{', '}', ',', '"', '\\', ':', '[', ']', ' ', '\n', 'a', 'é', '😀', '},{', '},{"id":']
    for _ in range(40):
        rows = [
            {"id": str(i), **{f"k{j}": "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
                              for j in range(rng.randrange(4))}}
            for i in range(rng.randrange(60))
        ]  # fmt: skip
        body = json.dumps({"employees": rows, "tail": "},{"}, separators=(",", ":"), ensure_ascii=False).encode()
        assert rows_of(body, "employees", rng.choice([1, 5, 50, 4096])) == rows


def test_an_integer_beyond_64_bits_comes_out_as_a_float() -> None:
    body = b'{"employees": [{"id": "1", "n": 123456789012345678901234567890}]}'
    assert rows_of(body, "employees") == [{"id": "1", "n": 1.2345678901234568e29}]
    with pytest.raises(ijson.JSONError):  # where ijson gave up on the whole report
        ijson_rows(body, "employees")


def test_an_empty_array_a_missing_key_and_a_nested_key() -> None:
    assert rows_of(b'{"employees": []}', "employees") == []
    # ijson finds no rows in these; they are not the report (a gateway's JSON): refused.
    for body in (b'{"title": "x"}', b'{"employees": null}', b'{"employees": {}}', b"[]"):
        with pytest.raises(NoRowsList):
            rows_of(body, "employees")
    nested_first = b'{"meta": {"employees": [{"id": "no"}]}, "employees": [{"id": "yes"}]}'
    assert rows_of(nested_first, "employees") == ijson_rows(nested_first, "employees") == [{"id": "yes"}]


@pytest.fixture
def handed_over(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What was handed over to ijson (the bytes already read), each time it was."""
    seen: list[bytes] = []
    ijson_rest = report_rows._ijson

    def spy(prefix: bytes, stream: Any, key: str) -> Any:
        seen.append(prefix)
        return ijson_rest(prefix, stream, key)

    monkeypatch.setattr(report_rows, "_ijson", spy)
    return seen


def test_rows_with_nested_objects_everywhere_still_come_out_right(
    monkeypatch: pytest.MonkeyPatch, handed_over: list[bytes]
) -> None:
    # No cut among the last few candidates parses: rows pile up until ijson takes over.
    monkeypatch.setattr(report_rows, "STUCK_LIMIT", 200)
    rows = [{"id": str(i), "refs": [{"r": k} for k in range(12)]} for i in range(50)]
    body = json.dumps({"Report_Entry": rows}).encode()
    assert rows_of(body, "Report_Entry", 64) == rows
    assert len(handed_over) == 1 and handed_over[0].startswith(b'{"Report_Entry": [{"id": "')


@pytest.mark.parametrize(
    "body",
    [
        b'{"employees": [{"id": "1"}, {"id": "2"}',  # cut off
        b'{"employees": [{"id": "1"}, {"id": "2"}]',  # the document never closes
        b'{"employees": [{"id": "1"}, {"id": "2"\x00}{not json',  # the emulator's malformed fault
        b'{"employees": [{"id": "1"},, {"id": "2"}]}',
        b'{"employees": [{"id": "1"}]} trailing',
        b'<?xml version="1.0"?><employees/>',
    ],
)
def test_anything_but_the_document_is_not_json(body: bytes) -> None:
    with pytest.raises(NotJSON):
        rows_of(body, "employees", 8)


def test_not_json_says_what_is_wrong_without_quoting_the_body() -> None:
    # The array is not a top-level value, so ijson reads the body; its yajl backend appends the
    # text around the fault to its message, and that text is people's data.
    body = b'{"report": {"employees": [{"id": "1", "firstName": "Ada Lovelace" "lastName": "x"}]}}'
    with pytest.raises(NotJSON) as info:
        rows_of(body, "employees", 8)
    assert "parse error" in str(info.value)
    assert "Lovelace" not in str(info.value) and "\n" not in str(info.value)


def test_a_key_whose_value_is_not_a_list_is_refused_where_ijson_finds_no_rows() -> None:
    body = b'{"employees": {"id": "1"}}'
    assert ijson_rows(body, "employees") == []
    with pytest.raises(NoRowsList, match="its 'employees' is dict, not a list"):
        rows_of(body, "employees")


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 1 << 20])
def test_recognized_texts_are_not_parsed_and_every_text_handed_over_is_exactly_one_row(chunk_size: int) -> None:
    expected = [{"id": str(i), "note": ["},{", '"},{"id":"9"}', "plain", "\\\\},{"][i % 4]} for i in range(30)]
    texts = [json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode() for r in expected]
    body = b'{"title":"x","employees":[' + b", \n".join(texts) + b'],"after":"},{"}'
    known = {t: i for i, t in enumerate(texts) if i % 3 == 0}  # as a digest of the exact text would
    offered: list[bytes] = []

    def recognize(text: bytes) -> int | None:
        offered.append(text)
        return known.get(text)

    out = list(report_rows.rows(io.BytesIO(body), "employees", lambda: recognize, chunk_size=chunk_size))
    assert len(out) == len(expected)
    for i, (text, row, token) in enumerate(out):
        if token is not None:
            assert (token, row, text) == (i, None, texts[i])
        else:
            assert row == expected[i] and text in (texts[i], None)  # the document's last row: no text
    last = len(expected) - 1
    assert sum(token is not None for _, _, token in out) == len([i for i in known.values() if i < last])
    # Pieces between wrong cuts were offered too, and were never taken for rows.
    assert set(offered) - set(texts)


def test_without_a_recognizer_rows_are_parsed_in_batches_and_have_no_text() -> None:
    rows = [{"id": str(i)} for i in range(10)]
    body = json.dumps({"employees": rows}).encode()
    for recognizer in (None, lambda: None):
        out = list(report_rows.rows(io.BytesIO(body), "employees", recognizer, chunk_size=16))
        assert out == [(None, row, None) for row in rows]


@pytest.mark.parametrize("chunk_size", [7, 256, 1 << 20])
def test_a_row_that_keeps_refusing_its_cuts_is_cut_where_it_ends_and_later_rows_keep_their_texts(
    chunk_size: int, handed_over: list[bytes]
) -> None:
    # Rows nesting many objects (cut after cut inside them), with brackets and escapes in strings.
    expected = [{"id": str(i), "refs": [{"r": k, "s": ["},{", '\\"]{']} for k in range(40)]} for i in range(5)]
    texts = [json.dumps(r, indent=1).encode() for r in expected]
    body = b'{"employees": [\n' + b",\n".join(texts) + b"\n]}"
    out = list(report_rows.rows(io.BytesIO(body), "employees", lambda: lambda text: None, chunk_size=chunk_size))
    assert [row for _, row, _ in out] == expected and handed_over == []
    assert [text for text, _, _ in out[:-1]] == texts[:-1] and out[-1][0] in (texts[-1], None)


class _CountingPattern:
    """A compiled pattern of the reader's that counts the matches it hands back: the reader's
    work, told apart from the machine's speed."""

    def __init__(self, pattern: re.Pattern[bytes], counter: list[int]) -> None:
        self._pattern, self._counter = pattern, counter

    def _counted(self, match: Any) -> Any:
        self._counter[0] += match is not None
        return match

    def search(self, *args: Any) -> Any:
        return self._counted(self._pattern.search(*args))

    def match(self, *args: Any) -> Any:
        return self._counted(self._pattern.match(*args))

    def finditer(self, *args: Any) -> Iterator[Any]:
        for found in self._pattern.finditer(*args):
            yield self._counted(found)


def test_rows_with_a_brace_in_a_string_and_a_nested_column_cost_the_same_as_other_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A `{` in a title and a nested column in every row: each row's end was looked for by
    # counting braces across the rest of the buffer, where they never balanced. A 1 MB chunk of
    # such rows (16,000) took minutes to read on a resync; a report of them, hours.
    matched = [0]
    for name, value in vars(report_rows).items():
        if isinstance(value, re.Pattern):
            monkeypatch.setattr(report_rows, name, _CountingPattern(value, matched))
    expected = [{"id": str(i), "title": "R&D {lab", "orgs": [{"id": "a"}, {"id": "b"}]} for i in range(2000)]
    texts = [json.dumps(r, separators=(",", ":")).encode() for r in expected]
    body = b'{"Report_Entry":[' + b",".join(texts) + b"]}"
    out = list(report_rows.rows(io.BytesIO(body), "Report_Entry", lambda: lambda text: None))
    assert [row for _, row, _ in out] == expected
    assert [text for text, _, _ in out] == texts
    # A few matches a row (its cuts, its brackets), not a few for each row after it in the chunk.
    assert matched[0] < 20 * len(expected)
