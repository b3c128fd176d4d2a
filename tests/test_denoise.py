"""Denoising: T5 span corruption and BART infilling collators (lengths, statistics on a large batch,
purity), the sentinel check before training, overfitting under every precision, 2-process DDP."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from llmforge.config import validate
from llmforge.curves import read_scalars
from llmforge.models.transformer import flops_per_token
from llmforge.objectives.denoise import (
    Denoise,
    infill_collate,
    infill_spans,
    random_spans_noise_mask,
    span_corruption_collate,
    span_counts,
    span_lengths,
)
from llmforge.training import run
from tests.conftest import (
    PRECISIONS,
    compose_train,
    ddp_three_steps,
    overfit,
    random_windows,
    run_cli,
    train_two_processes,
)

VOCAB, PAD, BOS, EOS, MASK = 1000, 0, 2, 3, 4
SENTINELS = np.arange(5, 105)  # <extra_id_0..99>
SPECIAL = np.arange(0, 105)
MODEL = dict(vocab_size=1024, d_model=32, n_layers=1, n_heads=2, max_seq_len=600)
OPTIM = dict(lr=1e-3)
SPECIALS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4, **{f"sentinel_{i}": 5 + i for i in range(100)}}


def windows(n: int, seq_len: int, seed: int = 0, pad_last: int = 0) -> list[dict]:
    return random_windows(n, seq_len, low=105, high=VOCAB, seed=seed, pad_last=pad_last, index_step=7)


def spans(samples, seed=0, **kw):
    return span_corruption_collate(
        samples, seed=seed, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD, start_id=BOS, **kw
    )


def uncorrupt(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Rebuild the source from one (inputs, targets) pair; also return the span lengths, in order."""
    inputs, targets = inputs[inputs != PAD], targets[targets != -100]
    assert inputs[-1] == EOS and targets[-1] == EOS
    inputs, targets = inputs[:-1], targets[:-1]
    sent_in = inputs[np.isin(inputs, SENTINELS)]
    sent_out = targets[np.isin(targets, SENTINELS)]
    k = len(sent_in)
    assert (sent_in == SENTINELS[:k]).all() and (sent_out == SENTINELS[:k]).all()  # in order, each once
    assert k == 0 or targets[0] == SENTINELS[0]
    cuts = np.flatnonzero(np.isin(targets, SENTINELS))
    pieces = np.split(targets, cuts[1:]) if k else []
    lengths = [len(p) - 1 for p in pieces]
    out = []
    for token in inputs:
        if token in SENTINELS:
            out.extend(pieces[token - SENTINELS[0]][1:])
        else:
            out.append(token)
    return np.array(out), lengths


# -- span corruption ----------------------------------------------------------------------------------
def test_lengths_follow_t5_and_fit_every_window():
    assert span_counts(256, 0.15, 3.0) == (38, 13)
    assert span_lengths(256, 0.15, 3.0) == (232, 52)
    assert span_lengths(512, 0.15, 3.0) == (512 - 77 + 26 + 1, 77 + 26 + 1)
    for seq_len in (2, 7, 32, 100, 512):
        full = span_lengths(seq_len, 0.15, 3.0)
        for n in range(1, seq_len + 1):  # a shorter (padded) window never needs more room
            x, y = span_lengths(n, 0.15, 3.0)
            assert x <= full[0] and y <= full[1]


def test_noise_mask_has_exactly_the_counted_spans():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 33, 257):
        noise = random_spans_noise_mask(n, 0.15, 3.0, rng)
        num_noise, num_spans = span_counts(n, 0.15, 3.0)
        starts = noise & ~np.concatenate([[False], noise[:-1]])
        assert noise.sum() == num_noise and starts.sum() == num_spans and not noise[0]


@pytest.fixture(scope="module")
def big():
    samples = windows(400, 512, pad_last=200)
    return samples, spans(samples)


def test_span_corruption_statistics_on_a_large_batch(big):
    samples, batch = big
    in_len, tgt_len = span_lengths(512, 0.15, 3.0)
    assert batch["input_ids"].shape == (400, in_len) and batch["labels"].shape == (400, tgt_len)
    noise = real = 0
    span_lengths_seen = []
    starts_at = np.zeros(512)
    for s, x, y in zip(samples, batch["input_ids"].numpy(), batch["labels"].numpy(), strict=True):
        source = s["tokens"][:-1][s["tokens"][:-1] >= 0]
        rebuilt, lengths = uncorrupt(x, y)
        assert np.array_equal(rebuilt, source)  # nothing lost, no span cut
        noise += sum(lengths)
        real += len(source)
        span_lengths_seen += lengths
        noisy = np.concatenate([[0], np.cumsum(lengths)])  # (where the spans are is random)
        starts_at[: len(noisy)] += 1
    assert abs(noise / real - 0.15) < 0.01
    assert abs(np.mean(span_lengths_seen) - 3.0) < 0.3
    assert np.std(span_lengths_seen) > 1.0  # random lengths, not all equal to the mean
    assert (np.bincount(span_lengths_seen)[1:4] > 0).all()


def test_span_corruption_batch_structure(big):
    samples, batch = big
    labels, dec = batch["labels"], batch["decoder_input_ids"]
    assert (dec[:, 0] == BOS).all()
    shifted = torch.where(labels[:, :-1] == -100, PAD, labels[:, :-1])
    assert torch.equal(dec[:, 1:], shifted)
    mask = batch["attention_mask"]  # only the last window is padded
    assert mask[:-1].all() and not mask[-1].all()
    assert torch.equal(mask[-1], batch["input_ids"][-1] != PAD)
    full = spans(windows(4, 512))
    assert "attention_mask" not in full and (full["labels"] != -100).all()


def test_span_corruption_is_pure_and_seeded():
    samples = windows(6, 128)
    a, b = spans(samples), spans(samples)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(spans(samples, seed=1)["input_ids"], a["input_ids"])
    assert not torch.equal(spans(samples[::-1])["input_ids"], a["input_ids"].flip(0))  # batch-seeded


def test_too_few_sentinels_is_a_clear_error_before_training(train_cfg, tiny_data, tmp_path):
    # the tiny tokenizer has 8 sentinels; seq_len 256 needs 13 at the default density and span length
    cfg = train_cfg("objective=denoise", "data.seq_len=256", "debug=fast", run_dir=tmp_path / "r")
    with pytest.raises(ValueError, match=r"needs 13 sentinel tokens .* has 8: rebuild"):
        run(cfg)
    assert not (tmp_path / "r" / "checkpoints").exists()
    run(train_cfg("objective=denoise", "data.seq_len=128", "debug=fast", "trainer.max_steps=1"))  # 6 fit
    broken = tmp_path / "no_sentinels"
    shutil.copytree(tiny_data, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    for name in [k for k in manifest["special_tokens"] if k.startswith("sentinel_")]:
        del manifest["special_tokens"][name]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli(
        "llmforge.train", "objective=denoise", f"data.path={broken}", "data.seq_len=32", cwd=tmp_path
    )
    assert proc.returncode == 2
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("error: objective=denoise (span corruption) needs 2 sentinel tokens"), proc.stderr


def test_knobs_are_typed_and_checked_at_composition():
    with pytest.raises(ConfigCompositionException, match="objective.noise_densty"):
        compose_train(["objective=denoise", "objective.noise_densty=0.2"])
    with pytest.raises(ConfigCompositionException, match="objective.mean_span_length"):
        compose_train(["objective=denoise", "objective.mean_span_length=long"])
    cfg = compose_train(["objective=denoise", "objective.variant=bart", "run_dir=/tmp/unused"])
    with pytest.raises(ValueError, match="objective.variant='bart' is not one of span, infill"):
        validate(cfg)


def test_bad_knobs_and_missing_tokens_raise():
    data = {"seq_len": 64}
    with pytest.raises(ValueError, match="variant"):
        Denoise(MODEL, OPTIM, SPECIALS, data=data, variant="bart")
    with pytest.raises(ValueError, match="noise_density"):
        Denoise(MODEL, OPTIM, SPECIALS, data=data, noise_density=1.2)
    with pytest.raises(ValueError, match="seq_len"):
        Denoise(MODEL, OPTIM, SPECIALS)
    no_mask = {k: v for k, v in SPECIALS.items() if k != "mask"}
    with pytest.raises(ValueError, match=r"\['mask'\]"):
        Denoise(MODEL, OPTIM, no_mask, data=data, variant="infill")
    with pytest.raises(ValueError, match=r"\['sep'\]"):
        Denoise(MODEL, OPTIM, SPECIALS, data=data, decoder_start_token="sep")
    with pytest.raises(ValueError, match="max_seq_len"):
        Denoise({**MODEL, "max_seq_len": 64}, OPTIM, SPECIALS, data=data, variant="span", mean_span_length=1)


def test_loss_accuracy_tokens_and_flops():
    torch.manual_seed(0)
    module = Denoise(MODEL, OPTIM, SPECIALS, data={"seq_len": 64, "vocab_size": VOCAB})
    batch = module.collate_fn()(windows(3, 64))
    assert batch["input_ids"].shape[1] == module.input_len and batch["labels"].shape[1] == module.target_len
    loss, n, extra = module.loss(batch)
    assert n == batch["labels"].numel() and 0 <= extra["acc"] <= 1 and loss > 0
    assert module.tokens_in_batch(batch) == 3 * 64  # source tokens, as for the other objectives
    cfg, s, t = module.model_cfg, module.input_len, module.target_len
    per_input = flops_per_token(cfg, s, arch="encdec", target_len=t)
    assert module.flops_per_token(batch) == pytest.approx(per_input * s / 64)


# -- text infilling -----------------------------------------------------------------------------------
def infill(samples, seed=0, **kw):
    return infill_collate(samples, seed=seed, mask_id=MASK, pad_id=PAD, start_id=BOS, **kw)


def test_infill_spans_cover_the_noise_and_stay_apart():
    rng = np.random.default_rng(0)
    lengths_seen = []
    for n in [512] * 200 + [1, 2, 5, 30]:
        starts, lengths = infill_spans(n, 0.3, 3.0, rng)
        assert lengths.sum() == round(n * 0.3) or n < 4
        assert len(lengths) <= max(lengths.sum(), 0)  # never more masks than noise tokens
        ends = starts + lengths
        assert (starts[1:] > ends[:-1]).all() and (ends <= n).all() and (starts >= 0).all()
        if n == 512:
            lengths_seen += lengths.tolist()
    assert abs(np.mean(lengths_seen) - 3.0) < 0.3
    assert 0 < np.mean(np.array(lengths_seen) == 0) < 0.1  # insertions, about e^-3 of the spans


def test_infill_batch_restores_to_the_source():
    samples = windows(64, 256, pad_last=50)
    batch = infill(samples)
    x, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    noise = real = 0
    for s, xi, yi in zip(samples, x, labels, strict=True):
        source = s["tokens"][:-1][s["tokens"][:-1] >= 0]
        assert np.array_equal(yi[yi != -100], source)  # the target is the whole source
        kept = xi[(xi != PAD) & (xi != MASK)]
        remaining = iter(source.tolist())  # the kept tokens are the source in order, spans taken out
        assert all(any(token == other for other in remaining) for token in kept.tolist())
        assert 0 < (xi == MASK).sum() <= len(source) - len(kept)
        noise += len(source) - len(kept)
        real += len(source)
    assert abs(noise / real - 0.3) < 0.01
    assert (batch["decoder_input_ids"][:, 0] == BOS).all()
    assert batch["input_ids"].shape == batch["labels"].shape == (64, 256)


# -- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "hardware"), PRECISIONS)
def test_denoise_overfits_a_fixed_batch(train_cfg, precision, hardware):
    first, last, acc = overfit(train_cfg, "denoise", precision, hardware, steps=20)
    assert last < 0.35 * first, (precision, first, last)
    assert acc > 0.8


def test_infill_variant_trains(train_cfg):
    cfg = train_cfg("objective=denoise", "objective.variant=infill", "debug=overfit", "trainer.max_steps=20")
    result = run(cfg)
    loss = dict(read_scalars(result.run_dir)["train/loss"])
    assert loss[max(loss)] < 0.6 * loss[min(loss)]


@pytest.mark.slow
def test_denoise_ddp_two_processes(tmp_path, tiny_data):
    ck = ddp_three_steps(tmp_path, tiny_data, "denoise")
    assert any(k.startswith("model.decoder.0.cross.") for k in ck["state_dict"])


@pytest.mark.slow
def test_denoise_fsdp_two_processes(tmp_path, tiny_data):
    """FSDP2 shards encoder and decoder blocks alike (`PretrainModule.configure_model`)."""
    train_two_processes(tmp_path, tiny_data, "denoise-fsdp", "objective=denoise", "strategy=fsdp", steps=2)
    last = tmp_path / "runs" / "denoise-fsdp" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and any(last.iterdir())  # sharded
    assert sorted(dict(read_scalars(tmp_path / "runs" / "denoise-fsdp")["train/loss"])) == [0, 1]
