"""weakloc.text: the one display escaper and the class-name rule, shared by every layer."""

from __future__ import annotations

import os
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from weakloc.text import class_name_problem, display_path, escape_text


def test_display_escapes():
    assert escape_text("plain/ünïcödé 名前.png") == "plain/ünïcödé 名前.png"
    assert escape_text("a\nb\tc\x1b[31m") == "a\\x0ab\\x09c\\x1b[31m"
    assert escape_text("evil\u202egnp.jpg") == "evil\\u202egnp.jpg"  # bidi override
    assert escape_text("line\u2028sep\u2029") == "line\\u2028sep\\u2029"
    assert escape_text(os.fsdecode(b"x\xff\x80y")) == "x\\xff\\x80y"  # undecodable bytes as the bytes
    assert escape_text("\ud800") == "\\ud800"  # any other lone surrogate
    assert escape_text("\u200d\u00a0") == "\u200d\u00a0"  # joiners and spaces are text, not controls


def test_json_keeps_controls_but_not_surrogates():
    assert escape_text("a\nb\u202e" + os.fsdecode(b"\xfe"), controls=False) == "a\nb\u202e\\xfe"


def test_display_path_decodes_like_the_file_system():
    assert display_path(b"\xff\xfe.png") == "\\xff\\xfe.png"
    assert display_path(os.fsencode("a\nb.png")) == "a\\x0ab.png"


def test_report_and_data_use_the_same_escaper():
    from weakloc.data.images import display_path as data_display_path
    from weakloc.report.html import _text

    name = os.fsdecode(b"bad\xff") + "\u202e\n"
    assert data_display_path(name) == escape_text(name) == "bad\\xff\\u202e\\x0a"
    assert _text("<" + name) == "&lt;bad\\xff\\u202e\\x0a"


@given(st.text(alphabet=st.characters(codec=None, exclude_categories=())))
def test_escaped_text_is_utf8_without_controls_and_stable(text):
    out = escape_text(text)
    out.encode("utf-8")  # no lone surrogate left
    assert not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in out)
    assert escape_text(out) == out  # escaping twice changes nothing: no double backslashes
    if not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp", "Cf") for c in text):
        assert out == text


def test_class_name_rule():
    assert class_name_problem("cat") is None
    assert class_name_problem("名前 ünï") is None
    for bad, why in [("", "empty"), ("..", "relative"), ("a/b", "separator"), ("a\nb", "control"),
                     (os.fsdecode(b"a\xff"), "control"), ("x" * 129, "longer"), (3, "not a string")]:
        assert why in class_name_problem(bad), bad
