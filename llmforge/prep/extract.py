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
import contextlib
import fcntl
import json
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from llmforge.prep.document import Document
from llmforge.prep.step import PipelineStep

READY = b"ready\n"
START_TIMEOUT_S = 120.0  # python + resiliparse import, on a loaded machine
PIPE_BYTES = 1 << 20  # pipe buffers to and from the extraction worker (Linux's limit for everyone: 1 MiB)
AHEAD_CHARS = PIPE_BYTES // 2  # at most this much HTML waits at the extraction worker
# tags that never hold others (void) or whose end tag the next one implies, by their first two letters
# (a one-letter name has 0 as its second): br hr img input li(nk) meta source wbr td tr th(ead)
# tbody tfoot dd dt option rp rt p. Other names sharing these letters (ins, menu) are rare enough.
FLAT = ("br", "hr", "im", "in", "li", "me", "so", "wb", "td", "tr", "th", "tb", "tf", "dd", "dt", "op", "rp")
FLAT_TABLE = np.zeros(1 << 16, dtype=bool)
for _name in (*FLAT, "rt", "p\0"):
    FLAT_TABLE[_name.encode()[0] << 8 | _name.encode()[1]] = True


def nesting_depth(html: str, limit: int) -> int:
    """The deepest nesting of tags, estimated from the bytes alone (no parse); 0 if it cannot pass limit.

    Void and implied-end elements do not nest; an end tag with nothing open is ignored. Vectorised over
    the bytes: a 2 MB page of 400,000 tags costs ~0.1 s, an ordinary page tens of microseconds.
    """
    raw = np.frombuffer(html.encode("utf-8", "surrogatepass") + b"\0\0\0", dtype=np.uint8)
    lt = np.flatnonzero(raw[:-3] == ord("<"))
    if lt.size <= limit:  # no more tags than limit: shallow enough
        return 0
    end = raw[lt + 1] == ord("/")
    first, second = raw[lt + 1 + end] | 32, raw[lt + 2 + end] | 32  # lower case
    is_tag = (first >= ord("a")) & (first <= ord("z"))
    letter = (second >= ord("a")) & (second <= ord("z"))
    letter_or_digit = letter | ((second >= ord("0")) & (second <= ord("9")))
    second = np.where(letter_or_digit, second, 0)
    flat = FLAT_TABLE[first.astype(np.int64) << 8 | second]
    level = np.cumsum(np.where(is_tag & ~flat, np.where(end, -1, 1), 0))
    return int((level - np.minimum.accumulate(np.minimum(level, 0))).max())  # the walk kept at >= 0


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


# reply statuses
OK, ERROR, TOO_DEEP, TIMEOUT, DIED = range(5)


def serve(options: dict, timeout_s: float, max_depth: int, fd_in: int = 0, fd_out: int = 1) -> None:
    """The child's loop: length-prefixed pages in, (status, length, text or error name) out, in order.

    Each page runs under a real-time timer whose signal keeps its default action: past `timeout_s` the
    kernel ends this process, wherever it is (C code included); the parent sees it die and counts the page.
    A thread drains the input, so the parent can send pages ahead without ever blocking on a full pipe.
    """
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    extract_text("", options)  # imports resiliparse before saying it is ready
    _write_all(fd_out, READY)
    pages: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def receive() -> None:
        try:
            while True:
                (n,) = struct.unpack("<I", _read_exact(fd_in, 4))
                pages.put(_read_exact(fd_in, n))
        except EOFError:
            pages.put(None)

    threading.Thread(target=receive, daemon=True).start()
    while (page := pages.get()) is not None:
        if timeout_s > 0:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        html = page.decode("utf-8", "surrogatepass")
        try:
            if max_depth > 0 and nesting_depth(html, max_depth) > max_depth:
                status, out = TOO_DEEP, b""
            else:
                status, out = OK, extract_text(html, options).encode("utf-8", "surrogatepass")
        except Exception as err:  # noqa: BLE001 — reported to the parent, which counts it
            status, out = ERROR, type(err).__name__.encode()
        signal.setitimer(signal.ITIMER_REAL, 0)
        _write_all(fd_out, struct.pack("<BI", status, len(out)) + out)


class ExtractWorker:
    """A child process running `serve`: pages go in with `submit`, come out in order with `result`.

    When the child dies (killed by its own timer, or crashed), the oldest page gets TIMEOUT (or DIED), a
    new child starts, and the pages sent after that one are sent to it again.
    """

    def __init__(self, options: dict, timeout_s: float, max_depth: int) -> None:
        self.args = [json.dumps(options), str(timeout_s), str(max_depth)]
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.queue: deque[bytes] = deque()  # frames submitted and not answered yet, oldest first

    def _start(self) -> None:
        """A new child, ready to extract (its start-up is not part of any page's time)."""
        root = str(Path(__file__).resolve().parents[2])  # the child imports this very llmforge
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmforge.prep.extract", *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env={**os.environ, "PYTHONPATH": path},
        )
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        for pipe in (proc.stdin, proc.stdout):  # room for the pages sent ahead and their texts
            with contextlib.suppress(AttributeError, OSError):  # Linux only; the default (64 KiB) works
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        try:
            if _read_exact(proc.stdout.fileno(), len(READY), time.monotonic() + START_TIMEOUT_S) != READY:
                raise EOFError
        except (TimeoutError, EOFError):
            self.stop()
            raise OSError("the extraction worker (python -m llmforge.prep.extract) did not start") from None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
            self.proc = None

    def _send(self, frame: bytes) -> None:
        if self.proc is None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            _write_all(self.proc.stdin.fileno(), frame)
        except BrokenPipeError:  # the child died: `result` finds out which page it was on
            pass

    def submit(self, html: str) -> None:
        data = html.encode("utf-8", "surrogatepass")
        frame = struct.pack("<I", len(data)) + data
        self.queue.append(frame)
        self._send(frame)

    def result(self) -> tuple[int, str]:
        """(status, text or error name) of the oldest submitted page."""
        assert self.queue and self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        # the child ends itself past timeout_s; the margin only guards against a child that cannot
        deadline = time.monotonic() + self.timeout_s * len(self.queue) + 30 if self.timeout_s > 0 else None
        try:
            status, n = struct.unpack("<BI", _read_exact(fd, 5, deadline))
            out = _read_exact(fd, n, deadline)
        except (EOFError, TimeoutError) as err:
            code = self.proc.wait() if isinstance(err, EOFError) else None  # None: still running
            status = TIMEOUT if code in (None, -signal.SIGALRM) else DIED
            self.stop()
            self.queue.popleft()
            for frame in self.queue:  # what the dead child had not answered goes to the next one
                self._send(frame)
            return status, ""
        self.queue.popleft()
        return status, out.decode("utf-8", "surrogatepass")


_WORKERS: dict[str, ExtractWorker] = {}


def worker_for(options: dict, timeout_s: float, max_depth: int) -> ExtractWorker:
    """One child per process and settings, reused by every Extract step of the process."""
    key = json.dumps([options, timeout_s, max_depth], sort_keys=True)
    if key not in _WORKERS:
        _WORKERS[key] = ExtractWorker(options, timeout_s, max_depth)
    return _WORKERS[key]


@atexit.register
def _stop_workers() -> None:
    for worker in _WORKERS.values():
        worker.stop()


class Extract(PipelineStep):
    """HTML documents -> plain text (other content types pass through unchanged).

    Pages are sent to the worker up to `ahead` pages (and AHEAD_CHARS characters) before their results
    are read, so the child extracts while the steps after this one work on earlier documents.
    """

    name = "extract"

    def __init__(
        self,
        main_content: bool = True,
        max_html_chars: int = 2_000_000,
        timeout_s: float = 5.0,
        max_depth: int = 1000,
        list_bullets: bool = True,
        alt_texts: bool = False,
        ahead: int = 32,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.max_html_chars, self.timeout_s, self.max_depth, self.ahead = (
            max_html_chars,
            timeout_s,
            max_depth,
            ahead,
        )
        self.options = {"main_content": main_content, "list_bullets": list_bullets, "alt_texts": alt_texts}

    def worker(self) -> ExtractWorker:
        return worker_for(self.options, self.timeout_s, self.max_depth)

    def run(self, documents: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        stats, worker = self.stats, self.worker()
        waiting: deque[tuple[Document, int | None]] = deque()  # in input order; size of the page sent
        chars = 0  # HTML at the worker
        for doc in documents:
            start = time.perf_counter()
            stats.docs_in += 1
            stats.chars_in += len(doc.text)
            sent = None
            if doc.metadata.get("content_type") == "text/html":
                if len(doc.text) > self.max_html_chars:
                    doc.text = doc.text[: self.max_html_chars]
                    doc.metadata["html_truncated"] = True
                worker.submit(doc.text)
                sent = len(doc.text)
            waiting.append((doc, sent))
            chars += sent or 0
            stats.seconds += time.perf_counter() - start
            while waiting and (len(waiting) > self.ahead or chars > AHEAD_CHARS):
                doc, size = waiting.popleft()
                chars -= size or 0
                if (out := self._finish(doc, worker, size)) is not None:
                    yield out
        while waiting:
            doc, size = waiting.popleft()
            if (out := self._finish(doc, worker, size)) is not None:
                yield out

    def _finish(self, doc: Document, worker: ExtractWorker, sent: int | None) -> Document | None:
        """The document with its page's result (None if dropped), counted."""
        start = time.perf_counter()
        out = doc if sent is None else self._result(doc, worker)
        if out is not None:
            self.stats.docs_out += 1
            self.stats.chars_out += len(out.text)
        self.stats.seconds += time.perf_counter() - start
        return out

    def _result(self, doc: Document, worker: ExtractWorker) -> Document | None:
        status, text = worker.result()
        if status != OK or not text.strip():
            reason = {TOO_DEEP: "too_deep", TIMEOUT: "extract_timeout", DIED: "extract_error:WorkerDied"}
            self.drop(doc, reason.get(status) or (f"extract_error:{text}" if status == ERROR else "no_text"))
            return None
        doc.text = text
        doc.metadata["content_type"] = "text/plain"
        return doc


if __name__ == "__main__":  # the child of ExtractWorker: its stdout carries only replies
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    serve(json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), 0, reply_fd)
