"""python -m llmforge.evaluate gives the trainer's validation numbers, for every objective."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tokenizers import Tokenizer

from llmforge.checkpoints import load_module
from llmforge.evaluate import main
from llmforge.evaluation import evaluate, token_bytes
from llmforge.training import run


def trained(train_cfg, tmp_path, objective: str, batch_size: int = 3):
    """Two steps, then the trainer's own validation on the first 3 val batches (weights of step 2)."""
    cfg = train_cfg(
        f"objective={objective}",
        "debug=fast",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=3",
        f"data.batch_size={batch_size}",
        run_dir=tmp_path / objective,
    )
    return run(cfg)


@pytest.mark.parametrize("objective", ["clm", "mlm", "denoise"])
def test_evaluate_equals_the_trainers_validation_loss(train_cfg, tmp_path, tiny_data, objective):
    result = trained(train_cfg, tmp_path, objective)
    val = result.metrics["val/loss"]
    module = load_module(result.last_checkpoint)
    out = evaluate(module, tiny_data, batch_size=3, limit_batches=3, progress=False)
    assert out["loss"] == pytest.approx(val, abs=1e-5), (objective, out["loss"], val)
    assert out["ppl"] == pytest.approx(result.metrics["val/ppl"], rel=1e-5)
    if objective != "clm":
        assert out["acc"] == pytest.approx(result.metrics["val/acc"], abs=1e-5)
    assert out["batches"] == 3 and out["tokens_scored"] > 0 and out["bpb"] > 0
    # another batch size scores other masks (mlm/denoise draws are seeded per batch) but the same clm tokens
    other = evaluate(module, tiny_data, batch_size=2, limit_batches=4, progress=False)
    if objective == "clm":
        six = evaluate(module, tiny_data, batch_size=3, limit_batches=2, progress=False)  # the same 6 windows
        three = evaluate(module, tiny_data, batch_size=2, limit_batches=3, progress=False)
        assert six["loss"] == pytest.approx(three["loss"], abs=1e-5)
    assert other["batches"] == 4


def test_cli_reads_the_run_config_and_writes_json(train_cfg, tmp_path, tiny_data, capsys):
    result = trained(train_cfg, tmp_path, "clm")
    out = tmp_path / "eval.json"
    code = main(
        [
            str(result.run_dir),
            f"data={tiny_data}",
            "trainer.limit_val_batches=3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert saved["batch_size"] == 3  # from the run's config.yaml
    assert saved["loss"] == pytest.approx(result.metrics["val/loss"], abs=1e-5)
    assert saved["bpb"] == pytest.approx(
        saved["loss"] * saved["tokens_scored"] / math.log(2) / saved["bytes"]
    )
    assert "loss" in capsys.readouterr().out
    # default output path; the whole split
    assert main([str(result.last_checkpoint), "--no-progress"]) == 0
    default = result.run_dir / "eval" / "last-val.json"
    assert json.loads(default.read_text())["batches"] >= 3
    assert main([str(result.last_checkpoint), "split=nope", "--no-progress"]) == 2
    assert "no split 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(result.last_checkpoint), "dat=x"])


def test_token_bytes_count_utf8_bytes(tiny_data):
    tok = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    table = token_bytes(tiny_data / "tokenizer.json", 576)
    text = "Größe: naïve café, 10 € — ok"
    ids = tok.encode(text).ids
    assert int(table[np.array(ids)].sum()) == len(text.encode("utf-8"))
    assert table[:5].sum() == 0 and table[512:].sum() == 0  # specials and vocabulary padding
