"""Generation: KV cache == no cache, batch == single, seeds, EOS and length limits, fill-mask, fill-span,
checkpoint / Hugging Face loading and the command line."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmforge.checkpoints import LoadedModel, load_model
from llmforge.generate import main
from llmforge.inference import (
    Sampling,
    decode_ids,
    fill_mask,
    fill_spans,
    generate_ids,
    generate_text,
    next_tokens,
    split_spans,
)
from llmforge.models.transformer import Encoder, EncoderDecoder, Transformer, TransformerConfig
from llmforge.objectives.denoise import span_corruption_collate
from llmforge.objectives.mlm import mlm_collate

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster, and much faster on a loaded machine (no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(**overrides) -> TransformerConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.1)
    base.update(overrides)
    return TransformerConfig(**base)


def decoder(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small(**overrides)).eval()


def prompts(lengths, seed: int = 0, vocab: int = 97) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding with the training forward on the whole sequence every step."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt) :].tolist()


# -- causal LM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [{}, {"n_heads": 8, "n_kv_heads": 2}, {"tie_embeddings": True}])
def test_kv_cache_gives_the_tokens_of_no_cache(kind):
    model = decoder(**kind)
    for prompt in prompts([1, 5, 13]):
        expected = reference_greedy(model, prompt, 20)
        assert generate_ids(model, [prompt], 20, use_cache=True) == [expected]
        assert generate_ids(model, [prompt], 20, use_cache=False) == [expected]


def test_cached_logits_match_full_forward():
    model = decoder(n_heads=8, n_kv_heads=4)
    from llmforge.models.transformer import KVCache

    x = torch.tensor(prompts([24])[0])[None]
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 1, 24)
        parts = [model(x[:, :9], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(9, 24)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_batch_of_prompts_equals_each_prompt_alone():
    model = decoder(seed=3)
    batch = prompts([3, 11, 1, 7], seed=5)
    alone = [generate_ids(model, [p], 15)[0] for p in batch]
    assert generate_ids(model, batch, 15) == alone
    assert generate_ids(model, batch, 15, use_cache=False) == alone  # padded rows without a cache


def test_same_seed_same_samples_and_global_rng_untouched():
    model = decoder()
    batch = prompts([4, 6])
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9)
    state = torch.get_rng_state()
    a = generate_ids(model, batch, 20, sampling=s, seed=7)
    b = generate_ids(model, batch, 20, sampling=s, seed=7)
    c = generate_ids(model, batch, 20, sampling=s, seed=8)
    assert torch.equal(state, torch.get_rng_state())
    assert a == b and a != c
    assert generate_ids(model, batch, 20, sampling=s, seed=7, use_cache=False) == a


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = decoder()
    batch = prompts([5, 2])
    greedy = generate_ids(model, batch, 10)
    assert generate_ids(model, batch, 10, sampling=Sampling(1.0, top_k=1), seed=1) == greedy
    assert generate_ids(model, batch, 10, sampling=Sampling(1.0, top_p=1e-6), seed=1) == greedy


def test_top_k_and_top_p_filter_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(next_tokens(logits.repeat(64, 1), Sampling(1.0, top_k=2), g)[i]) for i in range(64)}
    assert draws == {0, 1}
    draws = {int(t) for t in next_tokens(logits.repeat(256, 1), Sampling(1.0, top_p=0.7), g)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    draws = {int(t) for t in next_tokens(logits.repeat(256, 1), Sampling(1.0), g, vocab_limit=3)}
    assert draws == {0, 1, 2}


def test_stops_at_eos_and_at_the_length_limit():
    model = decoder(seed=1)
    prompt = prompts([6], seed=2)[0]
    free = generate_ids(model, [prompt], 12)[0]
    assert len(free) == 12  # the length limit
    eos = free[4]
    first = free.index(eos)
    stopped = generate_ids(model, [prompt], 12, eos_id=eos)[0]
    assert stopped == free[: first + 1] and stopped[-1] == eos
    # in a batch, the other row goes on to the limit
    other = prompts([3], seed=9)[0]
    rows = generate_ids(model, [prompt, other], 12, eos_id=eos)
    assert rows[0] == stopped
    alone = generate_ids(model, [other], 12, eos_id=eos)[0]
    assert rows[1] == alone


def test_bad_requests_are_refused():
    model = decoder()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_ids(model, [[5] * 60], 10)
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[]], 3)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=0.0)


# -- fill-in on overfitted tiny models ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tiny_data):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_data / "tokenizer.json"))


def specials_of(tok) -> dict[str, int]:
    from llmforge.prep.tokenizer import special_token_ids

    return special_token_ids(tok)


def windows(ids: list[int], copies: int, eos: int) -> list[dict]:
    return [{"index": i, "tokens": np.array(ids + [eos, eos], dtype=np.int64)} for i in range(copies)]


def overfit(model, batches, steps: int, loss_fn, lr: float = 3e-3) -> None:
    """A few dozen AdamW steps on one sentence."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        loss = loss_fn(model, batches(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def tiny_cfg(tok, **kw) -> TransformerConfig:
    return TransformerConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **kw)


def test_fill_mask_returns_the_planted_token(tok, tiny_data):
    sp = specials_of(tok)
    ids = tok.encode(SENTENCE).ids
    special = np.array(sorted(set(sp.values())))
    random_ids = np.setdiff1d(np.arange(512), special)

    def batch(step):
        return mlm_collate(
            windows(ids, 8, sp["eos"]), seed=step, mask_id=sp["mask"], pad_id=sp["pad"],
            special_ids=special, random_ids=random_ids, mask_prob=0.3,
        )  # fmt: skip

    def loss_fn(model, b):
        logits = model(b["input_ids"], positions=b["mlm_positions"])
        return F.cross_entropy(logits, b["labels"].flatten()[b["mlm_positions"]])

    torch.manual_seed(0)
    model = Encoder(tiny_cfg(tok))
    overfit(model, batch, 100, loss_fn)
    lm = LoadedModel(model, "mlm", sp, tok, {})
    prompt = SENTENCE.replace(" the lazy", "<mask> lazy")
    planted = tok.token_to_id("Ġthe")
    assert tok.encode(prompt).ids == [sp["mask"] if i == planted else i for i in ids]  # one token planted
    result = fill_mask(lm, prompt, top_k=3)
    (cands,) = result["masks"]
    assert cands[0]["id"] == planted and cands[0]["prob"] > 0.5, cands
    assert [c["prob"] for c in cands] == sorted((c["prob"] for c in cands), reverse=True)
    assert result["filled"] == SENTENCE


def test_fill_span_on_an_overfitted_denoiser(tok):
    """A tiny encoder-decoder overfitted to four span corruptions of one sentence (the collator's own) fills
    each sentinel of those inputs, given as text, with the tokens the corruption removed."""
    sp = specials_of(tok)
    ids = tok.encode(SENTENCE).ids
    sentinels = np.array([sp[f"sentinel_{i}"] for i in range(8)])
    rows = [{"index": i, "tokens": np.array(ids + [sp["eos"]], dtype=np.int64)} for i in range(4)]
    batch = span_corruption_collate(
        rows, seed=0, sentinel_ids=sentinels, eos_id=sp["eos"], pad_id=sp["pad"], start_id=sp["bos"],
        noise_density=0.3, mean_span_length=3.0,
    )  # fmt: skip

    def loss_fn(model, b):
        logits = model(b["input_ids"], b["decoder_input_ids"])
        return F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)

    torch.manual_seed(0)
    model = EncoderDecoder(tiny_cfg(tok))
    overfit(model, lambda step: batch, 100, loss_fn)
    lm = LoadedModel(model, "denoise", sp, tok, {"decoder_start_token": "bos"})
    for row in range(4):
        inputs, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        prompt = tok.decode(inputs[:-1], skip_special_tokens=False)  # the collator appended EOS
        assert tok.encode(prompt).ids == inputs[:-1]
        result = fill_spans(lm, prompt, max_new_tokens=20)
        truth = split_spans(labels, sentinels.tolist(), sp["eos"])
        assert len(truth) == 3
        assert result["spans"] == {f"<extra_id_{k}>": tok.decode(v) for k, v in truth.items()}, result
        assert result["filled"] == SENTENCE
    target = decode_ids(model, inputs, start_id=sp["bos"], eos_id=sp["eos"], max_new_tokens=20)
    assert target == labels[: labels.index(sp["eos"]) + 1]  # greedy decode stops at EOS


def test_split_spans():
    assert split_spans([5, 20, 21, 6, 22, 3, 30], [5, 6, 7], eos_id=3) == {0: [20, 21], 1: [22]}
    assert split_spans([99, 6, 22, 6, 23], [5, 6], eos_id=3) == {1: [22]}


# -- loading and the command line -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def clm_run(tiny_data, tmp_path_factory):
    from llmforge.training import run
    from tests.conftest import compose_train

    out = tmp_path_factory.mktemp("gen") / "run"
    cfg = compose_train(
        [f"data.path={tiny_data}", f"run_dir={out}", "model=tiny", "data.seq_len=32", "data.batch_size=4"]
        + ["trainer.enable_progress_bar=false", "debug=fast", "trainer.max_steps=3"]
    )
    return run(cfg)


def test_cli_on_a_lightning_checkpoint(clm_run, capsys):
    argv = [str(clm_run.last_checkpoint), "--prompt", "The function", "--prompt", "Return a"]
    assert main([*argv, "--greedy", "--max-new-tokens", "8", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["The function", "Return a"]
    assert all(1 <= len(r["tokens"]) <= 8 and isinstance(r["completion"], str) for r in lines)
    # the run directory works too, with the same greedy result; sampling is seeded
    assert main([str(clm_run.run_dir), *argv[1:], "--greedy", "--max-new-tokens", "8", "--json"]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == lines
    outs = []
    for _ in range(2):
        assert main([*argv, "--seed", "3", "--max-new-tokens", "8", "--json"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_cli_errors_name_the_problem(clm_run, tmp_path, capsys):
    assert main([str(tmp_path / "nope.ckpt"), "--prompt", "x"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([str(clm_run.last_checkpoint), "--prompt", "x", "--mode", "mlm"]) == 2
    assert "does not match the checkpoint's objective (clm)" in capsys.readouterr().err


def test_hugging_face_directory_gives_the_same_tokens_as_hf_generate(clm_run, tiny_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    lm = load_model(clm_run.last_checkpoint)
    model, cfg = lm.model, lm.model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, eos_token_id=lm.special_tokens["eos"], bos_token_id=None,
        pad_token_id=lm.special_tokens["pad"],
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    sd["lm_head.weight"] = model.head.weight
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = b.attn.qkv.weight.split([d, kv, kv])
        gate, up = b.mlp.gate_up.weight.split(cfg.hidden)
        a = p + "self_attn."
        sd.update({
            a + "q_proj.weight": q, a + "k_proj.weight": k, a + "v_proj.weight": v,
            a + "o_proj.weight": b.attn.out.weight, p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": b.mlp.down.weight,
            p + "input_layernorm.weight": b.attn_norm.weight,
            p + "post_attention_layernorm.weight": b.mlp_norm.weight,
        })  # fmt: skip
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    out = tmp_path / "hf"
    hf.save_pretrained(out)
    shutil.copy(tiny_data / "tokenizer.json", out / "tokenizer.json")
    loaded = load_model(out)
    assert loaded.objective == "clm" and loaded.special_tokens == {
        k: v for k, v in lm.special_tokens.items() if not k.startswith("sentinel")
    }
    assert generate_text(loaded, ["The"], 5) == generate_text(lm, ["The"], 5)  # greedy, tokenizer found
    prompt = prompts([9], vocab=cfg.vocab_size)[0]
    ours = generate_ids(loaded.model, [prompt], 12)[0]
    assert ours == generate_ids(model, [prompt], 12)[0]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=None
        )
    assert ours == ref[0, len(prompt) :].tolist()


@pytest.mark.slow
def test_fsdp_run_samples_then_consolidated_checkpoint_generates_and_evaluates(tmp_path, tiny_data, fsdp_run):
    """strategy=fsdp on 2 processes (tests/conftest.py `fsdp_run`: 2 steps, resumed to 4): SampleText
    gathers the sharded weights on every rank (no hang) and rank 0 writes; the sharded checkpoint is refused
    with the consolidate command, the consolidated one generates and evaluates."""
    from tests.conftest import run_cli
    from tests.test_sample_text import text_events

    run_dir = tmp_path / "fsdp"
    shutil.copytree(fsdp_run.run_dir, run_dir)  # the evaluation writes into the run directory
    texts = text_events(run_dir)
    assert sorted(texts["samples/clm"]) == [1, 2, 3, 4]
    sharded = run_dir / "checkpoints" / "last.ckpt"
    assert sharded.is_dir()
    with pytest.raises(ValueError, match="python -m llmforge.consolidate"):
        load_model(run_dir)
    consolidated = run_dir / "checkpoints" / "last.consolidated.ckpt"  # python -m llmforge.consolidate
    lm = load_model(consolidated)
    (row,) = generate_text(lm, ["The"], 5)
    assert len(row["tokens"]) >= 1
    args = (str(consolidated), f"data={tiny_data}", "--limit-batches", "20", "--no-progress")  # of 306
    proc = run_cli("llmforge.evaluate", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((run_dir / "eval" / "last.consolidated-val.json").read_text())
    assert math.isfinite(saved["loss"]) and saved["batch_size"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_on_gpu(dtype):
    model = decoder(n_heads=8, n_kv_heads=2).to("cuda", dtype)
    batch = prompts([3, 11, 6])
    cached = generate_ids(model, batch, 12)
    if dtype == torch.float32:
        assert cached == generate_ids(model, batch, 12, use_cache=False)
        assert cached == [generate_ids(model, [p], 12)[0] for p in batch]
    s = Sampling(temperature=1.0, top_k=20)
    assert generate_ids(model, batch, 12, sampling=s, seed=3) == generate_ids(
        model, batch, 12, sampling=s, seed=3
    )
    assert all(len(row) == 12 for row in cached)
