"""Dedup as bounded-memory tasks: the same drop list as the single-process `find_duplicates`, for any number
of tasks, with runs spilled to disk; resumable; the external sort on its own."""

from __future__ import annotations

import numpy as np
import pytest

from llmforge.prep.dedup import find_duplicates, load_signatures, write_signatures
from llmforge.prep.dedup_tasks import SortedRecords, make_plan, run_dedup
from llmforge.prep.executor import LocalExecutor

CONFIG = {"num_perm": 64, "ngram": 5, "seed": 1, "scheme": "affine32"}


def synthetic_shards(tmp_path, n_docs: int = 3000, seed: int = 0) -> list:
    """Random signatures with planted families: near copies (most values shared), far edits (few shared),
    a templated family larger than the bucket window, and exact duplicates (equal exact hash, and equal
    signature), spread over 4 shards of unequal size."""
    rng = np.random.default_rng(seed)
    sig = rng.integers(0, 2**32, size=(n_docs, CONFIG["num_perm"]), dtype=np.uint32)
    exact = rng.integers(0, 2**64, size=n_docs, dtype=np.uint64)
    for _ in range(n_docs // 15):  # near families of 2-5, sharing 75-100% of values with the first
        members = rng.choice(n_docs, size=int(rng.integers(2, 6)), replace=False)
        for m in members[1:]:
            share = rng.random(CONFIG["num_perm"]) < rng.uniform(0.7, 1.0)
            sig[m, share] = sig[members[0], share]
    template = rng.choice(n_docs, size=150, replace=False)  # one huge bucket: the window rule matters
    for m in template[1:]:
        share = rng.random(CONFIG["num_perm"]) < 0.93
        sig[m, share] = sig[template[0], share]
    for _ in range(n_docs // 20):  # exact duplicates, some of them members of near families
        a, b = rng.choice(n_docs, size=2, replace=False)
        exact[b], sig[b] = exact[a], sig[a]
    bounds = [0, 400, 1700, 1701, n_docs]
    paths = []
    for s in range(4):
        lo, hi = bounds[s], bounds[s + 1]
        path = tmp_path / "sig" / f"{s:05d}.sig.npz"
        write_signatures(path, np.arange(hi - lo), exact[lo:hi], sig[lo:hi], CONFIG)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def reference(shards):
    keys, exact, sigs = load_signatures(shards)
    return find_duplicates(keys, exact, sigs, threshold=0.8, bands=8, rows=8)


@pytest.mark.parametrize("tasks", [1, 2, 3, 11])  # 11 tasks > 8 bands: each band split in 2 key ranges
def test_tasks_give_the_same_drop_list_as_find_duplicates(tmp_path, shards, reference, tasks):
    # a tiny memory budget: every sort spills sorted runs and merges them
    plan = make_plan(tmp_path / "dedup", shards, threshold=0.8, bands=8, rows=8, tasks=tasks, memory_gb=1e-6)
    result, task_stats = run_dedup(plan, LocalExecutor(1, progress=False))
    assert reference.exact_dropped > 20 and reference.near_dropped > 200 and reference.clusters > 50
    assert result.drop.tobytes() == reference.drop.tobytes()
    assert result.kept_for.tobytes() == reference.kept_for.tobytes()
    assert result.exact.tobytes() == reference.exact.tobytes()
    assert result.stats() == reference.stats()
    assert any(s.get("spilled_bytes", 0) > 0 for s in task_stats)
    assert not list((tmp_path / "dedup").rglob("runs*"))  # spilled runs are removed
    with np.load(tmp_path / "dedup" / "removed.npz") as z:  # the audit trail
        assert z["drop"].tobytes() == reference.drop.tobytes()
        near = ~z["exact"]
        assert np.all(z["jaccard"][near] > 0.5) and np.all(z["jaccard"][near] <= 1.0)
        assert np.all(z["jaccard"][z["exact"] & (z["kept_for"] == reference.kept_for)] > 0)


def test_rerun_skips_finished_tasks_and_redoes_a_lost_one(tmp_path, shards, reference):
    plan = make_plan(tmp_path / "dedup", shards, bands=8, rows=8, tasks=2, memory_gb=1e-6)
    run_dedup(plan, LocalExecutor(1, progress=False))
    work = tmp_path / "dedup"
    markers = {p: p.stat().st_mtime_ns for p in work.rglob("*.done")}
    (work / "verified" / "00001.done").unlink()  # as if that task had died before its marker
    (work / "components.done").unlink()
    result, _ = run_dedup(plan, LocalExecutor(1, progress=False))
    assert result.drop.tobytes() == reference.drop.tobytes()
    after = {p: p.stat().st_mtime_ns for p in work.rglob("*.done")}
    redone = {p.relative_to(work).as_posix() for p in after if after[p] != markers.get(p)}
    assert redone == {"verified/00001.done", "components.done"}


def test_two_worker_processes(tmp_path, shards, reference):
    plan = make_plan(tmp_path / "dedup", shards, bands=8, rows=8, tasks=3, memory_gb=1e-6)
    result, _ = run_dedup(plan, LocalExecutor(2, progress=False))
    assert result.drop.tobytes() == reference.drop.tobytes()


def test_sorted_records_chunks_are_sorted_and_hold_whole_groups(tmp_path):
    rng = np.random.default_rng(3)
    records = SortedRecords(tmp_path / "runs", budget=1)  # capacity: the 1024-record minimum
    hashes = rng.integers(0, 300, size=10_000).astype(np.uint64)  # groups of ~33, across every run
    hashes[5000:7000] = 7  # one group larger than a run
    for lo in range(0, 10_000, 700):
        records.add(hashes[lo : lo + 700], np.arange(lo, min(lo + 700, 10_000)))
    assert records.runs == 7  # 1400 records a run (two adds), the last 200 still in memory
    chunks = list(records.chunks())
    h = np.concatenate([c[0] for c in chunks])
    k = np.concatenate([c[1] for c in chunks])
    order = np.lexsort((np.arange(10_000), hashes))
    np.testing.assert_array_equal(k, order)
    np.testing.assert_array_equal(h, hashes[order])
    seen = [set(c[0].tolist()) for c in chunks]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])  # no group split
    assert len(chunks) > 5 and not (tmp_path / "runs").exists()


def test_verify_in_several_passes_gives_the_same_file(tmp_path, shards, reference):
    """A partition larger than the memory budget is verified in passes (sub-partitions): same bytes."""
    files = {}
    for name, memory_gb in (("one", 1.0), ("many", 1e-6)):
        plan = make_plan(tmp_path / name, shards, bands=8, rows=8, tasks=2, memory_gb=memory_gb)
        _, stats = run_dedup(plan, LocalExecutor(1, progress=False))
        passes = [s["passes"] for s in stats if s.get("task", "").startswith("verify")]
        assert (passes == [1, 1]) if name == "one" else min(passes) > 1
        files[name] = [(tmp_path / name / "verified" / f"{v:05d}.npy").read_bytes() for v in range(2)]
        drop = (tmp_path / name / "drop.npy").read_bytes()
        assert drop[-reference.drop.nbytes :] == reference.drop.tobytes()
    assert files["one"] == files["many"]


def test_exact_only(tmp_path, shards, reference):
    """dedup.near=false: exact duplicates only, as find_duplicates(near=False); no bucket or verify stage."""
    keys, exact, sigs = load_signatures(shards)
    ref = find_duplicates(keys, exact, sigs, bands=8, rows=8, near=False)
    assert ref.drop.tobytes() == reference.drop[reference.exact].tobytes() and ref.near_dropped == 0
    plan = make_plan(tmp_path / "dedup", shards, bands=8, rows=8, tasks=2, near=False)
    result, _ = run_dedup(plan, LocalExecutor(1, progress=False))
    assert result.drop.tobytes() == ref.drop.tobytes() and result.kept_for.tobytes() == ref.kept_for.tobytes()
    assert result.stats() == ref.stats()
    assert not (tmp_path / "dedup" / "candidates").exists()
    with pytest.raises(ValueError, match="verify_threshold"):
        make_plan(tmp_path / "x", shards, verify_threshold=float("inf"))
    with pytest.raises(ValueError, match="near=False"):  # was an OverflowError (math.ceil of inf)
        find_duplicates(keys, exact, sigs, verify_threshold=float("inf"))


def test_group_slices_cut_only_between_groups():
    from llmforge.prep.dedup_tasks import _group_slices

    rng = np.random.default_rng(4)
    h = np.sort(rng.integers(0, 200, size=5000).astype(np.uint64))
    h[1000:1500] = h[1000]  # a group larger than a slice
    h = np.sort(h)
    k = np.arange(len(h))
    slices = list(_group_slices(h, k, 100))
    np.testing.assert_array_equal(np.concatenate([s[1] for s in slices]), k)
    assert all(len(s[0]) <= 100 or len(set(s[0].tolist())) == 1 for s in slices)
    assert all(a[0][-1] != b[0][0] for a, b in zip(slices, slices[1:], strict=False))  # no group split
    assert max(len(s[0]) for s in slices) > 100 and len(slices) > 40
