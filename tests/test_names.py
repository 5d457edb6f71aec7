"""archive_dropbox/names.py: the Dropbox name rules as pure functions (issue 13, rows 1, 4, 5,
6, 7, 12): which names are refused, which are skipped, and when two names are one in Dropbox."""

from __future__ import annotations

import sys
import unicodedata

import pytest
from hypothesis import given, strategies as st

from archive_dropbox import names, prepare

NFD_CAFE = unicodedata.normalize("NFD", "café")


# ----------------------------------------------------------------------------- how Dropbox compares


@pytest.mark.parametrize("first, second", [
    ("/Data/Report.TXT", "/data/report.txt"),
    ("/ΣΑΣ.txt", "/σασ.txt"),  # Python 3's lower() gives σας (final sigma); Dropbox does not
    ("/\ufa16.txt", "/\u732a.txt"),  # a CJK compatibility ideograph is its unified one in NFC
    ("/café.txt", f"/{NFD_CAFE}.txt"),
    ("/Übung/x", "/" + unicodedata.normalize("NFD", "übung") + "/X"),
    ("/\u0130stanbul", "/istanbul"),  # U+0130's simple lowercase is i
])
def test_names_dropbox_takes_for_one(first, second):
    assert names.case_key(first) == names.case_key(second)


@pytest.mark.parametrize("first, second", [
    ("/straße.txt", "/STRASSE.txt"),  # ß has no lowercase mapping: it stays ß
    ("/σας.txt", "/σασ.txt"),  # a written final sigma is its own letter
    ("/a.txt", "/a.txt "),
])
def test_names_dropbox_keeps_apart(first, second):
    assert names.case_key(first) != names.case_key(second)


def test_only_u0130_lowercases_to_more_than_one_character():
    # case_key maps U+0130 by hand on that ground; a new Python with another such character must say so.
    assert [c for c in range(sys.maxunicode + 1) if len(chr(c).lower()) > 1] == [0x130]


def test_prepare_keeps_the_rules_importable_where_other_modules_look():
    assert prepare.case_key is names.case_key
    assert prepare.is_ignored is names.is_ignored and prepare.name_problem is names.name_problem


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@given(_TEXT)
def test_case_key_is_stable_and_ignores_unicode_form_and_simple_case(text):
    key = names.case_key(text)
    assert names.case_key(key) == key
    assert names.case_key(unicodedata.normalize("NFD", text)) == key
    assert names.case_key("".join(c.lower() if len(c.lower()) == 1 else c for c in text)) == key


@given(st.text(st.characters(max_codepoint=127), max_size=30))
def test_ascii_names_compare_as_plain_lower_case(text):
    assert names.case_key(text) == text.lower()


@given(_TEXT, _TEXT)
def test_names_that_differ_only_in_form_are_one_name(first, second):
    if names.differ_only_in_form(first, second):
        assert names.case_key(first) == names.case_key(second)


def test_differ_only_in_form():
    assert names.differ_only_in_form("/café.txt", f"/{NFD_CAFE}.txt")
    assert not names.differ_only_in_form("/Café.txt", f"/{NFD_CAFE}.txt")
    assert not names.differ_only_in_form("/café.txt", "/café.txt")


# ----------------------------------------------------------------------------- names refused


@pytest.mark.parametrize("name, fragment", [
    ("caf\udce9.txt", "'caf\\xe9.txt' is not valid text (UTF-8); Dropbox cannot store it: rename it"),
    ("a\ud800b", "is not valid text (UTF-8)"),  # a lone surrogate from a Windows name
    ("report ", "ends with a space"),
    ("T28c ", "remove the space"),
    ("notes.", "ends with a period"),
    ("a/b", "slash"),
    ("a\\b", "backslash"),
    ("tab\there", "control character"),
    ("..", "cannot be used"),
    ("x" * 256, "256 characters long"),
])
def test_names_dropbox_refuses(name, fragment):
    problem = names.name_problem(name)
    assert problem is not None and fragment in problem
    problem.encode("utf-8")  # the message itself can always be logged


@pytest.mark.parametrize("name", ["straße.txt", " leading space.txt", "frame 0002 ü.tif", "データ", ".hidden",
                                  "x" * 255, "star*name?.txt", "a.b.c", "\U0001f52c.tif"])
def test_names_dropbox_takes(name):
    assert names.name_problem(name) is None


@given(st.text(min_size=1, max_size=40))
def test_a_name_without_problem_can_be_sent_as_it_is(name):
    if names.name_problem(name) is None:
        name.encode("utf-8")
        assert "/" not in name and not name.endswith((" ", ".")) and len(name) <= names.MAX_NAME_CHARS


@given(st.text(max_size=40))
def test_any_name_can_be_shown_on_one_line(name):
    text = names.shown(name)
    assert names.is_valid_text(text) and "\n" not in text and "\r" not in text
    if names.is_valid_text(name) and name.isprintable():
        assert text == name


def test_shown_escapes_what_a_log_line_cannot_hold():
    assert names.shown("/d/caf\udce9.txt") == "/d/caf\\xe9.txt"
    assert names.shown("/d/Icon\r") == "/d/Icon\\r"


def test_a_dropbox_path_is_checked_component_by_component():
    assert "'T28c '" in names.dropbox_path_problem("/T28c /sub")
    assert names.dropbox_path_problem("/Team Folder/Data 2024/run.1") is None
    assert names.dropbox_path_problem("/") is None


# ----------------------------------------------------------------------------- names skipped


@pytest.mark.parametrize("name, fragment", [
    ("desktop.ini", "system file"), ("Thumbs.db", "system file"), (".DS_Store", "system file"),
    ("._.DS_Store", "system file"), ("Icon\r", "system file"), (".dropbox", "system file"),
    (".dropbox.attr", "system file"), ("ehthumbs.db", "system file"),
    ("~$report.docx", "Office lock file"), ("~WRL0001.tmp", "temporary file"),
    (".~0123456789abcdef.partial", "this tool"),
])
def test_names_the_desktop_app_never_syncs_are_skipped(name, fragment):
    assert fragment in names.ignored_reason(name)
    assert names.is_ignored(name)


@pytest.mark.parametrize("name", ["report.docx", "~report.docx", "$report.docx", "thumbs.db.bak", "Icon",
                                  "data.tmp", "~backup"])
def test_ordinary_names_are_not_skipped(name):
    assert names.ignored_reason(name) is None
