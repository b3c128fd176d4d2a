"""The data stage end to end: a real (small) crawl through every step, resumability and determinism."""

from __future__ import annotations

import functools
import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmforge.data.shards import ShardSet
from tests.conftest import OUTPUTS, clean_env, demo_crawl, run_cli


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> Path:
    """A 4-file demo crawl of 24 stdlib modules (pydoc pages and docstring articles, with duplicates)."""
    return demo_crawl(tmp_path_factory, 24)


def prepare_args(crawl: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"input={crawl}/*.warc.gz",
        f"output_dir={out}",
        "tokenizer.vocab_size=600",
        "tokenizer.num_sentinels=8",
        "progress=false",
        "filters.language.enabled=false",
        *extra,
    ]


def outputs(out: Path) -> dict[str, bytes]:
    files = sorted(p for pattern in OUTPUTS for p in out.glob(pattern))
    return {p.name: p.read_bytes() for p in files}


def test_pipeline_end_to_end(crawl, tmp_path):
    out = tmp_path / "ds"
    proc = run_cli("llmforge.prepare", *prepare_args(crawl, out), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    funnel = manifest["source"]["funnel"]
    assert set(funnel) == {"extract", "clean", "word_count", "alnum", "gopher_quality", "repetition"}
    assert funnel["extract"]["dropped"].get("no_text", 0) > 0  # the navigation stubs
    assert (
        manifest["source"]["dedup"]["exact_dropped"] > 0 and manifest["source"]["dedup"]["near_dropped"] > 0
    )
    assert manifest["source"]["reader"]["skipped"]["not_html"] > 0
    train = ShardSet.open(out, "train", verify=True)
    assert train.num_tokens > 10_000 and train.num_documents == manifest["splits"]["train"]["documents"]
    report = (out / "report.md").read_text()
    assert "| dedup |" in report and "too_few_words" in report
    samples = list((out / "dropped").rglob("*.jsonl"))
    assert samples and all(len(p.read_text().splitlines()) <= 50 for p in samples)
    for reason in ("exact_dropped", "near_dropped"):  # the dedup audit trail's sample, with survivors
        removed = [json.loads(line) for line in (out / "dropped" / "dedup" / f"{reason}.jsonl").open()]
        assert removed and all(r["survivor_id"] != r["id"] and r["text"] for r in removed)
        assert all(r["jaccard"] == 1.0 for r in removed) if reason[0] == "e" else removed[0]["jaccard"] > 0.5
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["shards"]) == 4 and all("docs_per_s" in s for s in stats["shards"][0]["steps"])

    before = outputs(out)
    markers = {p: p.stat().st_mtime_ns for p in (out / "work").rglob("*.done")}
    again = run_cli("llmforge.prepare", *prepare_args(crawl, out), cwd=tmp_path, timeout=300)
    assert again.returncode == 0
    assert outputs(out) == before
    assert {p: p.stat().st_mtime_ns for p in (out / "work").rglob("*.done")} == markers  # nothing redone


def test_one_and_two_workers_give_identical_bytes(crawl, tmp_path):
    from llmforge.prep.dedup import find_duplicates, load_signatures

    results = []
    for workers, tasks in ((1, 1), (2, 3)):  # dedup as one task in-process, and as 3 tasks per stage
        out = tmp_path / f"w{workers}"
        proc = run_cli(
            "llmforge.prepare",
            *prepare_args(crawl, out, f"executor.workers={workers}", f"dedup.tasks={tasks}"),
            cwd=tmp_path,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(outputs(out) | {"drop.npy": (out / "work" / "dedup" / "drop.npy").read_bytes()})
    assert results[0] == results[1] and len(results[0]) >= 7
    # the tasks' drop list is byte for byte the single-process find_duplicates' over the same signatures
    work = tmp_path / "w2" / "work"
    stats = json.loads((work / "dedup" / "stats.json").read_text())
    reference = find_duplicates(
        *load_signatures(sorted((work / "process").glob("*.sig.npz"))),
        threshold=stats["threshold"],
        bands=stats["bands"],
        rows=stats["rows"],
    )
    assert reference.near_dropped > 0 and reference.exact_dropped > 0
    assert reference.drop.tobytes() == results[1]["drop.npy"][-reference.drop.nbytes :]
    assert stats["tasks"] == 3


def test_changed_config_redoes_only_what_changed(crawl, tmp_path):
    out = tmp_path / "ds"
    assert run_cli("llmforge.prepare", *prepare_args(crawl, out), cwd=tmp_path, timeout=300).returncode == 0
    work = out / "work"
    done = {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*.done")}
    # the tokenizer's vocabulary changes: reading, filtering and dedup stay, tokenizer and tokenize redo
    proc = run_cli(
        "llmforge.prepare", *prepare_args(crawl, out, "tokenizer.vocab_size=700"), cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*.done")}
    redone = {name for name in done if after[name] != done[name]}
    assert redone == {"tokenizer/tokenizer.done", *(f"tokenize/{i:05d}.done" for i in range(4))}
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == 700
    # how dedup is split (tasks, memory) changes nothing; exact duplicates only (near=false) redoes dedup on
    # (was an OverflowError: math.ceil of an infinite verify threshold)
    before = json.loads((work / "dedup" / "stats.json").read_text())
    split = prepare_args(crawl, out, "tokenizer.vocab_size=700", "dedup.tasks=2", "dedup.memory_gb=0.5")
    assert run_cli("llmforge.prepare", *split, cwd=tmp_path, timeout=300).returncode == 0
    assert {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*.done")} == after
    exact_only = prepare_args(crawl, out, "tokenizer.vocab_size=700", "dedup.near=false")
    proc = run_cli("llmforge.prepare", *exact_only, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*.done")}
    assert all(final[f"process/{i:05d}.done"] == done[f"process/{i:05d}.done"] for i in range(4))
    assert final["dedup/dedup.done"] != after["dedup/dedup.done"]
    stats = json.loads((work / "dedup" / "stats.json").read_text())
    assert stats["near_dropped"] == 0 < before["near_dropped"]
    assert stats["exact_dropped"] == before["exact_dropped"] > 0


@pytest.mark.slow
def test_sigkill_at_any_point_then_rerun_gives_identical_bytes(crawl, tmp_path):
    reference = tmp_path / "ref"
    assert (
        run_cli("llmforge.prepare", *prepare_args(crawl, reference), cwd=tmp_path, timeout=300).returncode
        == 0
    )
    expected = outputs(reference)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llmforge.prepare", *prepare_args(crawl, out, "executor.workers=2")]
    rng = random.Random(7)
    for delay in sorted(rng.uniform(0.5, 9.0) for _ in range(4)):
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-write wherever they are
        proc.wait()
    final = run_cli(
        "llmforge.prepare", *prepare_args(crawl, out, "executor.workers=2"), cwd=tmp_path, timeout=300
    )
    assert final.returncode == 0, final.stderr[-3000:]
    assert outputs(out) == expected


@pytest.fixture
def served(crawl):
    """The crawl over loopback HTTP; yields the base URL and the list of paths requested."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            requests.append(self.path)

    handler = functools.partial(Handler, directory=str(crawl))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_downloads_are_deleted_once_their_shard_is_processed(crawl, served, tmp_path, keep):
    base, requests = served
    name = sorted(crawl.glob("*.warc.gz"))[0].name
    out = tmp_path / "ds"
    args = [f"input='{base}/{name}'", *prepare_args(crawl, out)[1:], f"keep_downloads={keep}"]
    proc = run_cli("llmforge.prepare", *args, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["documents"] > 0
    assert requests == [f"/{name}"]
    kept = [p.name for p in (out / "work" / "downloads").iterdir()]
    assert kept == ([f"00000-{name}"] if keep else [])
    again = run_cli("llmforge.prepare", *args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and requests == [f"/{name}"]  # the shard is done: not fetched again


def test_funnel_report_shows_step_counters():
    from llmforge.prep.pipeline import funnel_report

    c4 = {
        "name": "c4",
        "docs_in": 4,
        "docs_out": 3,
        "chars_in": 400,
        "chars_out": 200,
        "seconds": 0.1,
        "dropped": {"c4_too_few_sentences": 1},
        "counters": {"lines_in": 20, "javascript": 2},
    }
    shard = {"reader": {"records": 5, "documents": 4}, "steps": [c4], "kept": 3}
    tok = {
        "train": {"tokens": 10, "documents": 3},
        "val": {"tokens": 0, "documents": 0},
        "seconds": 0.1,
        "documents_in": 3,
    }
    totals, report = funnel_report([shard, shard], {"docs_in": 6, "docs_out": 6}, [tok])
    assert totals["steps"]["c4"]["counters"] == {"javascript": 4, "lines_in": 40}
    assert "c4 counts: lines_in: 40, javascript: 4" in report
