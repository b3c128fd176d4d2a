"""Reading crawl files: WARC (HTML `response` records) and WET (`conversion` records), plus plain text.

Inputs are local paths, globs, http(s) URLs, or a Common Crawl ``*.paths.gz`` listing (one relative path per
line, joined to a base URL). Downloads retry with backoff and resume a partial file with an HTTP Range
request; a finished download is renamed into place, so a half-written file is never taken for a whole one,
and an HTTP 416 (range not satisfiable) counts as finished only when the part is as long as the server's file.

Reading never stops on bad input, and never lets part of a record through: a gzip member that does not
inflate or is cut short, a record header that does not parse, a wrong Content-Length, a body that does not
decode or inflates past the cap, a non-HTML payload: each is counted once under a reason and skipped, and
the reader goes on at the next record (``WARC/1.x`` line) or gzip member that inflates to one (`_Records`).
Inflating is done in bounded chunks, so no record, however its headers lie, costs more memory than the cap.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import http.client
import math
import os
import re
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmforge.prep.document import Document

COMMON_CRAWL_BASE = "https://data.commoncrawl.org/"
HTML_TYPES = ("text/html", "application/xhtml+xml")
META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]+)""", re.IGNORECASE)
HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([a-zA-Z0-9_.:-]+)", re.IGNORECASE)
RECORD_START = re.compile(rb"WARC/1\.[01]\r?\n")
HEADER_END = re.compile(rb"\r?\n\r?\n")
TRAILER = re.compile(rb"\r\n\r\n")  # ends every WARC record
GZIP_MAGIC = b"\x1f\x8b\x08"
CHUNK = 1 << 16  # bytes read or inflated at a time
MAX_HEADER_BYTES = 1 << 16  # a WARC or HTTP header block longer than this is malformed


# -- inputs ---------------------------------------------------------------------------------------


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def read_listing(spec: str, base_url: str = COMMON_CRAWL_BASE, cache_dir: Path | None = None) -> list[str]:
    """The URLs of a ``warc.paths.gz`` listing (local file or URL)."""
    path = Path(spec)
    if is_url(spec):
        path = download(spec, (cache_dir or Path(".")) / Path(spec).name)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return [line if is_url(line) else base_url.rstrip("/") + "/" + line.lstrip("/") for line in lines]


def expand_inputs(
    specs: str | list[str], base_url: str = COMMON_CRAWL_BASE, cache_dir: Path | None = None
) -> list[str]:
    """Paths, globs, URLs and listings -> a sorted, de-duplicated list of local paths or URLs."""
    out: list[str] = []
    for spec in [specs] if isinstance(specs, str) else list(specs):
        if spec.endswith(".paths.gz") or spec.endswith(".paths"):
            out.extend(read_listing(spec, base_url, cache_dir))
        elif is_url(spec):
            out.append(spec)
        else:
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input {spec!r} matches no file")
            out.extend(m for m in matches if os.path.isfile(m))
    return list(dict.fromkeys(out))


def remote_size(url: str, headers, timeout: float) -> int | None:
    """The file's length on the server: a 416's ``Content-Range: bytes */N``, else a HEAD request."""
    total = (headers.get("Content-Range") or "").rpartition("/")[2]
    if total.isdigit():
        return int(total)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            length = response.headers.get("Content-Length")
    except (OSError, urllib.error.URLError, http.client.HTTPException):
        return None
    return int(length) if length and length.isdigit() else None


def download(url: str, dest: Path, retries: int = 5, timeout: float = 60.0, backoff: float = 0.5) -> Path:
    """Fetch url to dest, resuming `dest.part` with a Range request; retries transient failures."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status != 206:  # server ignored the range: start over
                    have = 0
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                length = response.headers.get("Content-Length")
                expected = int(total) if total.isdigit() else (have + int(length) if length else None)
                with open(part, "ab" if have else "wb") as f:
                    while block := response.read(1 << 20):
                        f.write(block)
            size = part.stat().st_size
            if expected is not None and size != expected:
                raise OSError(f"short download: {size} of {expected} bytes")
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # range not satisfiable: whole only if it is as long as the file
                remote = remote_size(url, err.headers, timeout)
                if remote == have:
                    os.replace(part, dest)
                    return dest
                part.unlink()  # longer than the file, or the length is unknown: start over
                last_error = OSError(f"HTTP 416 with {have} bytes here and {remote} on the server")
            elif 400 <= err.code < 500 and err.code not in (408, 429):
                raise
            else:
                last_error = err
        except (OSError, urllib.error.URLError, http.client.HTTPException) as err:
            last_error = err
        time.sleep(backoff * 2**attempt)
    raise OSError(f"download of {url} failed after {retries + 1} attempts: {last_error}")


# -- decoding -------------------------------------------------------------------------------------


def _codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name.strip().lower()).name
    except LookupError:
        return None


def decode_html(body: bytes, content_type: str | None) -> tuple[str, str]:
    """Charset from the HTTP header, then the meta tag, then detection; returns (text, charset used)."""
    header = HEADER_CHARSET.search(content_type or "")
    meta = META_CHARSET.search(body[:4096])
    for candidate in (
        header.group(1) if header else None,
        meta.group(1).decode("ascii", "ignore") if meta else None,
    ):
        codec = _codec(candidate)
        if codec:
            try:
                return body.decode(codec), codec
            except (UnicodeDecodeError, LookupError):
                continue  # the declared charset is wrong: fall through to detection
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    detected = detect_encoding(body) or "utf-8"
    return bytes_to_str(body, detected, errors="replace"), _codec(detected) or detected


# -- WARC -----------------------------------------------------------------------------------------


@dataclass
class ReadStats:
    """`records` counts every record (or damaged stretch) met: records == documents + sum(skipped)."""

    records: int = 0
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    bytes_read: int = 0
    bytes_skipped: int = 0  # passed over while re-synchronising after damage

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "documents": self.documents,
            "bytes_read": self.bytes_read,
            "bytes_skipped": self.bytes_skipped,
            "skipped": dict(sorted(self.skipped.items())),
        }


class _Damaged(Exception):
    """A gzip member that does not inflate (`gzip`) or that the file cuts short (`truncated`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Inflow:
    """The bytes of one crawl file in chunks of at most CHUNK: as they are, or inflated member by member.

    Inflating is bounded by CHUNK per call, so a member that inflates to gigabytes costs no memory. A
    member that fails to inflate or is cut short raises `_Damaged` once; reading then goes on at the next
    gzip member that inflates to a WARC header (`next_member`, `jump`).
    """

    def __init__(self, fh, stats: ReadStats) -> None:
        self.fh, self.stats = fh, stats
        self.gz = fh.read(3) == GZIP_MAGIC
        fh.seek(0)
        self.pending = b""  # compressed bytes read but not inflated yet, from file offset `at`
        self.at = 0
        self.member: Any = None  # the zlib decompressor of the member being read
        self.member_start = 0
        self.member_out = 0  # bytes the current member has given so far
        self.no_member_after: int | None = None  # a search found no member from there on

    def read(self) -> bytes:
        """The next chunk; b"" at the end of the file."""
        if not self.gz:
            return self.fh.read(CHUNK)
        while True:
            if self.member is None:
                if len(self.pending) < 3:
                    self.pending += self.fh.read(CHUNK)
                if not self.pending:
                    return b""
                self.member_start, self.member_out = self.at, 0
                if not self.pending.startswith(GZIP_MAGIC):
                    raise _Damaged("gzip")  # bytes between members that are no member
                self.member = zlib.decompressobj(31)
            if not self.pending:
                self.pending = self.fh.read(CHUNK)
                if not self.pending:
                    raise _Damaged("truncated")
            try:
                out = self.member.decompress(self.pending, CHUNK)
            except zlib.error:
                raise _Damaged("gzip") from None
            rest = self.member.unused_data if self.member.eof else self.member.unconsumed_tail
            self.at += len(self.pending) - len(rest)
            self.pending = rest
            if self.member.eof:
                self.member = None
            if out:
                self.member_out += len(out)
                return out

    def next_member(self) -> int | None:
        """Offset of the next member after the current one's start that inflates to a WARC header."""
        pos = self.member_start + 1
        if self.no_member_after is not None and pos >= self.no_member_after:
            return None
        while True:
            self.fh.seek(pos)
            data = self.fh.read(1 << 20)
            k = data.find(GZIP_MAGIC)
            while k >= 0:
                if self._starts_record(pos + k):
                    return pos + k
                k = data.find(GZIP_MAGIC, k + 1)
            if len(data) < (1 << 20):
                self.no_member_after = self.member_start + 1
                return None
            pos += len(data) - 2

    def jump(self, offset: int | None) -> None:
        """Go on at offset (None: the end of the file), counting the compressed bytes passed over."""
        end = os.fstat(self.fh.fileno()).st_size if offset is None else offset
        self.stats.bytes_skipped += end - self.member_start
        self.fh.seek(end)
        self.at, self.pending, self.member, self.member_start, self.member_out = end, b"", None, end, 0

    def _starts_record(self, offset: int) -> bool:
        self.fh.seek(offset)
        try:
            return zlib.decompressobj(31).decompress(self.fh.read(4096), 8).startswith(b"WARC/1.")
        except zlib.error:
            return False


class _Records:
    """Frames WARC records in an `_Inflow`: yields (headers, block) per whole record, else a skip reason.

    A record is whole when its header parses, its Content-Length of block bytes is there and is followed by
    the blank line that ends a record and, in a gzip file, the member holding it inflated whole (checksum
    included). Anything else is counted once, under one reason, and reading goes on at the next
    ``WARC/1.x`` line (or, after `cap` bytes of a gzip member without one, at the next member):

    - ``malformed:header``: no WARC header where a record should start (a non-WARC file: one such count);
    - ``malformed:length``: the block is not followed by the end of a record (a wrong Content-Length);
    - ``malformed:gzip`` / ``malformed:truncated``: the gzip member holding the record is corrupt / cut
      short, or the file ends inside the record;
    - ``too_large``: the Content-Length, or the distance to the next record, is over `cap`; such a record
      is never held in memory.
    """

    def __init__(self, inflow: _Inflow, cap: int, stats: ReadStats) -> None:
        self.inflow, self.cap, self.stats = inflow, cap, stats
        self.buf = bytearray()
        self.i = 0  # start of what is not consumed yet
        self.end = False  # no more bytes (until the damage is passed, if `damage` is set)
        self.damage: str | None = None
        self.cut = 0  # where the damaged member's bytes began in buf (may be before i)

    def _more(self) -> bool:
        if self.end:
            return False
        try:
            data = self.inflow.read()
        except _Damaged as err:  # keep nothing of the damaged member
            self.cut = len(self.buf) - self.inflow.member_out
            del self.buf[max(self.cut, self.i) :]
            self.end, self.damage = True, err.reason
            return False
        if not data:
            self.end = True
            return False
        self.buf += data
        return True

    def _compact(self) -> None:
        """Drops consumed bytes (only between records: positions held while framing one stay valid)."""
        if self.i > (1 << 20) and self.i > len(self.buf) // 2:
            del self.buf[: self.i]
            self.i = 0

    def _need(self, n: int) -> bool:
        """At least n bytes from `i` on in the buffer (False if the input ends first)."""
        while len(self.buf) - self.i < n:
            if not self._more():
                return False
        return True

    def _resync(self, record_start: int) -> float:
        """Moves `i` to the next record start (or the end); returns how far that is from record_start."""
        dist: float = self.i - record_start
        scanned = dist  # since the last jump
        self.stats.bytes_skipped += self.i - record_start
        while True:
            m = RECORD_START.search(self.buf, self.i)
            stop = m.start() if m else max(self.i, len(self.buf) - 16)
            dist += stop - self.i
            scanned += stop - self.i
            self.stats.bytes_skipped += stop - self.i
            self.i = stop
            if m:
                return dist
            if self.inflow.gz and scanned > self.cap and not self.end:
                nxt = self.inflow.next_member()
                if nxt is not None:  # a member without a record start for `cap` bytes: go to the next
                    self.inflow.jump(nxt)
                    self.buf.clear()
                    self.i, dist, scanned = 0, math.inf, 0
                    continue
            self._compact()
            if not self._more():
                self.stats.bytes_skipped += len(self.buf) - self.i
                self.i = len(self.buf)
                return dist

    def _fail(self, reason: str, record_start: int) -> str:
        """The reason to count for a record that failed at `i` (none if a damage took it); moves on."""
        dist = self._resync(record_start)
        if self.damage:
            return ""
        if reason == "malformed:length" and dist > self.cap + MAX_HEADER_BYTES:
            return "too_large"
        return reason

    def __iter__(self) -> Iterator[tuple[dict[str, str], bytes] | str]:
        while True:
            self._compact()
            while self._need(1) and self.buf[self.i] in b"\r\n":
                self.i += 1
            if self.i < len(self.buf):
                if result := self._record(self.i):
                    yield result
            elif self.damage:  # one count for the damaged stretch and the record it held
                yield f"malformed:{self.damage}"
                self.buf.clear()
                self.i, self.end, self.damage = 0, False, None
                self.inflow.jump(self.inflow.next_member())
            else:
                return

    def _record(self, start: int) -> tuple[dict[str, str], bytes] | str:
        self._need(8)
        if not self.buf.startswith(b"WARC/1.", start):
            self.i = start + 1
            return self._fail("malformed:header", start)
        while not (m := HEADER_END.search(self.buf, start, start + MAX_HEADER_BYTES)):
            if len(self.buf) - start > MAX_HEADER_BYTES or not self._more():
                self.i = start + 1
                return self._fail("malformed:truncated" if self.end else "malformed:header", start)
        headers = parse_headers(bytes(self.buf[start : m.start()]))
        length = headers.get("content-length", "")
        if not length.isdigit():
            self.i = start + 1
            return self._fail("malformed:header", start)
        body, end = m.end(), m.end() + int(length)
        self.i = body
        if end - body > self.cap:
            return "too_large" if self._fail("too_large", start) else ""
        if not self._need(end + 4 - body):
            self.i = start + 1
            return self._fail("malformed:truncated", start)
        trailer = TRAILER.match(self.buf, end)
        if not trailer:
            return self._fail("malformed:length", start)
        self.i = trailer.end()
        # one byte past the record: in a gzip file, the member holding the record has inflated whole
        self._need(1)
        if self.damage and self.cut < self.i:
            return ""  # the damaged member held this record: counted with the damage
        return headers, bytes(self.buf[body:end])


def parse_headers(block: bytes) -> dict[str, str]:
    """`Name: value` lines (names lower-cased) after a first line (the WARC version or HTTP status)."""
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


class DecodeError(Exception):
    pass


class TooLarge(Exception):
    pass


def dechunk(data: bytes) -> bytes:
    """An HTTP/1.1 chunked body, strictly: a bad size line or a short chunk is a DecodeError."""
    out, i = [], 0
    while True:
        j = data.find(b"\r\n", i)
        try:
            size = int(data[i:j].split(b";")[0].strip(), 16) if j >= 0 else -1
        except ValueError:
            size = -1
        if size < 0:
            raise DecodeError("bad chunk size line")
        if size == 0:
            return b"".join(out)
        chunk = data[j + 2 : j + 2 + size]
        if len(chunk) < size:
            raise DecodeError("short chunk")
        out.append(chunk)
        i = j + 2 + size + 2


def decode_content(body: bytes, encoding: str, cap: int) -> bytes:
    """A Content-Encoding (gzip, deflate, br, identity) undone, inflating at most cap + 1 bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity", "none"):
        return body
    if encoding == "br":
        try:
            import brotli
        except ImportError:
            raise DecodeError("br content encoding needs the brotli package") from None
        try:
            dec = brotli.Decompressor()
            out = dec.process(body, output_buffer_limit=cap + 1)
        except brotli.error as err:
            raise DecodeError(str(err)) from None
        if len(out) > cap:
            raise TooLarge
        if not dec.is_finished():
            raise DecodeError("incomplete brotli stream")
        return out
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise DecodeError(f"unknown content encoding {encoding!r}")
    for wbits in (31,) if encoding != "deflate" else (15, -15):  # deflate: zlib-wrapped, else raw
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(body, cap + 1)
        except zlib.error:
            continue
        if len(out) > cap:
            raise TooLarge
        if d.eof:
            return out
        break  # ends early: the body was cut
    raise DecodeError(f"{encoding} body does not inflate")


class WarcReader:
    """Yields a Document per HTML response (WARC) or text conversion (WET) record of one file."""

    def __init__(
        self, max_record_bytes: int = 10 << 20, min_status: int = 200, max_status: int = 299
    ) -> None:
        self.max_record_bytes = max_record_bytes
        self.min_status, self.max_status = min_status, max_status
        self.stats = ReadStats()

    def read(self, path: str | Path) -> Iterator[Document]:
        source = Path(path).name
        self.stats.bytes_read += os.path.getsize(path)
        with open(path, "rb") as fh:
            for item in _Records(_Inflow(fh, self.stats), self.max_record_bytes, self.stats):
                if isinstance(item, str):
                    self._skip(item)
                    continue
                try:
                    doc = self._convert(*item, source)
                except TooLarge:
                    doc = self._skip("too_large")
                except DecodeError:
                    doc = self._skip("malformed:decode")
                if doc is not None:
                    self.stats.records += 1
                    self.stats.documents += 1
                    yield doc

    def _convert(self, headers: dict[str, str], block: bytes, source: str) -> Document | None:
        rtype = headers.get("warc-type")
        uri = headers.get("warc-target-uri", "")
        rid = headers.get("warc-record-id") or f"{source}:{self.stats.records}"
        date = headers.get("warc-date")
        if rtype == "conversion":  # WET: already plain text
            text = block.decode("utf-8", errors="replace")
            meta = {"url": uri, "date": date, "source": source, "content_type": "text/plain"}
            return Document(text, rid, meta) if text.strip() else self._skip("empty")
        if rtype is None:  # the header block was damaged
            return self._skip("malformed:header")
        if rtype != "response":
            return self._skip(f"record_type:{rtype}")
        http = HEADER_END.search(block, 0, MAX_HEADER_BYTES)
        if not block.startswith(b"HTTP/") or not http:
            return self._skip("no_http_headers")
        status_line = block[: block.find(b"\n")].split()
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
        if not self.min_status <= status <= self.max_status:
            return self._skip(f"http_status:{status}")
        http_headers = parse_headers(block[: http.start()])
        content_type = http_headers.get("content-type", "")
        if not content_type.split(";")[0].strip().lower().startswith(HTML_TYPES):
            return self._skip("not_html")
        body = block[http.end() :]
        if "chunked" in http_headers.get("transfer-encoding", "").lower():
            body = dechunk(body)
        body = decode_content(body, http_headers.get("content-encoding", ""), self.max_record_bytes)
        if not body.strip():
            return self._skip("empty")
        html, charset = decode_html(body, content_type)
        return Document(
            html,
            rid,
            {"url": uri, "date": date, "source": source, "charset": charset, "content_type": "text/html"},
        )

    def _skip(self, reason: str) -> None:
        if reason:
            self.stats.records += 1
            self.stats.skipped[reason] += 1
        return None


def read_text_file(path: str | Path) -> Iterator[Document]:
    """One document per plain-text file."""
    text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    if text:
        yield Document(text, str(path), {"source": Path(path).name, "content_type": "text/plain"})
