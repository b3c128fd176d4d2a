"""`python -m llmforge.prepare`: text files -> tokenizer -> shards; reruns skip finished work."""

from __future__ import annotations

import json

from llmforge.data.shards import ShardSet
from llmforge.prep.writers import split_score
from tests.conftest import run_cli

TEXTS = {
    "a.txt": "The quick brown fox jumps over the lazy dog. " * 40,
    "b.txt": "Pack my box with five dozen liquor jugs! " * 40,
    "c.txt": "Portez ce vieux whisky au juge blond qui fume. " * 40,
    "sub/d.txt": "Falsches Üben von Xylophonmusik quält jeden größeren Zwerg. " * 40,
}


def test_prepare_text_files_then_skip_then_rebuild(tmp_path):
    for name, text in TEXTS.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text)
    out = tmp_path / "ds"
    args = [
        "pipeline=text",
        "progress=false",
        f"input={tmp_path}/in/**/*.txt",
        f"output_dir={out}",
        "tokenizer.vocab_size=400",
        "tokenizer.num_sentinels=4",
        "val_fraction=0.0",
    ]
    first = run_cli("llmforge.prepare", *args, cwd=tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 4
    assert manifest["special_tokens"]["mask"] == 4 and manifest["special_tokens"]["sentinel_3"] == 8
    docs = list(ShardSet.open(out, "train", verify=True).documents())
    assert all(int(d[-1]) == manifest["special_tokens"]["eos"] for d in docs)

    markers = {p: p.stat().st_mtime_ns for p in (out / "work").rglob("*.done")}
    again = run_cli("llmforge.prepare", *args, cwd=tmp_path, timeout=120)
    assert again.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "work").rglob("*.done")} == markers
    # a fraction that sends exactly one document to val (document ids are paths, so scores vary per tmp dir)
    scores = sorted(split_score(str(tmp_path / "in" / name), text.strip()) for name, text in TEXTS.items())
    fraction = (scores[0] + scores[1]) / 2
    changed = run_cli("llmforge.prepare", *args[:-1], f"val_fraction={fraction}", cwd=tmp_path, timeout=120)
    assert changed.returncode == 0, changed.stderr
    rebuilt = json.loads((out / "manifest.json").read_text())
    assert rebuilt["config_hash"] != manifest["config_hash"]
    assert rebuilt["splits"]["val"]["documents"] == 1 and rebuilt["splits"]["train"]["documents"] == 3


def test_prepare_reports_missing_input(tmp_path):
    proc = run_cli(
        "llmforge.prepare",
        "pipeline=text",
        f"input={tmp_path}/nothing/*.txt",
        f"output_dir={tmp_path}/ds",
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and "matches no file" in proc.stderr
    assert not (tmp_path / "ds").exists()
