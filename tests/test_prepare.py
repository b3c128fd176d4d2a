"""`python -m llmforge.prepare`: text files -> tokenizer -> shards; reruns skip finished work."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys

import pytest

from llmforge.data.shards import ShardSet
from llmforge.prep.pipeline import write_dropped_samples
from llmforge.prep.writers import split_score
from tests.conftest import clean_env, run_cli

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


# Loaded by every Python process of the run (sitecustomize on PYTHONPATH): records each process that imports
# the data stage's pipeline, and the stack of any import of torch or Lightning.
WATCH_IMPORTS = """
import os, sys, traceback
from pathlib import Path

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "lightning", "pytorch_lightning"):
            stack = "".join(traceback.format_stack())
            Path(os.environ["WATCH_DIR"], f"heavy-{os.getpid()}").write_text(name + "\\n" + stack)
        if name == "llmforge.prep.pipeline":
            Path(os.environ["WATCH_DIR"], f"pipeline-{os.getpid()}").touch()
        return None

sys.meta_path.insert(0, Watch())
"""


def test_data_stage_never_imports_torch_or_lightning(tmp_path):
    """Driver, fork server and workers: the data stage starts without torch (~1 s per process saved); a
    no-op rerun starts no worker at all."""
    for name, text in TEXTS.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WATCH_IMPORTS)
    cmd = [
        sys.executable,
        "-m",
        "llmforge.prepare",
        "pipeline=text",
        "progress=false",
        f"input={tmp_path}/in/**/*.txt",
        f"output_dir={tmp_path}/ds",
        "files_per_shard=2",  # two shards ...
        "executor.workers=2",  # ... on two spawned workers per stage
        "tokenizer.vocab_size=400",
        "tokenizer.num_sentinels=4",
    ]
    env = clean_env()
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
    for run, importers in (("first", 2), ("rerun", 1)):
        watch = tmp_path / run
        watch.mkdir()
        driver = subprocess.Popen(cmd, cwd=tmp_path, env=env | {"WATCH_DIR": str(watch)}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, stderr = driver.communicate(timeout=180)
        assert driver.returncode == 0, stderr[-3000:]
        heavy = [p.read_text() for p in watch.glob("heavy-*")]
        assert not heavy, heavy[0]
        # the pipeline is imported by the driver and, on the first run, by the fork server the workers
        # are forked from; the rerun finds every task done and starts neither
        assert len(list(watch.glob("pipeline-*"))) == importers
    tasks = [json.loads(p.read_text()) for p in (tmp_path / "ds" / "logs").glob("*/*.json")]
    # process 2, dedup 4 stages of one task each (exact, buckets, verify, components), tokenizer 1, tokenize 2
    assert len(tasks) == 2 + 4 + 1 + 2
    for stage in ("process", "tokenize"):  # each stage's pool of 2: one worker may finish both tiny tasks
        workers = {t["pid"] for t in tasks if t["stage"] == stage}
        assert 1 <= len(workers) <= 2 and driver.pid not in workers, (stage, workers)
def warc_without_responses(path) -> None:
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        w.write_record(w.create_warcinfo_record(path.name, {"software": "test"}))
        for i in range(3):
            request = w.create_warc_record(f"https://e.org/{i}", "request", payload=io.BytesIO(b"GET /"))
            w.write_record(request)


@pytest.mark.parametrize("kind", ["empty", "random", "no-responses"])
def test_no_surviving_document_stops_with_one_line(tmp_path, kind):
    path = tmp_path / "in.warc.gz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(random.Random(0).randbytes(50_000))
    else:
        warc_without_responses(path)
    out = tmp_path / "ds"
    proc = run_cli("llmforge.prepare", f"input={path}", f"output_dir={out}", "progress=false", cwd=tmp_path)
    expected = {
        "empty": "no document survived: the 1 input(s) held no record to read",
        "random": "no document survived: step 'read' dropped the most (1: malformed:header: 1)",
        "no-responses": "no document survived: step 'read' dropped the most (4: record_type:request: 3, "
        "record_type:warcinfo: 1)",
    }[kind]
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {expected}"], proc.stderr
    assert not (out / "manifest.json").exists() and not (out / "work" / "tokenizer").exists()


def test_dropped_samples_of_reasons_that_no_longer_occur_are_removed(tmp_path):
    work, out = tmp_path / "work", tmp_path / "ds"
    (work / "process").mkdir(parents=True)
    sample = {"id": "x", "url": None, "text": "t"}

    def run(reasons: dict[str, list[str]]) -> set[str]:
        dropped = {step: {r: [sample] for r in rs} for step, rs in reasons.items()}
        (work / "process" / "00000.dropped.json").write_text(json.dumps(dropped))
        write_dropped_samples(work, out, 1, cap=5)
        return {str(p.relative_to(out / "dropped")) for p in (out / "dropped").rglob("*")}

    assert run({"extract": ["no_text"], "language": ["language:de", "language:fr"]}) == {
        "extract",
        "extract/no_text.jsonl",
        "language",
        "language/language_de.jsonl",
        "language/language_fr.jsonl",
    }
    # e.g. language.languages=[en,de]: German pages are kept now, and extraction drops nothing
    assert run({"extract": [], "language": ["language:fr"]}) == {"language", "language/language_fr.jsonl"}
