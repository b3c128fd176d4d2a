"""Main-text extraction from HTML with resiliparse, keeping line structure.

Two guards keep one page from holding a worker, whatever happens inside resiliparse's C++ code:

- a byte-level pre-check of tag nesting (`nesting_depth`): resiliparse's time grows with the square of the
  depth (85 ms at 1,000 levels, 8 s at 10,000), so a page nested deeper than `max_depth` is dropped as
  `too_deep` before it is parsed; it costs two `str.count` calls on ordinary pages;
- the parse runs in a child process (`ExtractWorker`, one per worker process, reused from page to page):
  a page that takes longer than `timeout_s` has the child killed and replaced, and is dropped as
  `extract_timeout`. A signal cannot do this: it is only handled once C code returns to Python.

Pages over `max_html_chars` are truncated at the cap (their head is usually the content) and marked.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import struct
import subprocess
import sys
import time

import numpy as np

from llmforge.prep.document import Document
from llmforge.prep.step import PipelineStep

# elements that never hold others (void) or whose end tag is implied by the next one: no depth
FLAT = (
    "area base br col embed hr img input link meta param source track wbr "
    "p li dt dd option optgroup tr td th thead tbody tfoot colgroup caption rp rt"
).split()
READY = b"ready\n"
START_TIMEOUT_S = 120.0  # python + resiliparse import, on a loaded machine
NAME = 8  # tag names are compared on their first 8 bytes (every FLAT name fits)


def _name_keys(names: np.ndarray) -> np.ndarray:
    """(n, NAME) lower-case name bytes, zero after the name -> one uint64 per row."""
    return np.ascontiguousarray(names).view(np.uint64).ravel()


FLAT_KEYS = _name_keys(np.array([list(n.encode().ljust(NAME, b"\0")) for n in FLAT], dtype=np.uint8))


def nesting_depth(html: str, limit: int) -> int:
    """The deepest nesting of tags, estimated from the bytes alone (no parse); 0 if it cannot pass limit.

    Void and implied-end elements do not nest; an end tag with nothing open is ignored. Vectorised over
    the bytes and tags: a 2 MB page of 400,000 tags costs ~0.1-0.4 s, an ordinary page tens of us.
    """
    raw = np.frombuffer(html.encode("utf-8", "surrogatepass") + bytes(NAME + 2), dtype=np.uint8)
    lt = np.flatnonzero(raw[: -NAME - 2] == ord("<"))
    if lt.size <= limit:  # no more tags than limit: shallow enough
        return 0
    end = raw[lt + 1] == ord("/")
    first = raw[lt + 1 + end] | 32  # lower case
    is_tag = (first >= ord("a")) & (first <= ord("z"))
    if _walk(np.where(is_tag, np.where(end, -1, 1), 0)) <= limit:  # every tag counted: shallow enough
        return 0
    window = raw[(lt + 1 + end)[:, None] + np.arange(NAME + 1)]
    window = window | ((window >= ord("A")) & (window <= ord("Z"))).astype(np.uint8) * 32  # lower case
    in_name = ((window >= ord("a")) & (window <= ord("z"))) | ((window >= ord("0")) & (window <= ord("9")))
    length = np.where(in_name.all(axis=1), NAME + 1, in_name.argmin(axis=1))  # NAME + 1: longer than NAME
    names = np.where(np.arange(NAME) < length[:, None], window[:, :NAME], 0).astype(np.uint8)
    flat = np.isin(_name_keys(names), FLAT_KEYS) & (length <= NAME)
    return _walk(np.where(is_tag & ~flat, np.where(end, -1, 1), 0))


def _walk(steps: np.ndarray) -> int:
    """The highest level of a walk of +1/-1/0 steps that stays at or above 0."""
    level = np.cumsum(steps)
    return int((level - np.minimum.accumulate(np.minimum(level, 0))).max())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int, deadline: float | None = None) -> bytes:
    """n bytes from fd; TimeoutError past the deadline, EOFError if the other side is gone."""
    chunks = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def extract_text(html: str, options: dict) -> str:
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(
        html, preserve_formatting=True, links=False, form_fields=False, noscript=False, **options
    )


def serve(options: dict, fd_in: int = 0, fd_out: int = 1) -> None:
    """The child's loop: a length-prefixed page in, (status, length, text or error name) out."""
    extract_text("", options)  # imports resiliparse before saying it is ready
    _write_all(fd_out, READY)
    while True:
        try:
            (n,) = struct.unpack("<I", _read_exact(fd_in, 4))
        except EOFError:
            return
        html = _read_exact(fd_in, n).decode("utf-8", "surrogatepass")
        try:
            status, out = 0, extract_text(html, options).encode("utf-8", "surrogatepass")
        except Exception as err:  # noqa: BLE001 — reported to the parent, which counts it
            status, out = 1, type(err).__name__.encode()
        _write_all(fd_out, struct.pack("<BI", status, len(out)) + out)


class PageError(Exception):
    """The extraction of one page raised (the exception's class name) or killed its process."""


class ExtractWorker:
    """A child process running `serve`; replaced when a page overruns its time or the child dies."""

    def __init__(self, options: dict) -> None:
        self.options = options
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        """A new child, ready to extract (its start-up is not part of any page's time)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmforge.prep.extract", json.dumps(self.options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert proc.stdout is not None
        self.proc = proc
        try:
            if _read_exact(proc.stdout.fileno(), len(READY), time.monotonic() + START_TIMEOUT_S) != READY:
                raise EOFError
        except (TimeoutError, EOFError):
            self.stop()
            raise OSError("the extraction worker (python -m llmforge.prep.extract) did not start") from None
        return proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
            self.proc = None

    def extract(self, html: str, timeout_s: float) -> str:
        """The page's text; TimeoutError past timeout_s (the child is killed), PageError if it fails."""
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
        assert proc.stdin is not None and proc.stdout is not None
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        data = html.encode("utf-8", "surrogatepass")
        try:
            _write_all(proc.stdin.fileno(), struct.pack("<I", len(data)) + data)
            status, n = struct.unpack("<BI", _read_exact(proc.stdout.fileno(), 5, deadline))
            out = _read_exact(proc.stdout.fileno(), n, deadline)
        except (TimeoutError, EOFError, BrokenPipeError) as err:
            self.stop()
            raise TimeoutError if isinstance(err, TimeoutError) else PageError("WorkerDied") from None
        if status:
            raise PageError(out.decode())
        return out.decode("utf-8", "surrogatepass")


_WORKERS: dict[str, ExtractWorker] = {}


def worker_for(options: dict) -> ExtractWorker:
    """One child per process and set of options, reused by every Extract step of the process."""
    key = json.dumps(options, sort_keys=True)
    if key not in _WORKERS:
        _WORKERS[key] = ExtractWorker(options)
    return _WORKERS[key]


@atexit.register
def _stop_workers() -> None:
    for worker in _WORKERS.values():
        worker.stop()


class Extract(PipelineStep):
    """HTML documents -> plain text (other content types pass through unchanged)."""

    name = "extract"

    def __init__(
        self,
        main_content: bool = True,
        max_html_chars: int = 2_000_000,
        timeout_s: float = 5.0,
        max_depth: int = 1000,
        list_bullets: bool = True,
        alt_texts: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.max_html_chars, self.timeout_s, self.max_depth = max_html_chars, timeout_s, max_depth
        self.options = {"main_content": main_content, "list_bullets": list_bullets, "alt_texts": alt_texts}

    def process(self, doc: Document) -> Document | None:
        if doc.metadata.get("content_type") != "text/html":
            return doc
        html = doc.text
        if len(html) > self.max_html_chars:
            html = html[: self.max_html_chars]
            doc.metadata["html_truncated"] = True
        if self.max_depth > 0 and nesting_depth(html, self.max_depth) > self.max_depth:
            self.drop(doc, "too_deep")
            return None
        try:
            text = worker_for(self.options).extract(html, self.timeout_s)
        except TimeoutError:
            self.drop(doc, "extract_timeout")
            return None
        except PageError as err:  # a page that breaks the parser (or its process) is counted, not fatal
            self.drop(doc, f"extract_error:{err}")
            return None
        if not text.strip():
            self.drop(doc, "no_text")
            return None
        doc.text = text
        doc.metadata["content_type"] = "text/plain"
        return doc


if __name__ == "__main__":  # the child of ExtractWorker: its stdout carries only replies
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    serve(json.loads(sys.argv[1]), 0, reply_fd)
