"""Masked LM: the 80/10/10 collator (statistics on a large batch, purity), whole word masking, the
missing-mask-token error, overfitting under every precision, 2-process DDP."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from torch.utils.data import DataLoader

from llmforge.data.dataset import PackedWindows
from llmforge.data.shards import ShardSet, read_manifest
from llmforge.objectives.mlm import MaskedLM, byte_level_word_starts, mlm_collate
from llmforge.training import run
from tests.conftest import PRECISIONS, compose_train, ddp_three_steps, overfit, random_windows

VOCAB, PAD, EOS, MASK = 1000, 0, 3, 4
SPECIAL = np.arange(0, 20)  # pad unk bos eos mask + 15 sentinels
RANDOM_IDS = np.arange(20, VOCAB)
MODEL = dict(vocab_size=1024, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
OPTIM = dict(lr=1e-3)
SPECIALS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4, **{f"sentinel_{i}": 5 + i for i in range(15)}}


def windows(n: int, seq_len: int, seed: int = 0, pad_last: int = 0) -> list[dict]:
    """Random windows of seq_len + 1 tokens with EOS (document ends) sprinkled in; the last one padded."""
    return random_windows(n, seq_len, low=20, high=VOCAB, seed=seed, pad_last=pad_last, eos=EOS,
                          first_index=1000)


def collate(samples, seed=0, **kw):
    return mlm_collate(
        samples, seed=seed, mask_id=MASK, pad_id=PAD, special_ids=SPECIAL, random_ids=RANDOM_IDS, **kw
    )


@pytest.fixture(scope="module")
def big():
    samples = windows(512, 512, pad_last=100)
    return samples, collate(samples)


def test_realised_rates_match_the_targets(big):
    samples, batch = big
    original = np.stack([s["tokens"] for s in samples])[:, :-1]
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    maskable = (original >= 0) & ~np.isin(original, SPECIAL)
    selected = labels != -100
    rate = selected.sum() / maskable.sum()
    assert abs(rate - 0.15) < 0.005, rate
    n = selected.sum()
    as_mask = (inputs[selected] == MASK).sum() / n
    kept = (inputs[selected] == original[selected]).sum() / n
    replaced = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01
    # random replacements are never special, and come from the whole non-special vocabulary
    swapped = inputs[selected & (inputs != MASK) & (inputs != original)]
    assert swapped.size > 1000 and not np.isin(swapped, SPECIAL).any() and swapped.max() < VOCAB
    assert len(np.unique(swapped)) > 0.9 * len(RANDOM_IDS)


def test_specials_and_padding_are_never_selected_and_labels_are_ignored_elsewhere(big):
    samples, batch = big
    original = np.stack([s["tokens"] for s in samples])[:, :-1]
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    special = np.isin(original, SPECIAL)
    assert special.sum() > 1000  # the EOS between packed documents are there
    assert (labels[special] == -100).all() and (inputs[special] == original[special]).all()
    padding = original < 0
    assert (labels[padding] == -100).all() and (inputs[padding] == PAD).all()
    selected = labels != -100
    assert (labels[selected] == original[selected]).all()
    assert (inputs[~selected & ~padding] == original[~selected & ~padding]).all()
    assert torch.equal(batch["mlm_positions"], torch.from_numpy(np.flatnonzero(selected)))
    assert torch.equal(batch["attention_mask"], torch.from_numpy(~padding))
    # an exact count per row: round(15% of its maskable tokens)
    per_row = selected.sum(1)
    want = np.maximum(1, np.rint(0.15 * ((original >= 0) & ~special).sum(1)))
    assert (per_row == want).all()


def test_collate_is_a_pure_function_of_samples_and_seed():
    samples = windows(8, 64)
    a, b = collate(samples), collate(samples)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert "attention_mask" not in a  # no padding: no mask, the fast attention path
    other = collate(samples, seed=1)
    assert not torch.equal(a["input_ids"], other["input_ids"])
    # a batch of other windows is masked independently: the first batch does not change
    collate(windows(8, 64, seed=5))
    assert torch.equal(collate(samples)["input_ids"], a["input_ids"])


def test_masks_do_not_depend_on_dataloader_workers(tiny_data):
    data = PackedWindows(ShardSet.open(tiny_data, "train"), 32)
    specials = read_manifest(tiny_data)["special_tokens"]
    fn = MaskedLM(MODEL, OPTIM, specials, data={"seq_len": 32, "vocab_size": 512, "seed": 7}).collate_fn()
    runs = []
    for workers in (0, 2):
        loader = DataLoader(data, batch_size=4, collate_fn=fn, num_workers=workers)
        runs.append([b["input_ids"] for b, _ in zip(loader, range(6), strict=False)])
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


def test_whole_word_masking_takes_whole_words(tiny_data):
    table = byte_level_word_starts(tiny_data / "tokenizer.json", 512)
    specials = read_manifest(tiny_data)["special_tokens"]
    assert table[specials["eos"]] and table[:5].all()
    data = PackedWindows(ShardSet.open(tiny_data, "train"), 256)
    samples = [data[i] for i in range(min(len(data), 64))]
    special_ids = np.array(sorted(specials.values()))
    batch = mlm_collate(
        samples,
        seed=0,
        mask_id=specials["mask"],
        pad_id=specials["pad"],
        special_ids=special_ids,
        random_ids=np.setdiff1d(np.arange(512), special_ids),
        word_start=table,
    )
    original = np.stack([s["tokens"] for s in samples])[:, :-1]
    selected = batch["labels"].numpy() != -100
    maskable = (original >= 0) & ~np.isin(original, special_ids)
    assert abs(selected.sum() / maskable.sum() - 0.15) < 0.01
    assert not (selected & ~maskable).any()
    # a selected token's whole word is selected: a continuation never differs from the token before it
    continuation = ~table[np.maximum(original, 0)] & maskable
    continuation[:, 0] = False
    prev_maskable = np.zeros_like(maskable)
    prev_maskable[:, 1:] = maskable[:, :-1]
    inner = continuation & prev_maskable
    prev_selected = np.zeros_like(selected)
    prev_selected[:, 1:] = selected[:, :-1]
    split = inner & (selected != prev_selected)
    # words are cut every 8 tokens at most (text without spaces); only those cuts may differ
    assert split.sum() <= 0.01 * inner.sum()
    assert (selected & inner).sum() > 100  # and multi-token words were selected
    # the module builds the same table from the data's tokenizer
    data = {"path": str(tiny_data), "seq_len": 256, "vocab_size": 512, "seed": 0}
    module = MaskedLM(MODEL, OPTIM, specials, data=data, whole_word_mask=True)
    assert torch.equal(module.collate_fn()(samples)["labels"], batch["labels"])
    with pytest.raises(ValueError, match="whole_word_mask"):
        MaskedLM(MODEL, OPTIM, specials, whole_word_mask=True)


def test_knobs_are_typed_at_composition():
    with pytest.raises(ConfigCompositionException, match="objective.mask_probability"):
        compose_train(["objective=mlm", "objective.mask_probability=0.2"])
    with pytest.raises(ConfigCompositionException, match="objective.whole_word_mask"):
        compose_train(["objective=mlm", "objective.whole_word_mask=maybe"])
    cfg = compose_train(["objective=mlm", "objective.mask_prob=0.3", "run_dir=/tmp/unused"])
    assert cfg.objective.mask_prob == 0.3 and cfg.objective._target_ == "llmforge.objectives.mlm.MaskedLM"


def test_missing_mask_token_is_a_clear_error_before_training(train_cfg, tiny_data, tmp_path):
    broken = tmp_path / "no_mask"
    shutil.copytree(tiny_data, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["special_tokens"]["mask"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    cfg = train_cfg("objective=mlm", f"data.path={broken}", "debug=fast", run_dir=tmp_path / "r")
    with pytest.raises(ValueError, match=r"objective=mlm needs the special tokens \['mask'\]"):
        run(cfg)
    assert not (tmp_path / "r" / "checkpoints").exists()
    with pytest.raises(ValueError, match="mask_prob"):
        MaskedLM(MODEL, OPTIM, SPECIALS, mask_prob=0.0)
    with pytest.raises(ValueError, match="sum to at most 1"):
        MaskedLM(MODEL, OPTIM, SPECIALS, mask_token_prob=0.9, random_token_prob=0.2)


def test_loss_is_over_masked_tokens_and_flops_count_the_sparse_head():
    torch.manual_seed(0)
    module = MaskedLM(MODEL, OPTIM, SPECIALS, data={"seq_len": 32, "vocab_size": VOCAB})
    batch = module.collate_fn()(windows(4, 32))
    loss, n, extra = module.loss(batch)
    logits = module.model(batch["input_ids"])
    labels = batch["labels"]
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, full)
    assert n == int((labels != -100).sum()) and 0 <= extra["acc"] <= 1
    dense = module.flops_per_token({"input_ids": batch["input_ids"], "mlm_positions": torch.arange(4 * 32)})
    assert module.flops_per_token(batch) < dense
    assert module.tokens_in_batch(batch) == 4 * 32


@pytest.mark.parametrize(("precision", "hardware"), PRECISIONS)
def test_mlm_overfits_a_fixed_batch(train_cfg, precision, hardware):
    first, last, acc = overfit(train_cfg, "mlm", precision, hardware, steps=25)
    assert last < 0.3 * first, (precision, first, last)
    assert acc > 0.6


@pytest.mark.slow
def test_mlm_ddp_two_processes(tmp_path, tiny_data):
    ck = ddp_three_steps(tmp_path, tiny_data, "mlm")
    assert ck["hyper_parameters"]["mask_prob"] == 0.15
