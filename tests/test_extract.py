"""HTML extraction: the per-page time limit holds whatever resiliparse does in C, the worker is reused."""

from __future__ import annotations

import time

import pytest

from llmforge.prep.document import Document
from llmforge.prep.extract import Extract, extract_text, nesting_depth

PAGE = "<html><body><article><h1>Title</h1><p>{}</p></article></body></html>"
TEXT = "A paragraph with enough words to be kept as the main content of the page. " * 5


def html_doc(html: str, doc_id: str = "d") -> Document:
    return Document(html, doc_id, {"content_type": "text/html"})


def deep(levels: int, closed: bool) -> str:
    return "<html><body>" + "<div>" * levels + "x" + ("</div>" * levels if closed else "") + "</body></html>"


def test_nesting_depth_estimate():
    assert nesting_depth(deep(5000, closed=True), 10) == 5002  # html, body, 5000 divs
    assert nesting_depth(deep(5000, closed=False), 10) == 5002
    # void and implied-end elements do not nest; stray end tags do not dig below the top
    flat = "<p>a" * 3000 + "<br>" * 3000 + "<LI><img src=x>" * 3000 + "<div><span>b</span></div>" * 3000
    assert nesting_depth(flat, 10) == 2
    assert nesting_depth("</div>" * 3000 + "<section>" * 1500, 10) == 1500
    assert nesting_depth(PAGE.format(TEXT), 1000) == 0  # fewer tags than the limit: not even counted


@pytest.mark.parametrize("levels,closed", [(100_000, True), (1_000_000, False)])
def test_deep_pages_cost_at_most_the_limit_plus_one_second(levels, closed):
    step = Extract(timeout_s=2.0)
    docs = [html_doc(deep(levels, closed), "deep"), html_doc(PAGE.format(TEXT), "ok")]
    start = time.monotonic()
    out = list(step.run(docs))
    assert time.monotonic() - start <= 2.0 + 1.0
    assert [d.id for d in out] == ["ok"] and step.stats.dropped == {"too_deep": 1}


def test_a_page_that_overruns_the_limit_in_c_is_killed_and_the_worker_replaced():
    """Without the depth check, a 30,000-level page keeps resiliparse's C code busy for minutes: the
    child is killed at the limit, the page counted, and the next page goes to a fresh child."""
    step = Extract(timeout_s=1.0, max_depth=0)
    worker = step.worker()
    list(step.run([html_doc(PAGE.format("warm-up " * 50), "warm")]))  # start-up is not timed
    pid = worker.proc.pid
    start = time.monotonic()
    assert list(step.run([html_doc(deep(30_000, closed=True), "deep")])) == []
    assert time.monotonic() - start <= 1.0 + 1.0
    assert step.stats.dropped == {"extract_timeout": 1} and worker.proc is None  # killed
    out = list(step.run([html_doc(PAGE.format(TEXT), "ok")]))
    assert [d.id for d in out] == ["ok"] and out[0].text.strip() == "Title\n\n" + TEXT.strip()
    assert worker.proc.pid != pid  # replaced once ...
    pid = worker.proc.pid
    list(step.run([html_doc(PAGE.format(TEXT), "again")]))
    assert worker.proc.pid == pid  # ... then reused


def test_worker_gives_the_in_process_result():
    step = Extract()
    pages = [
        PAGE.format(TEXT),
        "<html><body><ul><li>one<li>two</ul><p>é “quoted” \u2028 line</p></body></html>",
    ]
    out = list(step.run([html_doc(p, str(i)) for i, p in enumerate(pages)]))
    assert [d.text for d in out] == [extract_text(p, step.options) for p in pages]
    assert all(d.metadata["content_type"] == "text/plain" for d in out)


def test_pages_sent_ahead_survive_a_killed_worker_in_order():
    step = Extract(timeout_s=1.0, max_depth=0, ahead=8)
    docs = [
        html_doc(PAGE.format(TEXT + "one"), "one"),
        html_doc(deep(30_000, closed=True), "deep"),
        html_doc(PAGE.format(TEXT + "two"), "two"),
        Document("plain text", "plain", {"content_type": "text/plain"}),
        html_doc("<html><body><nav>menu</nav></body></html>", "empty"),
        html_doc(PAGE.format(TEXT + "three"), "three"),
    ]
    out = list(step.run(docs))
    assert [d.id for d in out] == ["one", "two", "plain", "three"]
    assert out[2].text == "plain text" and out[3].text.rstrip().endswith("three")
    assert step.stats.dropped == {"extract_timeout": 1, "no_text": 1}
    assert (step.stats.docs_in, step.stats.docs_out) == (6, 4)
