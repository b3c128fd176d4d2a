"""The clean step: NFKC, leftover markup, URLs, e-mails, whitespace; newlines kept; empties dropped."""

from __future__ import annotations

import pickle
import types

import pytest

from llmforge.prep.clean import Clean, normalize_whitespace
from llmforge.prep.document import Document


def clean(text: str, **flags) -> str:
    return Clean(**flags).clean_text(text)


def test_nfkc_ligatures_fullwidth_and_spaces():
    assert clean("ﬁne ﬂour") == "fine flour"
    assert clean("Ｐｒｉｃｅ：１２３ ｅｕｒｏｓ") == "Price:123 euros"
    assert clean("①②③ and ½") == "123 and 1⁄2"
    assert clean("no\u00a0break\u2009thin\u3000ideographic") == "no break thin ideographic"
    assert clean("ﬁne", nfkc=False) == "ﬁne"


def test_html_tags_removed_but_not_comparisons():
    assert clean("he<b>ll</b>o <i>world</i>") == "hello world"
    assert clean("one<br>two<br/>three") == "one two three"
    assert clean('<p class="lead">Intro</p><div id=x>Body</div>') == "Intro Body"
    assert clean("<!-- nav --><script>var a = 1 < 2;</script><style>p {color: red}</style>Text") == "Text"
    assert clean("<!DOCTYPE html><?xml version='1.0'?>Text") == "Text"
    # prose with < and > is not markup
    assert clean("if a < b and c > d then x<3 holds") == "if a < b and c > d then x<3 holds"
    assert clean("<b>bold</b>", html_tags=False) == "<b>bold</b>"


def test_html_entities_unescaped_after_tags():
    assert clean("Fish &amp; chips&nbsp;for &#8364;5") == "Fish & chips for €5"
    # an escaped tag is text about HTML: it survives as text
    assert clean("write &lt;br&gt; for a line break") == "write <br> for a line break"
    assert clean("a &amp; b", html_entities=False) == "a &amp; b"


def test_urls_removed_sentence_punctuation_kept():
    text = "See https://example.org/a/b?q=1&r=2. Or www.example.com, or ftp://files.example.net/x!"
    assert clean(text) == "See . Or , or !"
    assert clean("Read (http://en.wikipedia.org/wiki/Foo_(bar)) today") == "Read () today"
    assert clean("HTTPS://EXAMPLE.ORG/PAGE here") == "here"
    assert clean("see https://example.org", urls=False) == "see https://example.org"


def test_emails_removed():
    text = "Write to jane.doe+news@mail.example.co.uk or to info@example.org."
    assert clean(text) == "Write to or to ."
    assert clean("Grüße an jürgen@beispiel.de!") == "Grüße an !"
    assert clean("a@b is not an address, @handle neither") == "a@b is not an address, @handle neither"
    assert clean("x info@example.org", emails=False) == "x info@example.org"


def test_whitespace_within_lines_and_newlines_kept():
    text = "  first\t\tline   with  spaces  \r\nsecond line\r\n\r\n\r\n\n\nthird\u2028fourth\n\n"
    assert clean(text) == "first line with spaces\nsecond line\n\nthird\nfourth"
    # exactly one blank line stays a paragraph break
    assert clean("para one\n\npara two") == "para one\n\npara two"
    # invisible characters go, ZWJ/ZWNJ stay
    assert clean("zero\u200bwidth soft\u00adhyphen \ufeffbom\x07") == "zerowidth softhyphen bom"
    assert clean("می\u200cخواهم") == "می\u200cخواهم"
    assert normalize_whitespace(" a \n\n\n\n b ") == "a\n\nb"
    # switched off: spaces stay, only line breaks are unified
    assert clean("a  b\r\nc", whitespace=False) == "a  b\nc"


def test_nfkc_runs_before_markup_and_urls():
    # full-width markup and URLs become ASCII first, so they are recognised
    assert clean("＜ｂ＞bold＜／ｂ＞ ｈｔｔｐｓ：／／ｅｘａｍｐｌｅ．ｃｏｍ ok") == "bold ok"


def test_step_contract_drops_empty_with_capped_samples():
    step = Clean(sample_cap=2)
    docs = [Document("  <p> </p> https://x.org ", f"e{i}", {"url": f"u{i}"}) for i in range(5)]
    docs.insert(2, Document("Kept   text", "k"))
    docs.insert(4, Document("Unchanged text", "u"))
    out = step.run(docs)
    assert isinstance(out, types.GeneratorType)
    out = list(out)
    assert [d.text for d in out] == ["Kept text", "Unchanged text"]
    assert out[1] is docs[4]  # nothing to change: the same object passes through
    assert docs[2].text == "Kept   text"  # the input document is not mutated
    assert step.stats.docs_in == 7 and step.stats.docs_out == 2
    assert step.stats.dropped == {"empty_after_clean": 5}
    samples = step.stats.samples["empty_after_clean"]
    assert len(samples) == 2 and samples[0]["id"] == "e0" and samples[0]["url"] == "u0"
    assert step.stats.as_dict()["dropped"] == {"empty_after_clean": 5}


def test_picklable_and_flags_kept():
    step = pickle.loads(pickle.dumps(Clean(urls=False)))
    assert step.name == "clean" and step.urls is False and step.nfkc is True
    assert step.clean_text("go to www.example.org") == "go to www.example.org"


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t", "<br><br>", "\u200b"])
def test_blank_inputs_become_empty(text):
    assert clean(text) == ""


def _regex_whitespace(text: str) -> str:
    """The three-regex definition that `normalize_whitespace` implements line by line."""
    import re

    from llmforge.prep.clean import _INVISIBLE

    text = _INVISIBLE.sub("", text)
    text = re.sub(r"[^\S\n]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def test_whitespace_fast_path_equals_regex_definition():
    import random

    rng = random.Random(0)
    alphabet = " \t\n\n\x0b\x0c\r\x1c\x85\xa0\u2009\u3000\u200b\ufeff\x00ab.é"
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert normalize_whitespace(text) == _regex_whitespace(text), repr(text)


@pytest.mark.parametrize(
    "text",
    ["Www.Example.org/pg ok", "WWW.example.org ok", "see HTTPS://x.org/a.", "ftp://h/f ok", "www2.x.de ok"],
)
def test_url_precheck_is_case_insensitive(text):
    assert "example" not in clean(text) and "x.org" not in clean(text) and "h/f" not in clean(text)
    assert "x.de" not in clean(text)
