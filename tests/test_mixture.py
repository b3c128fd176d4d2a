"""Weighted mixtures (`llmforge.data.mixture`): realised shares, per-source epochs, determinism, rank slicing,
the changed-weights rule, bad input, and a real training run with per-source validation."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch

from llmforge.curves import read_scalars
from llmforge.data.mixture import MixtureSampler, Segment, apportion, draws_at, normalise, open_sources
from llmforge.training import run
from tests.conftest import compose_train, mixture_overrides

WINDOWS = 100_000


@pytest.mark.parametrize(
    ("sizes", "weights"),
    [([50, 10**6], [0.7, 0.3]), ([1000, 20, 300], [0.5, 0.3, 0.2]), ([7, 9], [0.999, 0.001])],
)
def test_realised_shares_within_one_point(sizes, weights):
    sampler = MixtureSampler(sizes, weights, 8, seed=4)
    source, _, _ = sampler.locate(np.arange(WINDOWS))
    shares = np.bincount(source, minlength=len(sizes)) / WINDOWS
    deviation = np.abs(shares - normalise(weights)) * 100
    assert deviation.max() < 1.0, (shares, weights)
    # every prefix, not just the whole: the share after 1000 windows is already within a point
    head = np.bincount(source[:1000], minlength=len(sizes)) / 1000
    assert (np.abs(head - normalise(weights)) * 100).max() < 1.0


def test_each_source_draws_in_epochs():
    """A small source with a large weight repeats, each epoch a permutation of its windows; a large source
    never repeats a window within its epoch."""
    sizes = [37, 5000]
    sampler = MixtureSampler(sizes, [0.8, 0.2], 4, seed=2, names=["small", "large"])
    source, draw, window = sampler.locate(np.arange(4096))  # four whole blocks: draws are 0..k-1
    for s, n in enumerate(sizes):
        order = np.argsort(draw[source == s])
        d, w = draw[source == s][order], window[source == s][order]
        assert d.tolist() == list(range(d.size))
        epochs = [w[k : k + n] for k in range(0, d.size - n + 1, n)]
        for e in epochs:
            assert sorted(e.tolist()) == list(range(n))
        if s == 0:
            assert len(epochs) >= 80 and epochs[0].tolist() != epochs[1].tolist()  # repeats, reshuffled
        else:
            assert d.size < n and np.unique(w).size == w.size  # within its first epoch: no repeat


def test_pure_function_of_position_and_ranks_slice_the_global_stream(monkeypatch):
    monkeypatch.setattr("llmforge.data.dataset.LOOKAHEAD", 24)  # ranks look ahead 2 batches: chunks join
    sizes, weights = [300, 200], [0.6, 0.4]
    one = MixtureSampler(sizes, weights, 1, seed=9)
    reference = list(islice(iter(one), 600))
    # any position on its own gives the same sample as the sequential stream
    for p in (0, 1, 599, 421):
        assert one.order(p) == reference[p]
    # 3 ranks of batch 4, started at cursor 24: each global batch is the next 12 of the stream
    ranks = [
        list(islice(iter(MixtureSampler(sizes, weights, 4, r, 3, seed=9, start=24)), 16)) for r in range(3)
    ]
    merged = [i for g in range(4) for r in range(3) for i in ranks[r][g * 4 : (g + 1) * 4]]
    assert merged == reference[24 : 24 + 48]
    assert MixtureSampler(sizes, weights, 1, seed=10).orders(np.arange(50)).tolist() != reference[:50]


def test_changed_weights_each_source_keeps_its_cursor():
    """Weights change at cursor 3000, mid-block (0.7/0.3 -> 0.2/0.8): each source goes on with its next draw,
    so over both segments every source's draws are 0, 1, 2, ... each exactly once (no window repeated
    before its epoch ends, none skipped)."""
    names, cursor = ["a", "b"], 3000
    first = Segment(0, names, [0.7, 0.3], [0, 0], 5)
    done = draws_at([first], cursor)
    second = Segment(cursor, names, [0.2, 0.8], [done["a"], done["b"]], 5)
    sampler = MixtureSampler([10_000, 10_000], [0.2, 0.8], 1, seed=5, names=names, segments=[first, second])
    end = cursor + 4 * 1024
    source, draw, window = sampler.locate(np.arange(end))
    for s in range(2):
        assert sorted(draw[source == s].tolist()) == list(range(int((source == s).sum())))
        assert np.unique(window[source == s]).size == (source == s).sum()
    after = np.bincount(source[cursor:], minlength=2) / (end - cursor)
    assert abs(after[1] - 0.8) < 0.01
    assert draws_at([first, second], end) == {"a": int((source == 0).sum()), "b": int((source == 1).sum())}


def test_apportion_rows_sum_and_stay_close():
    w = normalise([0.123, 0.456, 0.421])
    totals = np.arange(0, 10**6, 9973)
    counts = apportion(totals, w)
    assert (counts.sum(axis=1) == totals).all()
    assert (np.abs(counts - totals[:, None] * w[None, :]) < 1).all()
    assert (np.diff(counts, axis=0) >= 0).all()


def test_temperature_rule(tiny_mixture):
    sources = {name: {"path": str(p), "weight": 1.0} for name, p in tiny_mixture.items()}
    opened = open_sources(sources, 32, alpha=1.0)
    tokens = {s.name: s.manifest["splits"]["train"]["tokens"] for s in opened}
    for s in opened:
        assert s.weight == pytest.approx(tokens[s.name] / sum(tokens.values()))
    flat = open_sources(sources, 32, alpha=0.0)
    assert [s.weight for s in flat] == [0.5, 0.5]


def test_bad_sources_are_one_line_errors_naming_the_source(tiny_mixture, tmp_path):
    good = {name: {"path": str(p), "weight": 0.5} for name, p in tiny_mixture.items()}
    cases = [
        ({**good, "code": {"path": None, "weight": 0.5}}, "data.sources.code.path is missing"),
        ({**good, "code": {"path": str(tiny_mixture["code"]), "weight": 0}}, "data.sources.code.weight=0"),
        ({**good, "web": {"path": str(tiny_mixture["web"]), "weight": -1}}, "data.sources.web.weight=-1"),
        ({**good, "code": {"path": str(tmp_path / "nowhere"), "weight": 1}}, "data.sources.code.path="),
        ({**good, "web": {"path": str(tiny_mixture["web"]), "weight": float("nan")}}, "sources.web.weight"),
    ]
    for sources, message in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            open_sources(sources, 32)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    from llmforge.prep.tokenizer import load
    from llmforge.prep.writers import write_token_dataset

    tok = load(tiny_mixture["web"] / "tokenizer.json")
    for fraction, split in ((1.0, "train"), (0.0, "val")):  # every document in val, then none
        empty = tmp_path / f"empty-{split}"
        docs = [("a", "some text " * 20), ("b", "more text " * 20)]
        write_token_dataset(docs, tok, empty, val_fraction=fraction)
        with pytest.raises(ValueError, match=f"data.sources.code .*the {split} split is empty"):
            open_sources({**good, "code": {"path": str(empty), "weight": 1}}, 32)


def test_different_tokenizers_stop_before_the_first_step(tiny_mixture, tmp_path):
    from itertools import islice as take

    from llmforge.prep.text import stdlib_documents
    from llmforge.prep.tokenizer import train_bpe
    from llmforge.prep.writers import write_token_dataset

    docs = list(take(stdlib_documents(), 12))
    other = tmp_path / "other"
    write_token_dataset(docs, train_bpe((t for _, t in docs), 400, 8), other, val_fraction=0.3)
    web_hash = json.loads((tiny_mixture["web"] / "manifest.json").read_text())["tokenizer_sha256"]
    other_hash = json.loads((other / "manifest.json").read_text())["tokenizer_sha256"]
    cfg = compose_train(
        mixture_overrides({"web": tiny_mixture["web"], "code": other})
        + [f"run_dir={tmp_path / 'run'}", "model=tiny", "data.seq_len=32"]
    )
    with pytest.raises(ValueError) as err:
        run(cfg)
    message = str(err.value)
    assert web_hash in message and other_hash in message and "\n" not in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mixture_run_validates_per_source_and_resumes_with_changed_weights(tiny_mixture, tmp_path):
    run_dir = tmp_path / "run"
    common = [
        f"run_dir={run_dir}",
        "model=tiny",
        "data.seq_len=32",
        "data.batch_size=4",
        "trainer.enable_progress_bar=false",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "objective.z_loss=0.5",  # large: a per-source loss that kept the z-loss term would show it
    ]
    result = run(compose_train(mixture_overrides(tiny_mixture) + common + ["trainer.max_steps=3"]))
    assert result.global_step == 3
    scalars = read_scalars(run_dir)
    for name in ("web", "code"):
        tags = {f"val/{name}/loss", f"val/{name}/bpb", f"data/{name}/epoch", f"data/{name}/tokens"}
        assert tags <= set(scalars)
    from llmforge.curves import figure, plot, source_panels

    titles = [title for title, *_ in source_panels(scalars)]
    assert titles == ["val loss per source", "val bits per byte", "epochs per source"]
    drawn = [ax.get_title() for ax in figure(scalars).axes]
    assert drawn[-3:] == titles and plot(run_dir).stat().st_size > 10_000
    web, code = scalars["val/web/loss"][-1][1], scalars["val/code/loss"][-1][1]
    assert scalars["val/loss"][-1][1] == pytest.approx(0.7 * web + 0.3 * code, rel=1e-5)
    manifest = json.loads((run_dir / "run_manifest.json").read_text())["data"]
    assert manifest["sources"]["web"]["weight"] == pytest.approx(0.7)
    # neither source was decontaminated: `evaluate tasks=...` warns for every task
    assert manifest["sources"]["code"]["decontaminated_against"] == [] == manifest["decontaminated_against"]
    progress = manifest["progress"]
    assert progress["web"]["windows"] + progress["code"]["windows"] == 12
    assert progress["web"]["tokens"] == progress["web"]["windows"] * 32
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["ShardDataModule"]
    assert state["cursor"] == 12 and len(state["segments"]) == 1

    # python -m llmforge.evaluate: every source on its own, and the weighted loss
    from llmforge.evaluate import main as evaluate_main

    out = tmp_path / "eval.json"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert evaluate_main([str(ckpt), "--no-progress", "--limit-batches", "2", "--out", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert set(scored["sources"]) == {"web", "code"} and scored["sources"]["code"]["bpb"] > 0
    mixed = 0.7 * scored["sources"]["web"]["loss"] + 0.3 * scored["sources"]["code"]["loss"]
    assert scored["loss"] == pytest.approx(mixed)
    # the in-loop per-source losses are the cross-entropy, as the evaluator's (same batches, same weights)
    assert (web, code) == pytest.approx((scored["sources"]["web"]["loss"], scored["sources"]["code"]["loss"]))

    # resumed with other weights: a new segment at cursor 12 whose offsets are the draws made so far
    resumed = run(
        compose_train(
            mixture_overrides(tiny_mixture, 0.2, 0.8) + common + ["trainer.max_steps=6", "resume=auto"]
        )
    )
    assert resumed.global_step == 6
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["ShardDataModule"]
    first, second = state["segments"]
    assert second["start"] == 12 and second["weights"] == pytest.approx([0.8, 0.2])  # sorted: code, web
    assert dict(zip(second["names"], second["offsets"], strict=True)) == {
        "code": progress["code"]["windows"],
        "web": progress["web"]["windows"],
    }
    final = json.loads((run_dir / "run_manifest.json").read_text())["data"]["progress"]
    assert final["web"]["windows"] + final["code"]["windows"] == 24
