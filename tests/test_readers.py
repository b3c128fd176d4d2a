"""WARC/WET reading: encodings, compression layouts, charsets, fuzzed input, downloads over loopback."""

from __future__ import annotations

import gzip
import http.server
import io
import random
import re
import struct
import subprocess
import sys
import threading
import zlib
from collections import Counter
from pathlib import Path

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from llmforge.prep.readers import WarcReader, decode_html, download, expand_inputs

PAGE = (
    "<html><head><title>T{i}</title></head>"
    "<body><p>Página número {i}: café, naïve, Œuvre — “quotes”.</p></body></html>"
)


def response(
    writer: WARCWriter, url: str, body: bytes, headers: list[tuple[str, str]], status: str = "200 OK"
):
    http = StatusAndHeaders(status, [*headers, ("Content-Length", str(len(body)))], protocol="HTTP/1.1")
    return writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http)


def make_warc(path: Path, n: int = 5, gzip_records: bool = True, extra=None) -> list[str]:
    texts = [PAGE.format(i=i) for i in range(n)]
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=gzip_records)
        w.write_record(w.create_warcinfo_record(path.name, {"software": "test"}))
        for i, text in enumerate(texts):
            w.write_record(
                response(
                    w,
                    f"https://example.org/{i}",
                    text.encode(),
                    [("Content-Type", "text/html; charset=utf-8")],
                )
            )
        for rec in extra(w) if extra else []:
            w.write_record(rec)
    return texts


def read_all(path: Path, **kw) -> tuple[list, WarcReader]:
    reader = WarcReader(**kw)
    return list(reader.read(path)), reader


@pytest.mark.parametrize("layout", ["gzip-per-record", "uncompressed", "whole-file-gzip"])
def test_layouts_give_the_same_documents(tmp_path, layout):
    path = tmp_path / "a.warc"
    texts = make_warc(path, gzip_records=layout == "gzip-per-record")
    if layout == "whole-file-gzip":
        data = path.read_bytes()
        path = tmp_path / "a.warc.gz"
        path.write_bytes(gzip.compress(data))
    docs, reader = read_all(path)
    assert [d.text for d in docs] == texts
    assert reader.stats.documents == 5 and reader.stats.records == 6
    assert docs[0].metadata["url"] == "https://example.org/0" and docs[0].id.startswith("<urn:uuid:")


def test_charsets_header_meta_and_detection(tmp_path):
    text = "<html><body><p>Déjà vu — Ça coûte 5 €, naïve façade.</p></body></html>"
    meta = text.replace("<html>", '<html><head><meta charset="windows-1252"></head>')

    def extra(w):
        return [
            response(
                w,
                "https://e.org/latin1",
                text.encode("latin-1", "replace"),
                [("Content-Type", "text/html; charset=ISO-8859-1")],
            ),
            response(w, "https://e.org/meta", meta.encode("cp1252"), [("Content-Type", "text/html")]),
            # header lies (utf-8) but the body is cp1252: detection takes over
            response(
                w, "https://e.org/liar", text.encode("cp1252"), [("Content-Type", "text/html; charset=utf-8")]
            ),
            response(
                w,
                "https://e.org/gz",
                gzip.compress(text.encode()),
                [("Content-Type", "text/html; charset=utf-8"), ("Content-Encoding", "gzip")],
            ),
            response(
                w,
                "https://e.org/bogus",
                text.encode(),
                [("Content-Type", "text/html; charset=no-such-charset")],
            ),
        ]

    make_warc(tmp_path / "c.warc.gz", n=0, extra=extra)
    docs, reader = read_all(tmp_path / "c.warc.gz")
    by_url = {d.metadata["url"].rsplit("/", 1)[1]: d for d in docs}
    assert set(by_url) == {"latin1", "meta", "liar", "gz", "bogus"}
    for name in ("meta", "liar", "gz", "bogus"):
        assert "Déjà vu" in by_url[name].text and "€" in by_url[name].text, name
    assert "Déjà vu" in by_url["latin1"].text
    assert by_url["meta"].metadata["charset"] == "cp1252"


def test_non_html_statuses_and_sizes_are_counted(tmp_path):
    def extra(w):
        return [
            response(w, "https://e.org/img", b"\x89PNG" * 10, [("Content-Type", "image/png")]),
            response(
                w, "https://e.org/404", b"<h1>nope</h1>", [("Content-Type", "text/html")], "404 Not Found"
            ),
            response(w, "https://e.org/big", b"<p>" + b"x" * 5000 + b"</p>", [("Content-Type", "text/html")]),
            response(w, "https://e.org/empty", b"   ", [("Content-Type", "text/html")]),
        ]

    make_warc(tmp_path / "s.warc.gz", n=2, extra=extra)
    docs, reader = read_all(tmp_path / "s.warc.gz", max_record_bytes=4096)
    assert len(docs) == 2
    assert reader.stats.skipped == {
        "not_html": 1,
        "http_status:404": 1,
        "too_large": 1,
        "empty": 1,
        "record_type:warcinfo": 1,
    }


def test_wet_conversion_records(tmp_path):
    path = tmp_path / "x.warc.wet.gz"
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        for i in range(3):
            w.write_record(
                w.create_warc_record(
                    f"https://e.org/{i}",
                    "conversion",
                    payload=io.BytesIO(f"plain text {i}".encode()),
                    warc_content_type="text/plain",
                )
            )
    docs, _ = read_all(path)
    assert [d.text for d in docs] == ["plain text 0", "plain text 1", "plain text 2"]


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_file_keeps_what_came_before(tmp_path, gz):
    path = tmp_path / "t.warc"
    texts = make_warc(path, n=6, gzip_records=gz)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    docs, reader = read_all(path)
    assert 2 <= len(docs) < 6
    assert [d.text for d in docs] == texts[: len(docs)]


def test_corrupt_record_header_is_skipped_and_reading_resumes(tmp_path):
    path = tmp_path / "h.warc"
    texts = make_warc(path, n=6, gzip_records=False)
    data = path.read_bytes()
    # break the third response's header block: its WARC/1.x line
    starts = [i for i in range(len(data)) if data.startswith(b"WARC/1.", i)]
    third = starts[3]
    path.write_bytes(data[:third] + b"GARBAGE!" + data[third + 8 :])
    docs, reader = read_all(path)
    got = [d.text for d in docs]
    assert texts[2] not in got and set(got) == set(texts) - {texts[2]}
    assert sum(v for k, v in reader.stats.skipped.items() if k.startswith("malformed")) >= 1


def test_wrong_content_length_is_not_fatal(tmp_path):
    path = tmp_path / "l.warc"
    texts = make_warc(path, n=4, gzip_records=False)
    data = path.read_bytes()
    marker = f"Content-Length: {len(texts[1].encode()) + 0}".encode()
    idx = data.find(b"WARC-Target-URI: https://example.org/1")
    cl = data.find(b"Content-Length: ", idx)
    end = data.find(b"\r\n", cl)
    old = int(data[cl + 16 : end])
    path.write_bytes(data[:cl] + f"Content-Length: {old - 40}".encode() + data[end:])
    assert marker  # the record exists
    docs, reader = read_all(path)
    got = [d.text for d in docs]
    assert texts[0] in got and texts[3] in got


def test_random_bytes_file(tmp_path):
    path = tmp_path / "r.warc.gz"
    path.write_bytes(random.Random(1).randbytes(100_000))
    docs, reader = read_all(path)
    assert docs == [] and reader.stats.bytes_read == 100_000


def test_decode_html_prefers_header_then_meta():
    body = '<meta charset="iso-8859-1"><p>é</p>'.encode("latin-1")
    assert decode_html(body, "text/html")[1] == "iso8859-1"
    assert decode_html("é".encode(), "text/html; charset=UTF-8") == ("é", "utf-8")


# -- downloads over loopback ----------------------------------------------------------------------


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support; the first full request for *.flaky is cut off half way. A range
    past the end is a 416 with the file's length (``Content-Range: bytes */N``), without it for *.nolength."""

    cut_once: set[str] = set()

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                if path.suffix != ".nolength":
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path.suffix == ".flaky" and self.path not in self.cut_once:
            self.cut_once.add(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    handler = lambda *a, **k: RangeHandler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_resumes_a_cut_transfer(server, tmp_path):
    root, base = server
    payload = random.Random(0).randbytes(300_000)
    (root / "big.flaky").write_bytes(payload)
    out = download(f"{base}/big.flaky", tmp_path / "dl" / "big", retries=3, backoff=0.01)
    assert out.read_bytes() == payload
    assert not (tmp_path / "dl" / "big.part").exists()


@pytest.mark.parametrize("name", ["file.warc.gz", "file.nolength"])  # the length from the 416, or a HEAD
def test_http_416_is_complete_only_when_the_sizes_match(server, tmp_path, name):
    root, base = server
    payload = random.Random(1).randbytes(50_000)
    (root / name).write_bytes(payload)
    dest = tmp_path / "dl" / name
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir()
    part.write_bytes(payload)  # a transfer that finished before the rename: the server answers 416
    assert download(f"{base}/{name}", dest, retries=2, backoff=0.01).read_bytes() == payload
    dest.unlink()
    part.write_bytes(payload + b"left over from another file")  # longer than the server's: 416 again
    assert download(f"{base}/{name}", dest, retries=2, backoff=0.01).read_bytes() == payload
    assert not part.exists()


def test_download_gives_up_on_404(server, tmp_path):
    _, base = server
    with pytest.raises(Exception, match="404"):
        download(f"{base}/missing.warc.gz", tmp_path / "x", retries=1, backoff=0.01)


def test_paths_listing_expands_to_urls_and_downloads(server, tmp_path):
    root, base = server
    (root / "crawl" / "segments").mkdir(parents=True)
    make_warc(root / "crawl" / "segments" / "a.warc.gz", n=2)
    make_warc(root / "crawl" / "segments" / "b.warc.gz", n=3)
    listing = root / "warc.paths.gz"
    listing.write_bytes(gzip.compress(b"crawl/segments/a.warc.gz\ncrawl/segments/b.warc.gz\n"))
    urls = expand_inputs(f"{base}/warc.paths.gz", base_url=base, cache_dir=tmp_path / "cache")
    assert urls == [f"{base}/crawl/segments/a.warc.gz", f"{base}/crawl/segments/b.warc.gz"]
    total = sum(len(read_all(download(u, tmp_path / "cache" / Path(u).name))[0]) for u in urls)
    assert total == 5


# -- hostile input: damaged gzip members, bombs, partial records ------------------------------------


def make_responses(path: Path, n: int, gzip_records: bool = True) -> list[str]:
    """n HTML response records (no warcinfo), so record k is gzip member k."""
    texts = [PAGE.format(i=i) for i in range(n)]
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=gzip_records)
        for i, text in enumerate(texts):
            w.write_record(response(w, f"https://e.org/{i}", text.encode(), [("Content-Type", "text/html")]))
    return texts


def member_offsets(data: bytes) -> list[int]:
    """Start offsets of the gzip members of data, and its length."""
    offsets, pos = [], 0
    while pos < len(data):
        d = zlib.decompressobj(31)
        d.decompress(data[pos:])
        offsets.append(pos)
        pos = len(data) - len(d.unused_data)
    return [*offsets, len(data)]


@pytest.mark.parametrize("k", [0, 41, 99])
def test_flipped_byte_in_one_member_loses_that_record_only(tmp_path, k):
    path = tmp_path / "m.warc.gz"
    texts = make_responses(path, 100)
    data = bytearray(path.read_bytes())
    offsets = member_offsets(bytes(data))
    data[(offsets[k] + offsets[k + 1]) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    docs, reader = read_all(path)
    assert [d.text for d in docs] == texts[:k] + texts[k + 1 :]
    assert reader.stats.skipped == {"malformed:gzip": 1}
    assert reader.stats.records == 100 and 0 < reader.stats.bytes_skipped <= offsets[k + 1] - offsets[k]


@pytest.mark.parametrize("gz", [True, False])
def test_file_cut_inside_a_record_counts_it_and_keeps_no_part_of_it(tmp_path, gz):
    path = tmp_path / "t.warc"
    texts = make_responses(path, 10, gzip_records=gz)
    data = path.read_bytes()
    starts = member_offsets(data) if gz else [m.start() for m in re.finditer(rb"WARC/1\.0\r\n", data)]
    path.write_bytes(data[: (starts[6] + starts[7]) // 2])  # the middle of record 6
    docs, reader = read_all(path)
    assert [d.text for d in docs] == texts[:6]
    assert reader.stats.skipped == {"malformed:truncated": 1}


def zeros_member(head: bytes, megabytes: int) -> bytes:
    """A gzip member of head + `megabytes` MiB of zeros, built in ~1 s (a sync-flushed segment repeats)."""
    mib = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head + mib) + c.flush(zlib.Z_SYNC_FLUSH)
    segment = c.compress(mib) + c.flush(zlib.Z_SYNC_FLUSH)
    assert c.compress(mib) + c.flush(zlib.Z_SYNC_FLUSH) == segment  # same state, same bytes
    last = c.compress(mib) + c.flush()
    crc = zlib.crc32(head + mib)
    for _ in range(megabytes - 1):
        crc = zlib.crc32(mib, crc)
    size = (len(head) + (megabytes << 20)) & 0xFFFFFFFF
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + first + segment * (megabytes - 3) + last + struct.pack("<II", crc, size)


# peak RSS from VmHWM: getrusage's ru_maxrss of an exec'd child starts at its parent's peak (pytest's)
BOMB_READER = """
import re, sys
from pathlib import Path
from llmforge.prep.readers import WarcReader
reader = WarcReader(max_record_bytes=10 << 20)
texts = [d.text for d in reader.read(sys.argv[1])]
peak_kib = re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)
print(len(texts), dict(reader.stats.skipped), int(peak_kib) // 1024)
"""


@pytest.mark.parametrize("where", ["warc-member", "content-encoding"])
def test_decompression_bomb_is_counted_in_bounded_memory(tmp_path, where):
    """A record inflating to 1 GiB while its headers claim a small size: too_large, peak RSS < 300 MB."""
    path = tmp_path / "bomb.warc.gz"
    make_responses(path, 3)
    data = path.read_bytes()
    if where == "warc-member":  # WARC Content-Length 200, and the body goes on for 1 GiB
        http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n"
        head = b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: 200\r\n\r\n" + http + b"<p>"
        bomb = zeros_member(head, 1024)
    else:  # an honest WARC record whose HTTP body is gzip inflating to 1 GiB
        body = zeros_member(b"<html>", 1024)
        http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Encoding: gzip\r\n\r\n" + body
        head = b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: %d\r\n\r\n" % len(http)
        bomb = gzip.compress(head + http + b"\r\n\r\n", compresslevel=1)
    cut = member_offsets(data)[1]
    path.write_bytes(data[:cut] + bomb + data[cut:])
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_READER, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    docs, skipped, peak_mib = proc.stdout.split(maxsplit=1)[0], *proc.stdout.rsplit(maxsplit=1)
    assert docs == "3" and "'too_large': 1}" in skipped, proc.stdout
    assert int(peak_mib) < 300, proc.stdout


def test_corrupt_or_cut_content_encoding_is_dropped_and_counted(tmp_path):
    rng = random.Random(7)
    html = PAGE.format(i=" ".join(str(rng.random()) for _ in range(300))).encode()
    assert len(gzip.compress(html)) > 1000
    flipped = bytearray(gzip.compress(html))
    flipped[len(flipped) // 2] ^= 0xFF

    def extra(w):
        def page(name, body, headers):
            return response(w, f"https://e.org/{name}", body, [("Content-Type", "text/html"), *headers])

        return [
            page("flipped", bytes(flipped), [("Content-Encoding", "gzip")]),
            page("cut", gzip.compress(html)[:200], [("Content-Encoding", "gzip")]),
            page("chunked-bad", b"zz\r\n" + html, [("Transfer-Encoding", "chunked")]),
            page("chunked", b"%x\r\n%s\r\n0\r\n\r\n" % (len(html), html), [("Transfer-Encoding", "chunked")]),
            page("deflate", zlib.compress(html), [("Content-Encoding", "deflate")]),
        ]

    make_warc(tmp_path / "e.warc.gz", n=1, extra=extra)
    docs, reader = read_all(tmp_path / "e.warc.gz")
    assert [d.metadata["url"].rsplit("/", 1)[1] for d in docs] == ["0", "chunked", "deflate"]
    assert docs[1].text == docs[2].text == html.decode()
    assert reader.stats.skipped == {"malformed:decode": 3, "record_type:warcinfo": 1}


def test_a_non_warc_file_or_header_is_malformed_not_a_record_type(tmp_path):
    path = tmp_path / "notes.warc"
    path.write_bytes(b"just some text\nthat is not a crawl\n" * 100)
    docs, reader = read_all(path)
    assert docs == [] and reader.stats.skipped == {"malformed:header": 1}
    assert reader.stats.bytes_skipped == path.stat().st_size
    texts = make_responses(path, 3, gzip_records=False)
    data = path.read_bytes()
    second = data.find(b"WARC/1.0", 1)
    header_end = data.find(b"\r\n\r\n", second)
    # the second record's header loses its Content-Length and gets a line of noise
    damaged = data[second:header_end].replace(b"Content-Length", b"Cxntent-Length") + b"\r\n\x00\xff"
    path.write_bytes(data[:second] + damaged + data[header_end:])
    docs, reader = read_all(path)
    assert [d.text for d in docs] == [texts[0], texts[2]]
    assert reader.stats.skipped == {"malformed:header": 1}


def mutate(rng: random.Random, record: bytes, gz: bool) -> tuple[bytes, bool, str]:
    """Damage one record (or its gzip member): (new bytes, whether the record is lost, the reason counted)."""
    rec = bytearray(record)
    op = rng.choice(["flip", "delete", "insert", "garbage"] if gz else ["header", "length", "garbage"])
    if op == "garbage":  # bytes after the record that are no record (or no gzip member): nothing lost
        return (
            record + b"X" + rng.randbytes(rng.randint(1, 60)),
            False,
            "malformed:gzip" if gz else ("malformed:header"),
        )
    if op == "flip":  # anywhere in the deflate data or the checksum
        rec[rng.randrange(10, len(rec))] ^= rng.randint(1, 255)
    elif op == "delete":
        p = rng.randrange(10, len(rec) - 1)
        del rec[p : p + rng.randint(1, 50)]
    elif op == "insert":
        p = rng.randrange(10, len(rec) - 1)
        rec[p:p] = rng.randbytes(rng.randint(1, 50))
    elif op == "header":
        rec[rng.randrange(0, 7)] ^= rng.randint(1, 255)  # the WARC/1.0 line
    else:  # a Content-Length that lies by up to 30 bytes either way
        m = re.search(rb"Content-Length: (\d+)", rec)
        assert m is not None
        wrong = int(m.group(1)) + rng.choice([-1, 1]) * rng.randint(1, 30)
        rec[m.start(1) : m.end(1)] = str(wrong).encode()
    reason = {"flip": "gzip", "delete": "gzip", "insert": "gzip", "header": "header", "length": "length"}[op]
    return bytes(rec), True, f"malformed:{reason}"


@pytest.mark.parametrize("seed", range(12))
def test_fuzzed_file_every_record_read_or_counted(tmp_path, seed):
    """Damage 6 of 40 records (flips, cuts, insertions, wrong lengths, garbage) and cut the file in its
    last record: exactly the undamaged records come out, whole, and every damage is counted once."""
    rng = random.Random(seed)
    gz = seed % 2 == 0
    path = tmp_path / "f.warc"
    texts = make_responses(path, 40, gzip_records=gz)
    data = path.read_bytes()
    starts = member_offsets(data) if gz else [m.start() for m in re.finditer(rb"WARC/1\.0\r\n", data)]
    starts = sorted({*starts, len(data)})
    victims = set(rng.sample(range(0, 38, 2), 6))  # never two neighbours, never the last record
    out, lost, reasons = bytearray(), set(), Counter()
    for k in range(40):
        record = data[starts[k] : starts[k + 1]]
        if k in victims:
            record, was_lost, reason = mutate(rng, record, gz)
            reasons[reason] += 1
            lost |= {k} if was_lost else set()
        if k == 39:  # the file ends in the middle of its last record
            record = record[: rng.randrange(20, len(record) - 10)]
            reasons["malformed:truncated"] += 1
            lost.add(k)
        out += record
    path.write_bytes(bytes(out))
    docs, reader = read_all(path)
    assert [d.text for d in docs] == [t for k, t in enumerate(texts) if k not in lost]
    assert reader.stats.skipped == reasons
    assert reader.stats.records == reader.stats.documents + sum(reasons.values())


@pytest.mark.parametrize("seed", range(6))
def test_random_damage_never_crashes_and_everything_is_accounted(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "f.warc"
    make_warc(path, n=8, gzip_records=seed % 2 == 0)
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 30)):
        op = rng.random()
        pos = rng.randrange(len(data))
        if op < 0.5:
            data[pos] = rng.randrange(256)
        elif op < 0.8:
            del data[pos : pos + rng.randint(1, 200)]
        else:
            data[pos:pos] = rng.randbytes(rng.randint(1, 200))
    path.write_bytes(bytes(data))
    docs, reader = read_all(path)
    assert len(docs) == reader.stats.documents <= 8
    assert reader.stats.records == reader.stats.documents + sum(reader.stats.skipped.values())
    assert "record_type:None" not in reader.stats.skipped
