"""Build a small, real crawl from what every machine has: Python's standard library rendered as HTML.

``python -m llmforge.prep.demo_warc OUT_DIR [--files 4] [--modules N]`` renders each importable standard
library module with `pydoc.HTMLDoc` and writes the pages as gzip-per-record WARC files the way crawlers
do (warcinfo, request and response records with HTTP headers). So that the default pipeline exercises every
step, the crawl also holds what real crawls hold: pages in cp1252 and latin-1 declared only in a meta
tag, gzip and chunked transfer encodings, exact copies and lightly edited near-copies of pages under other
URLs (some in other files), tiny navigation pages, 404s, redirects and non-HTML payloads.

Rendering imports modules, so it runs in its own process (the pipeline calls this module as a script).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import os
import random
import re
import sys
import uuid
import warnings
from pathlib import Path

ADDRESS = re.compile(r"(?:(?: |&nbsp;)at(?: |&nbsp;)0x|, handle )[0-9a-f]+")
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "pydoc_data",
    "lib2to3",
    "ensurepip",
    "venv",
    "msilib",
    "winreg",
    "winsound",
    "nt",
    "msvcrt",
    "crypt",
    "nis",
    "ossaudiodev",
    "spwd",
    "test",
    "xxlimited",
    "xxsubtype",
    "distutils",
    "imp",
    "asynchat",
    "asyncore",
    "smtpd",
    "cgi",
    "cgitb",
    "telnetlib",
    "nntplib",
    "pipes",
    "sndhdr",
    "audioop",
    "chunk",
    "imghdr",
    "mailcap",
    "sunau",
    "uu",
    "xdrlib",
    "aifc",
    "readline",
    "curses",
    "dbm",
    "sqlite3",
    "webbrowser",
    "pty",
    "tty",
    "getpass",
    "site",
    "sitecustomize",
}


def stdlib_modules(limit: int | None = None) -> list[str]:
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)
    return names[:limit] if limit else names


def render_pages(limit: int | None = None) -> list[tuple[str, str]]:
    """(module name, HTML page) for each module that imports cleanly."""
    import pydoc

    pages = []
    for name in stdlib_modules(limit):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = __import__(name)
                html = pydoc.HTMLDoc().page(pydoc.describe(module), pydoc.HTMLDoc().document(module, name))
        except Exception:  # noqa: BLE001 — a module that cannot be rendered is simply not in the demo
            continue
        pages.append((name, ADDRESS.sub("", html)))  # object addresses change from run to run
    return pages


def article_pages(limit: int | None = None) -> list[tuple[str, str]]:
    """The standard library's docstrings as article pages with the usual site boilerplate around them."""
    import html as html_lib

    from llmforge.prep.text import stdlib_documents

    pages = []
    for i, (path, text) in enumerate(stdlib_documents()):
        if limit and i >= limit:
            break
        name = path.removesuffix(".py").replace("/", ".")
        blocks = []
        for para in text.split("\n\n"):
            para = html_lib.escape(para.strip())
            if para:
                code = para.startswith((">>>", "    ")) or para.count("(") > 3
                blocks.append(f"<pre>{para}</pre>" if code else f"<p>{para}</p>")
        body = "\n".join(blocks)
        pages.append(
            (
                f"notes/{name}",
                (
                    f"<!DOCTYPE html><html><head><title>{name} notes</title></head><body>"
                    "<header><nav><a href='/'>Home</a> | <a href='/library'>Library</a> | "
                    "<a href='/search'>Search</a>"
                    f"</nav></header><main><article><h1>{name}</h1>\n{body}</article></main>"
                    "<aside><h3>Related</h3><ul><li><a href='/a'>Tutorial</a></li>"
                    "<li><a href='/b'>FAQ</a></li></ul></aside>"
                    "<footer>Copyright Python Software Foundation. <a href='/privacy'>Privacy policy</a>"
                    "</footer></body></html>"
                ),
            )
        )
    return pages


def near_copy(html: str, rng: random.Random, rate: float = 0.02) -> str:
    """The same page with ~rate of its words replaced (a mirror that edited a few words)."""
    words = html.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * rate))):
        if "<" not in words[i] and ">" not in words[i]:
            words[i] = rng.choice(["lorem", "ipsum", "data", "value", "python", "module"])
    return " ".join(words)


def record_id(key: str) -> str:
    """A deterministic WARC-Record-ID, so the demo crawl is byte-identical from build to build."""
    return f"<urn:uuid:{uuid.UUID(bytes=hashlib.sha1(key.encode()).digest()[:16])}>"


def chunked(body: bytes, size: int = 4096) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def write_warcs(out_dir: Path, pages: list[tuple[str, str]], files: int = 4, seed: int = 0) -> list[Path]:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    rng = random.Random(seed)
    records: list[tuple[str, int, list[tuple[str, str]], bytes]] = []  # url, status, headers, body
    base = "https://docs.python.example/3/library/"
    for i, (name, html) in enumerate(pages):
        url = f"{base}{name}.html"
        kind = i % 7
        if kind == 1:  # legacy charset declared only in the page
            body = html.replace("<head>", '<head><meta charset="windows-1252">', 1).encode(
                "cp1252", "replace"
            )
            records.append((url, 200, [("Content-Type", "text/html")], body))
        elif kind == 2:
            records.append(
                (
                    url,
                    200,
                    [("Content-Type", "text/html; charset=ISO-8859-1")],
                    html.encode("latin-1", "replace"),
                )
            )
        elif kind == 3:
            records.append(
                (
                    url,
                    200,
                    [("Content-Type", "text/html; charset=utf-8"), ("Content-Encoding", "gzip")],
                    gzip.compress(html.encode(), mtime=0),
                )
            )
        elif kind == 4:
            records.append(
                (
                    url,
                    200,
                    [("Content-Type", "text/html; charset=utf-8"), ("Transfer-Encoding", "chunked")],
                    chunked(html.encode()),
                )
            )
        else:
            records.append((url, 200, [("Content-Type", "text/html; charset=utf-8")], html.encode()))
        if i % 9 == 0:  # an exact mirror
            records.append(
                (
                    f"https://mirror.example/py/{name}.html",
                    200,
                    [("Content-Type", "text/html; charset=utf-8")],
                    html.encode(),
                )
            )
        if i % 11 == 0:  # a near copy
            records.append(
                (
                    f"https://copy.example/{name}",
                    200,
                    [("Content-Type", "text/html; charset=utf-8")],
                    near_copy(html, rng).encode(),
                )
            )
        if i % 13 == 0:  # boilerplate that the filters should drop
            nav = f"<html><body><nav><a href='/'>Home</a> | <a href='{url}'>{name}</a></nav></body></html>"
            records.append((f"{base}nav/{name}", 200, [("Content-Type", "text/html")], nav.encode()))
            records.append(
                (f"{base}missing/{name}", 404, [("Content-Type", "text/html")], b"<h1>Not found</h1>")
            )
            records.append(
                (f"{base}{name}.png", 200, [("Content-Type", "image/png")], b"\x89PNG\r\n\x1a\n" * 8)
            )
            records.append((f"http://docs.python.example/{name}", 301, [("Location", url)], b""))
    rng.shuffle(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        path = out_dir / f"demo-{f:05d}.warc.gz"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            writer = WARCWriter(fh, gzip=True)
            info = writer.create_warcinfo_record(path.name, {"software": "llmforge demo_warc"})
            info.rec_headers.replace_header("WARC-Record-ID", record_id(f"warcinfo {path.name}"))
            info.rec_headers.replace_header("WARC-Date", "2026-01-01T00:00:00Z")
            writer.write_record(info)
            for url, status, headers, body in records[f::files]:
                date = "2026-01-01T00:00:00Z"
                rid = record_id(f"response {url} {status}")
                req = StatusAndHeaders(
                    f"GET /{url.split('/', 3)[-1]} HTTP/1.1",
                    [("Host", url.split("/")[2]), ("User-Agent", "llmforge-demo")],
                    is_http_request=True,
                )
                writer.write_record(
                    writer.create_warc_record(
                        url,
                        "request",
                        http_headers=req,
                        warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": record_id(f"request {url}")},
                    )
                )
                reason = {200: "OK", 301: "Moved Permanently", 404: "Not Found"}[status]
                http = StatusAndHeaders(
                    f"{status} {reason}", [*headers, ("Content-Length", str(len(body)))], protocol="HTTP/1.1"
                )
                writer.write_record(
                    writer.create_warc_record(
                        url,
                        "response",
                        payload=io.BytesIO(body),
                        http_headers=http,
                        warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": rid},
                    )
                )
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--modules", type=int, default=None, help="at most this many modules (default: all)")
    args = parser.parse_args()
    pages = render_pages(args.modules) + article_pages(args.modules)
    for path in write_warcs(args.out_dir, pages, args.files):
        print(path)


if __name__ == "__main__":
    main()
