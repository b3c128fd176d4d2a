"""Lineage: a planted garbage document is found again from the step that trained on it."""

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
    """Two repetitive sources sharing a tokenizer; "web" also holds one garbage document (random tokens)."""
    from llmforge.prep.tokenizer import train_bpe
    from llmforge.prep.writers import write_token_dataset

    web = [(f"w{i}", "the cat sat on the mat. " * 12, {"id": f"w{i}", "url": f"https://ok.example/{i}"})
           for i in range(30)]
    rng = random.Random(0)
    junk = "".join(rng.choice("qxzjkvwbfgpy#@%&0123456789") for _ in range(400))
    web.insert(17, ("junk", junk, {"id": "junk-17", "url": GARBAGE_URL}))
    code = [(f"c{i}", "def f(x):\n    return x + 1\n" * 10) for i in range(30)]
    tok = train_bpe([t for _, t, *_ in web + code], vocab_size=300, num_sentinels=4)
    root = tmp_path_factory.mktemp("planted")
    write_token_dataset(web, tok, root / "web", val_fraction=0.1)
    write_token_dataset(code, tok, root / "code", val_fraction=0.1)
    return {"web": root / "web", "code": root / "code"}


def garbage_windows(planted: dict[str, Path]) -> set[int]:
    """Flat indices (mixture order: code, web) of the windows that hold part of the garbage document."""
    sources = open_sources({k: {"path": str(v), "weight": 1} for k, v in planted.items()}, SEQ)
    lineage = Lineage([(s.name, s.path) for s in sources], SEQ)
    return {i for i in range(int(lineage.bases[-1]))
            if any(d.get("url") == GARBAGE_URL for d in lineage.describe(i, 0)["documents"])}


def test_inspect_finds_the_planted_document(planted, tmp_path):
    bad = garbage_windows(planted)
    assert bad
    sources = open_sources({"web": {"path": str(planted["web"]), "weight": 0.7},
                            "code": {"path": str(planted["code"]), "weight": 0.3}}, SEQ)
    sampler = MixtureSampler([len(s.train) for s in sources], [s.weight for s in sources], 2, seed=1234,
                             names=[s.name for s in sources])
    order = sampler.orders(np.arange(400))
    step = int(np.nonzero(np.isin(order, list(bad)))[0][0]) // 2  # batch 2, one process
    run_dir = tmp_path / "run"
    result = run(compose_train(mixture_overrides(planted) + [
        f"run_dir={run_dir}", "model=tiny", f"data.seq_len={SEQ}", "data.batch_size=2",
        "trainer.enable_progress_bar=false", f"trainer.max_steps={step + 1}",
        "trainer.val_check_interval=1000",
        "+callbacks.samples._target_=llmforge.callbacks.SampleIndexRecorder",
    ]))
    assert result.global_step == step + 1
    trained = (run_dir / "samples" / "rank0.txt").read_text().splitlines()[step].split()
    windows = inspect_step(run_dir, step)
    assert [w["index"] for w in windows] == [int(i) for i in trained]  # what the run really trained on
    hit = [d for w in windows for d in w["documents"] if d.get("url") == GARBAGE_URL]
    assert hit and hit[0]["id"] == "junk-17" and hit[0]["excerpt"]
    holding = [w for w in windows if any(d.get("url") == GARBAGE_URL for d in w["documents"])]
    assert holding and all(w["source"] == "web" for w in holding)
    cli = run_cli("llmforge.inspect", str(run_dir), "--step", str(step), cwd=tmp_path)
    assert cli.returncode == 0 and GARBAGE_URL in cli.stdout and "junk-17" in cli.stdout, cli.stderr
    one = run_cli(
        "llmforge.inspect", str(run_dir), "--step", str(step), "--sample", "0", "--json", cwd=tmp_path
    )
    assert one.returncode == 0 and json.loads(one.stdout.splitlines()[0])["index"] == int(trained[0])
