"""Reading JSON Lines dumps (``pipeline=jsonl``): one JSON object per line, the format most text dumps come in
(Wikipedia, books, papers, code).

Each object gives a document: its text from ``reader.text_field`` (default ``text``), its id from
``reader.id_field`` (default ``id``; when absent or null: ``<file>:<line>``), and its URL from a ``url``
field when there is one. The origin (file, line, id, URL) goes into the document's metadata and from
there into the lineage index beside the token shards. Bad lines never stop the reader: a line that is
not valid JSON, not an object, or has no text (missing, not a string, blank) is counted under its reason
(``malformed_json``, ``not_an_object``, ``missing_text``) and skipped. ``.gz`` files are read decompressed.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from llmforge.prep.document import Document

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


def read_jsonl(
    path: str | Path, text_field: str = "text", id_field: str | None = "id", stats: dict | None = None
) -> Iterator[Document]:
    """Documents of one JSON Lines file; ``stats`` (if given) gets records, documents and skipped
    reasons, in the shape `llmforge.prep.readers.ReadStats.as_dict` uses."""
    path = Path(path)
    skipped: Counter = Counter()
    records = documents = 0
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                records += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    skipped["malformed_json"] += 1
                    continue
                if not isinstance(obj, dict):
                    skipped["not_an_object"] += 1
                    continue
                text = obj.get(text_field)
                if not isinstance(text, str) or not text.strip():
                    skipped["missing_text"] += 1
                    continue
                doc_id = obj.get(id_field) if id_field else None
                doc_id = str(doc_id) if doc_id is not None else f"{path.name}:{line_no}"
                meta = {"source": path.name, "line": line_no, "content_type": "text/plain"}
                if isinstance(obj.get("url"), str):
                    meta["url"] = obj["url"]
                documents += 1
                yield Document(text, doc_id, meta)
    finally:
        if stats is not None:
            stats.update(
                {
                    "records": records,
                    "documents": documents,
                    "bytes_read": path.stat().st_size,
                    "skipped": dict(sorted(skipped.items())),
                }
            )
