"""Document masking in packed windows (``data.document_mask``): document ids and positions from EOS, and
the equality that defines it: a packed window's logits (clm, mlm) and a denoise batch's loss equal those of
each document run alone; the flex-attention block-mask path equals the dense SDPA path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmforge.data.documents import document_ids, document_positions
from llmforge.models.transformer import Encoder, EncoderDecoder, Transformer, TransformerConfig
from llmforge.objectives.clm import clm_collate
from llmforge.objectives.denoise import infill_collate, span_corruption_collate
from llmforge.objectives.mlm import mlm_collate

VOCAB, PAD, BOS, EOS, MASK = 211, 0, 2, 3, 4
SENTINELS = np.arange(5, 45)
SPECIAL = np.arange(0, 45)


def cfg(**kw) -> TransformerConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    return TransformerConfig(**(base | kw))


def packed(rows: list[list[int]], seq_len: int, seed: int = 0) -> list[dict]:
    """Windows of seq_len + 1 tokens: documents of the given lengths (each ended by EOS), then padding."""
    rng = np.random.default_rng(seed)
    out = []
    for i, lengths in enumerate(rows):
        stream = []
        for n in lengths:
            stream += list(rng.integers(45, VOCAB, size=n - 1)) + [EOS]
        window = np.full(seq_len + 1, -1, dtype=np.int64)
        window[: min(len(stream), seq_len + 1)] = stream[: seq_len + 1]
        out.append({"index": i, "tokens": window})
    return out


def test_document_ids_and_positions_from_eos():
    tokens = np.array([[7, 3, 8, 9, 3, 5, 6, 0]])
    valid = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], dtype=bool)
    docs = document_ids(tokens, eos_id=3, valid=valid)
    assert docs.tolist() == [[0, 0, 1, 1, 1, 2, -1, -1]]  # EOS ends (belongs to) its document
    assert document_positions(docs).tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]


def test_collate_adds_documents_only_when_asked():
    samples = packed([[5, 9, 20], [40]], seq_len=32)
    plain = clm_collate(samples, pad_id=PAD)
    assert "doc_ids" not in plain and "position_ids" not in plain
    cont = clm_collate(samples, pad_id=PAD, document_eos_id=EOS)
    assert "position_ids" not in cont
    reset = clm_collate(samples, pad_id=PAD, document_eos_id=EOS, reset_positions=True)
    assert torch.equal(reset["input_ids"], plain["input_ids"]) and torch.equal(
        reset["labels"], plain["labels"]
    )
    assert reset["doc_ids"][0, :5].tolist() == [0] * 5 and reset["doc_ids"][0, 5].item() == 1
    assert reset["position_ids"][0, :7].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert (reset["doc_ids"][1] == 0).all()  # one document longer than the window


def runs(doc_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every real document run in a batch of doc ids."""
    out = []
    for r, row in enumerate(doc_ids.tolist()):
        start = 0
        for i in range(1, len(row) + 1):
            if i == len(row) or row[i] != row[start]:
                if row[start] >= 0:
                    out.append((r, start, i))
                start = i
    return out


ROWS = [[5, 9, 1, 20], [40], [3, 12, 6]]  # a one-token document, one longer than the window, padding


@pytest.mark.parametrize("model_cls", [Transformer, Encoder])
def test_packed_logits_equal_each_document_alone(model_cls):
    torch.manual_seed(0)
    model = model_cls(cfg()).eval()
    batch = clm_collate(packed(ROWS, seq_len=32), pad_id=PAD, document_eos_id=EOS, reset_positions=True)
    tokens, docs, pos = batch["input_ids"], batch["doc_ids"], batch["position_ids"]
    with torch.no_grad():
        if model_cls is Transformer:
            logits = model(tokens, positions=pos, doc_ids=docs)
            unmasked = model(tokens)
        else:
            logits = model(tokens, position_ids=pos, doc_ids=docs)
            unmasked = model(tokens)
        pieces = runs(docs)
        assert len(pieces) == 8
        for r, a, b in pieces:
            alone = model(tokens[r : r + 1, a:b])[0]
            torch.testing.assert_close(logits[r, a:b], alone, atol=1e-5, rtol=0)
    # without the mask, the documents after the first one of a row see their predecessors
    r, a, b = pieces[1]
    assert (logits[r, a:b] - unmasked[r, a:b]).abs().max() > 1e-3


@pytest.mark.parametrize("model_cls", [Transformer, Encoder])
def test_packed_logits_equal_each_document_alone_in_bf16(model_cls):
    """bf16 on CPU takes the explicit attention path (softmax in fp32) with the same document mask: a
    packed document's logits equal its logits alone to bf16 rounding (measured: bitwise), while without
    the mask a later document's logits move by ~0.15 (mean |logit| ~0.09)."""
    torch.manual_seed(0)
    model = model_cls(cfg()).eval().to(torch.bfloat16)
    batch = clm_collate(packed(ROWS, seq_len=32), pad_id=PAD, document_eos_id=EOS, reset_positions=True)
    tokens, docs, pos = batch["input_ids"], batch["doc_ids"], batch["position_ids"]
    with torch.no_grad():
        kw = {"positions": pos} if model_cls is Transformer else {"position_ids": pos}
        logits, unmasked = model(tokens, doc_ids=docs, **kw), model(tokens)
        assert logits.dtype == torch.bfloat16
        moved = 0.0
        for r, a, b in runs(docs):
            alone = model(tokens[r : r + 1, a:b])[0]
            torch.testing.assert_close(logits[r, a:b], alone, atol=2e-3, rtol=0)
            moved = max(moved, (unmasked[r, a:b] - alone).abs().max().item())
    assert moved > 0.05


def test_mlm_batch_logits_equal_each_document_alone():
    torch.manual_seed(1)
    model = Encoder(cfg()).eval()
    random_ids = np.arange(45, VOCAB)
    batch = mlm_collate(
        packed(ROWS, seq_len=32, seed=3),
        seed=5,
        mask_id=MASK,
        pad_id=PAD,
        special_ids=SPECIAL,
        random_ids=random_ids,
        document_eos_id=EOS,
        reset_positions=True,
    )
    tokens, docs = batch["input_ids"], batch["doc_ids"]
    with torch.no_grad():
        logits = model(tokens, batch.get("attention_mask"), None, batch["position_ids"], docs)
        for r, a, b in runs(docs):
            torch.testing.assert_close(logits[r, a:b], model(tokens[r : r + 1, a:b])[0], atol=1e-5, rtol=0)
        # the sparse head over the selected positions gives the same rows
        sparse = model(tokens, None, batch["mlm_positions"], batch["position_ids"], docs)
        torch.testing.assert_close(sparse, logits.flatten(0, 1)[batch["mlm_positions"]], atol=1e-6, rtol=0)


def denoise_batch(variant: str, seq_len: int = 48) -> dict:
    samples = packed([[5, 9, 2, 30], [60], [10, 3, 3, 20]], seq_len=seq_len, seed=4)
    common = dict(seed=9, pad_id=PAD, start_id=BOS, document_eos_id=EOS, reset_positions=True)
    if variant == "span":
        return span_corruption_collate(
            samples, sentinel_ids=SENTINELS, eos_id=EOS, noise_density=0.3, **common
        )
    return infill_collate(samples, mask_id=MASK, noise_density=0.3, mean_span_length=2.0, **common)


@pytest.mark.parametrize("variant", ["span", "infill"])
def test_denoise_loss_equals_the_per_document_computation(variant):
    torch.manual_seed(2)
    model = EncoderDecoder(cfg(n_decoder_layers=2)).eval()
    batch = denoise_batch(variant)
    keys = ("position_ids", "doc_ids", "decoder_position_ids", "decoder_doc_ids")
    with torch.no_grad():
        logits = model(
            batch["input_ids"],
            batch["decoder_input_ids"],
            batch.get("attention_mask"),
            **{k: batch[k] for k in keys},
        )
        labels = batch["labels"]
        loss = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
        total, count, docs_seen = 0.0, 0, 0
        x_doc, y_doc = batch["doc_ids"], batch["decoder_doc_ids"]
        for r in range(labels.shape[0]):
            for d in torch.unique(y_doc[r][y_doc[r] >= 0]).tolist():
                enc = batch["input_ids"][r][x_doc[r] == d]
                dec = batch["decoder_input_ids"][r][y_doc[r] == d]
                lab = labels[r][y_doc[r] == d]
                assert enc.numel() > 0 and dec[0].item() == BOS  # each document decoded from the start
                alone = model(enc[None], dec[None])[0]
                total += F.cross_entropy(alone, lab, ignore_index=-100, reduction="sum").item()
                count += int((lab != -100).sum())
                docs_seen += 1
    assert docs_seen > labels.shape[0]  # some rows hold several documents
    assert count == int((labels != -100).sum())
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


def forward(model, batch: dict) -> torch.Tensor:
    """A model's output on a document-masked batch (clm_collate's or a denoise collate's)."""
    if isinstance(model, EncoderDecoder):
        keys = ("position_ids", "doc_ids", "decoder_position_ids", "decoder_doc_ids")
        return model(batch["input_ids"], batch["decoder_input_ids"], None, **{k: batch[k] for k in keys})
    if isinstance(model, Encoder):
        return model(batch["input_ids"], None, None, batch["position_ids"], batch["doc_ids"])
    return model(batch["input_ids"], positions=batch["position_ids"], doc_ids=batch["doc_ids"])


def test_flex_block_masks_equal_the_dense_masks_on_cpu():
    """flex_attention runs forward only on CPU (eager): the CUDA path's block masks give the dense path's
    results, for causal self-attention, bidirectional, and the decoder's self- and cross-attention."""
    torch.manual_seed(3)
    clm = clm_collate(packed(ROWS, seq_len=32), pad_id=PAD, document_eos_id=EOS, reset_positions=True)
    one = cfg(n_layers=1)  # eager flex attention is slow on CPU
    for model, batch in (
        (Transformer(one).eval(), clm),
        (Encoder(one).eval(), clm),
        (EncoderDecoder(one).eval(), denoise_batch("span")),
    ):
        with torch.no_grad():
            dense = forward(model, batch)
            model.flex_attention = True
            flex = forward(model, batch)
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("model_cls", [Transformer, Encoder])
def test_flex_on_cuda_matches_dense_forward_and_backward(model_cls):
    torch.manual_seed(0)
    model = model_cls(cfg()).cuda()
    batch = clm_collate(packed(ROWS * 4, seq_len=96), pad_id=PAD, document_eos_id=EOS, reset_positions=True)
    tokens, pos, docs = (batch[k].cuda() for k in ("input_ids", "position_ids", "doc_ids"))

    def step(flex: bool):
        model.zero_grad()
        model.flex_attention = flex
        out = model.trunk(tokens, None, pos, docs)
        out.float().pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    dense, g_dense = step(False)
    flex, g_flex = step(True)
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)
    for a, b in zip(g_flex, g_dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("objective", ["clm", "mlm", "denoise"])
def test_training_with_document_masking(train_cfg, objective):
    from llmforge.training import run

    cfg = train_cfg(
        f"objective={objective}",
        "data.document_mask=true",
        "data.document_positions=reset",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "callbacks.sample_text=null",
    )
    result = run(cfg)
    assert result.global_step == 3
    assert np.isfinite(result.metrics["train/loss"]) and np.isfinite(result.metrics["val/loss"])


def test_document_positions_is_checked(train_cfg):
    from llmforge.config import validate

    with pytest.raises(ValueError, match="data.document_positions"):
        validate(train_cfg("data.document_mask=true", "data.document_positions=restart"))


@pytest.mark.parametrize("objective", ["clm", "mlm", "denoise"])
@pytest.mark.parametrize("positions", ["continue", "reset"])
def test_the_objectives_collate_carries_documents_only_when_asked(train_cfg, objective, positions):
    """The wiring from the config keys to the batch: ``data.document_mask`` gives every objective's
    collate the EOS id (its documents), ``document_positions=reset`` adds the RoPE positions."""
    from llmforge.data.shards import read_manifest
    from llmforge.training import build_module
    from tests.conftest import random_windows

    def batch_keys(*overrides: str) -> tuple[set, dict]:
        cfg = train_cfg(f"objective={objective}", *overrides)
        module = build_module(cfg, read_manifest(cfg.data.path))
        eos = module.special_tokens["eos"]
        samples = random_windows(4, 32, low=max(module.special_tokens.values()) + 1, high=400, eos=eos)
        batch = module.collate_fn()(samples)
        return set(batch), batch

    plain, _ = batch_keys()
    assert not {k for k in plain if "doc_ids" in k or "position_ids" in k}
    keys, batch = batch_keys("data.document_mask=true", f"data.document_positions={positions}")
    want = {"doc_ids"} | ({"position_ids"} if positions == "reset" else set())
    if objective == "denoise":
        want |= {f"decoder_{k}" for k in want}
    assert keys - plain == want
    assert (batch["doc_ids"].max(dim=1).values > 0).any()  # the EOS tokens split the windows
