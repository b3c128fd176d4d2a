"""Preparing the sources of a mixture: JSON Lines input, a reused tokenizer, one tokenizer trained on
several datasets, and the lineage index beside the shards."""

from __future__ import annotations

import json
import random

from llmforge.data.shards import ShardSet
from tests.conftest import run_cli

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def jsonl_lines() -> list[str]:
    lines = []
    for i in range(12):
        rng = random.Random(i)  # distinct texts: nothing for deduplication to drop
        text = " ".join(rng.choice(WORDS) for _ in range(80)) + f" document {i}."
        lines.append(json.dumps({"id": f"doc-{i}", "text": text, "url": f"https://example.org/{i}"}))
    lines.insert(3, "{not json")  # malformed
    lines.insert(5, json.dumps(["a", "list"]))  # not an object
    lines.insert(7, json.dumps({"id": "empty", "text": "   "}))  # no text
    lines.insert(9, json.dumps({"body": "wrong field"}))  # no text
    return lines


def test_jsonl_pipeline_reused_tokenizer_and_lineage(tmp_path):
    src = tmp_path / "dump.jsonl"
    src.write_text("\n".join(jsonl_lines()) + "\n")
    common = ["progress=false", "tokenizer.vocab_size=400", "tokenizer.num_sentinels=4", "val_fraction=0.2"]
    first = run_cli(
        "llmforge.prepare",
        "pipeline=jsonl",
        f"input={src}",
        f"output_dir={tmp_path / 'a'}",
        *common,
        cwd=tmp_path,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())["totals"]["reader"]
    assert stats["records"] == 16 and stats["documents"] == 12
    assert stats["skipped"] == {"malformed_json": 1, "not_an_object": 1, "missing_text": 2}
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    docs = manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
    assert docs == 12

    # lineage: one origin per document, in shard order, with the JSON id, URL, file and line
    origins = []
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            lineage = tmp_path / "a" / shard["file"].replace(".bin", ".docs.jsonl")
            lines = lineage.read_text().splitlines()
            assert len(lines) == shard["documents"]
            origins += [json.loads(line) for line in lines]
    by_id = {o["id"]: o for o in origins}
    assert set(by_id) == {f"doc-{i}" for i in range(12)}
    assert by_id["doc-4"]["url"] == "https://example.org/4" and by_id["doc-4"]["file"] == "dump.jsonl"
    assert by_id["doc-4"]["line"] == 7  # two bad lines were inserted before it (file lines 4 and 6)

    # a second dataset (plain text) tokenized with the first one's tokenizer: same sha256 in both manifests
    (tmp_path / "txt").mkdir()
    for i in range(4):
        rng = random.Random(100 + i)
        (tmp_path / "txt" / f"{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(100)))
    second = run_cli(
        "llmforge.prepare",
        "pipeline=text",
        f"input={tmp_path}/txt/*.txt",
        f"output_dir={tmp_path / 'b'}",
        *common,
        f"tokenizer.path={tmp_path / 'a'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    reused = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert reused["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    assert reused["source"]["tokenizer"]["reused"] == str(tmp_path / "a")
    assert (tmp_path / "b/tokenizer.json").read_bytes() == (tmp_path / "a/tokenizer.json").read_bytes()

    bad = run_cli(
        "llmforge.prepare",
        "pipeline=text",
        f"input={tmp_path}/txt/*.txt",
        f"output_dir={tmp_path / 'c'}",
        *common,
        f"tokenizer.path={tmp_path / 'nowhere'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert bad.returncode == 2 and "tokenizer.path=" in bad.stderr

    # one tokenizer trained on both datasets, weighted
    shared = run_cli(
        "llmforge.tokenizer",
        str(tmp_path / "tok"),
        f"{tmp_path / 'a'}=0.7",
        f"{tmp_path / 'b'}=0.3",
        "--vocab-size",
        "380",
        "--num-sentinels",
        "4",
        "--sample-chars",
        "20000",
        cwd=tmp_path,
        timeout=300,
    )
    assert shared.returncode == 0, shared.stderr[-2000:]
    from llmforge.prep.tokenizer import load, special_token_ids

    tok = load(tmp_path / "tok" / "tokenizer.json")
    assert 9 + 256 < tok.get_vocab_size() <= 380 and special_token_ids(tok)["sentinel_3"] == 8
    assert tok.token_to_id("Ġdocument") is not None  # merges learned from the sample (the word of source a)


def test_mixture_sample_takes_each_share_and_decodes_exactly(tiny_mixture):
    from llmforge.prep.tokenizer import mixture_sample

    texts = list(mixture_sample({str(tiny_mixture["web"]): 3.0, str(tiny_mixture["code"]): 1.0}, 40_000))
    from llmforge.prep.tokenizer import load

    tok = load(tiny_mixture["web"] / "tokenizer.json")
    web_docs = ShardSet.open(tiny_mixture["web"]).documents()
    web_texts = {tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in web_docs}
    from_web = [t for t in texts if t in web_texts]
    web_chars = sum(len(t) for t in from_web)
    assert 30_000 <= web_chars < 30_000 + max(len(t) for t in from_web)  # its share, then one doc at most
    assert len(from_web) < len(texts)  # and some from code
