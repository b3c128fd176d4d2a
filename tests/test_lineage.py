"""Lineage: a planted garbage document is found again from the step that trained on it, through the stability
guard's anomalies.jsonl and through `python -m llmforge.inspect`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from llmforge.data.lineage import Lineage, inspect_step
from llmforge.data.mixture import MixtureSampler, open_sources
from llmforge.training import run
from tests.conftest import compose_train, mixture_overrides, run_cli

GARBAGE_URL = "https://spam.example/garbage"
SEQ = 32


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path]:
    """Two repetitive sources sharing a tokenizer; "web" also holds one short garbage document (random
    characters), in its train split."""
    from llmforge.prep.tokenizer import train_bpe
    from llmforge.prep.writers import is_validation, write_token_dataset

    web = [
        (f"w{i}", "the cat sat on the mat. " * 6, {"id": f"w{i}", "url": f"https://ok.example/{i}"})
        for i in range(100)
    ]
    rng = random.Random(0)
    junk = "".join(rng.choice("qxzjkvwbfgpy#@%&0123456789") for _ in range(60))
    junk_id = next(f"junk-{k}" for k in range(100) if not is_validation(f"junk-{k}", junk, 0.1))
    web.insert(57, (junk_id, junk, {"id": junk_id, "url": GARBAGE_URL}))
    code = [(f"c{i}", "def f(x):\n    return x + 1\n" * 4) for i in range(100)]
    tok = train_bpe([t for _, t, *_ in web + code], vocab_size=300, num_sentinels=4)
    root = tmp_path_factory.mktemp("planted")
    write_token_dataset(web, tok, root / "web", val_fraction=0.1)
    write_token_dataset(code, tok, root / "code", val_fraction=0.1)
    return {"web": root / "web", "code": root / "code"}


def first_garbage_step(planted: dict[str, Path]) -> tuple[int, int]:
    """(data.seed, step): a seed whose first batch holding the garbage comes after the guard's warm-up."""
    specs = {name: {"path": str(planted[name]), "weight": w} for name, w in (("web", 0.7), ("code", 0.3))}
    sources = open_sources(specs, SEQ)
    lineage = Lineage([(s.name, s.path) for s in sources], SEQ)
    bad = [
        i
        for i in range(int(lineage.bases[-1]))
        if any(d.get("url") == GARBAGE_URL for d in lineage.describe(i, 0)["documents"])
    ]
    assert bad, "the garbage document should be in the train split"
    sizes, weights = [len(s.train) for s in sources], [s.weight for s in sources]
    names = [s.name for s in sources]
    for seed in range(1, 1000):
        order = MixtureSampler(sizes, weights, 2, seed=seed, names=names).orders(np.arange(100))
        hits = np.nonzero(np.isin(order, bad))[0] // 2
        if hits.size and 15 <= hits[0] <= 25:
            return seed, int(hits[0])
    raise AssertionError("no seed puts the garbage after the warm-up")


def test_spike_on_a_planted_document_names_it(planted, tmp_path, capsys):
    seed, step = first_garbage_step(planted)
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        "model=tiny",
        f"data.seq_len={SEQ}",
        "data.batch_size=2",
        f"data.seed={seed}",
        "trainer.enable_progress_bar=false",
        f"trainer.max_steps={step + 1}",
        "trainer.val_check_interval=1000",
        "optim.lr=1e-2",
        "optim.warmup_steps=3",
        # a spike: the step's loss over twice the mean of the last 5 (the repetitive text is learnt fast)
        "callbacks.guard.warmup=5",
        "callbacks.guard.window=5",
        "callbacks.guard.zscore=null",
        "callbacks.guard.factor=2.0",
        "+callbacks.samples._target_=llmforge.callbacks.SampleIndexRecorder",
    ]
    result = run(compose_train(mixture_overrides(planted) + overrides))
    assert result.global_step == step + 1

    records = [json.loads(x) for x in (run_dir / "anomalies.jsonl").read_text().splitlines()]
    spike = next(r for r in records if r["step"] == step)
    assert spike["kind"] == "spike"
    named = [d for w in spike["documents"] for d in w["documents"] if d.get("url") == GARBAGE_URL]
    assert named and named[0]["id"].startswith("junk-")
    assert {w["source"] for w in spike["documents"] if any(d in named for d in w["documents"])} == {"web"}

    trained = (run_dir / "samples" / "rank0.txt").read_text().splitlines()[step].split()
    windows = inspect_step(run_dir, step)
    assert [w["index"] for w in windows] == [int(i) for i in trained]  # what the run really trained on
    hit = [d for w in windows for d in w["documents"] if d.get("url") == GARBAGE_URL]
    assert hit and hit[0]["id"] == named[0]["id"] and hit[0]["excerpt"]
    cli = run_cli("llmforge.inspect", str(run_dir), "--step", str(step), cwd=tmp_path)
    assert cli.returncode == 0 and GARBAGE_URL in cli.stdout and named[0]["id"] in cli.stdout, cli.stderr
    # --sample and --json in this process (a second interpreter would cost ~5 s of imports)
    from llmforge.inspect import main as inspect_main

    capsys.readouterr()  # drop the training run's output
    assert inspect_main([str(run_dir), "--step", str(step), "--sample", "0", "--json"]) == 0
    one = capsys.readouterr().out.splitlines()
    assert len(one) == 1 and json.loads(one[0])["index"] == int(trained[0])
    assert inspect_main([str(run_dir), "--step", str(step), "--sample", "99"]) == 2  # no such window
