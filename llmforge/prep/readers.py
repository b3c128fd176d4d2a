"""Reading crawl files: WARC (HTML `response` records) and WET (`conversion` records), plus plain text.

Inputs are local paths, globs, http(s) URLs, or a Common Crawl ``*.paths.gz`` listing (one relative path per
line, joined to a base URL). Downloads retry with backoff and resume a partial file with an HTTP Range
request; a finished download is renamed into place, so a half-written file is never taken for a whole one,
and an HTTP 416 (range not satisfiable) counts as finished only when the part is as long as the server's file.

Reading never stops on bad input: a record that cannot be parsed, a truncated gzip member, a wrong
Content-Length, a non-HTML payload or an undecodable body is counted under a reason and skipped, and the
reader re-synchronises on the next record header (``WARC/1.x`` or a gzip member) after the damage.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import http.client
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

from warcio.archiveiterator import ArchiveIterator

from llmforge.prep.document import Document

COMMON_CRAWL_BASE = "https://data.commoncrawl.org/"
HTML_TYPES = ("text/html", "application/xhtml+xml")
META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]+)""", re.IGNORECASE)
HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([a-zA-Z0-9_.:-]+)", re.IGNORECASE)
RESYNC_WARC = re.compile(rb"WARC/1\.[01]\r?\n")
GZIP_MAGIC = b"\x1f\x8b\x08"


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
    records: int = 0
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    bytes_read: int = 0

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "documents": self.documents,
            "bytes_read": self.bytes_read,
            "skipped": dict(sorted(self.skipped.items())),
        }


def whole_file_gzip(path: str | Path, probe: int = 8 << 20) -> bool:
    """True if the file is gzip and its first member holds more than one record (not gzip-per-record)."""
    with open(path, "rb") as f:
        if f.read(3) != GZIP_MAGIC:
            return False
        f.seek(0)
        d = zlib.decompressobj(31)
        out = b""
        try:
            while not d.eof and len(out) < probe and (chunk := f.read(1 << 16)):
                out += d.decompress(chunk)
        except zlib.error:
            return False
    return len(RESYNC_WARC.findall(out)) > 1


def _resync(fh, start: int, chunk: int = 1 << 20) -> int | None:
    """Offset of the next plausible record start (a WARC header line or a gzip member) at or after start."""
    overlap = 16
    pos = start
    while True:
        fh.seek(pos)
        data = fh.read(chunk)
        if not data:
            return None
        hits = [m.start() for m in (RESYNC_WARC.search(data),) if m]
        if (gz := data.find(GZIP_MAGIC)) >= 0:
            hits.append(gz)
        if hits:
            return pos + min(hits)
        if len(data) < chunk:
            return None
        pos += len(data) - overlap


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
        whole = whole_file_gzip(path)
        self.stats.bytes_read += os.path.getsize(path)
        # warcio reads gzip-per-record and plain files itself; a whole-file gzip is read decompressed
        with gzip.open(path, "rb") if whole else open(path, "rb") as fh:
            offset: int | None = 0
            while offset is not None:
                fh.seek(offset)
                if not fh.read(1):
                    return
                fh.seek(offset)
                it = ArchiveIterator(fh, check_digests=False)
                next_start = offset  # where the record being parsed begins
                try:
                    for record in it:
                        self.stats.records += 1
                        doc = self._convert(record, source)
                        if doc is not None:
                            self.stats.documents += 1
                            yield doc
                        it.get_record_offset()  # reads to the end of the record: it.offset is the next start
                        next_start = it.offset
                    return
                except Exception as err:  # noqa: BLE001 — any parse failure is counted, then skipped
                    self.stats.skipped[f"malformed:{type(err).__name__}"] += 1
                    try:
                        offset = _resync(fh, next_start + 1)
                    except (OSError, EOFError, zlib.error):  # damaged whole-file gzip: nothing after it
                        return

    def _convert(self, record, source: str) -> Document | None:
        headers = record.rec_headers
        rtype = record.rec_type
        uri = headers.get_header("WARC-Target-URI") or ""
        rid = headers.get_header("WARC-Record-ID") or f"{source}:{self.stats.records}"
        date = headers.get_header("WARC-Date")
        length = int(headers.get_header("Content-Length") or 0)
        if length > self.max_record_bytes:
            self.stats.skipped["too_large"] += 1
            return None
        if rtype == "conversion":  # WET: already plain text
            body = record.content_stream().read(self.max_record_bytes + 1)
            text = body.decode("utf-8", errors="replace")
            meta = {"url": uri, "date": date, "source": source, "content_type": "text/plain"}
            return Document(text, rid, meta) if text.strip() else self._skip("empty")
        if rtype != "response":
            self.stats.skipped[f"record_type:{rtype}"] += 1
            return None
        http = record.http_headers
        if http is None:
            return self._skip("no_http_headers")
        status = int(http.get_statuscode() or 0)
        if not self.min_status <= status <= self.max_status:
            return self._skip(f"http_status:{status}")
        content_type = http.get_header("Content-Type") or ""
        if not content_type.split(";")[0].strip().lower().startswith(HTML_TYPES):
            return self._skip("not_html")
        body = record.content_stream().read(self.max_record_bytes + 1)
        if len(body) > self.max_record_bytes:
            return self._skip("too_large")
        if not body.strip():
            return self._skip("empty")
        html, charset = decode_html(body, content_type)
        return Document(
            html,
            rid,
            {"url": uri, "date": date, "source": source, "charset": charset, "content_type": "text/html"},
        )

    def _skip(self, reason: str) -> None:
        self.stats.skipped[reason] += 1
        return None


def read_text_file(path: str | Path) -> Iterator[Document]:
    """One document per plain-text file."""
    text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    if text:
        yield Document(text, str(path), {"source": Path(path).name, "content_type": "text/plain"})
