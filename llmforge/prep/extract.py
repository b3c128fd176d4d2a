"""Main-text extraction from HTML with resiliparse, keeping line structure.

resiliparse parses in linear time in C++; the size cap bounds its work per page, and a wall-clock alarm
(SIGALRM, in the worker's main thread) bounds everything around it, so no page can hang a worker. Pages over
the cap are truncated at the cap (their head is usually the content) and counted.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from llmforge.prep.document import Document
from llmforge.prep.step import PipelineStep


class ExtractTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise ExtractTimeout after `seconds` of wall time (main thread of a POSIX process only; else no-op)."""
    if (
        seconds <= 0
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "SIGALRM")
    ):
        yield
        return

    def _raise(signum, frame):
        raise ExtractTimeout

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Extract(PipelineStep):
    """HTML documents -> plain text (other content types pass through unchanged)."""

    name = "extract"

    def __init__(
        self,
        main_content: bool = True,
        max_html_chars: int = 2_000_000,
        timeout_s: float = 5.0,
        list_bullets: bool = True,
        alt_texts: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.main_content, self.max_html_chars, self.timeout_s = main_content, max_html_chars, timeout_s
        self.list_bullets, self.alt_texts = list_bullets, alt_texts

    def process(self, doc: Document) -> Document | None:
        if doc.metadata.get("content_type") != "text/html":
            return doc
        from resiliparse.extract.html2text import extract_plain_text

        html = doc.text
        if len(html) > self.max_html_chars:
            html = html[: self.max_html_chars]
            doc.metadata["html_truncated"] = True
        try:
            with time_limit(self.timeout_s):
                text = extract_plain_text(
                    html,
                    preserve_formatting=True,
                    main_content=self.main_content,
                    list_bullets=self.list_bullets,
                    alt_texts=self.alt_texts,
                    links=False,
                    form_fields=False,
                    noscript=False,
                )
        except ExtractTimeout:
            self.drop(doc, "extract_timeout")
            return None
        except Exception as err:  # noqa: BLE001 — a page that breaks the parser is counted, not fatal
            self.drop(doc, f"extract_error:{type(err).__name__}")
            return None
        if not text.strip():
            self.drop(doc, "no_text")
            return None
        doc.text = text
        doc.metadata["content_type"] = "text/plain"
        return doc
