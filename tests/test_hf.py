"""Hugging Face interop: export to LlamaForCausalLM and import back, with fp32 logit parity (1e-4)."""

from __future__ import annotations

import json

import pytest
import torch

from llmforge.checkpoints import load_checkpoint
from llmforge.export import main as export_main
from llmforge.hf import from_hf, to_hf
from llmforge.models.transformer import Transformer, TransformerConfig
from llmforge.training import run

transformers = pytest.importorskip("transformers")  # in the dev extra: installed in CI
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

ATOL = 1e-4

CONFIGS = {
    "mha": dict(),
    "gqa": dict(n_heads=8, n_kv_heads=2),
    "tied_theta_eps": dict(tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-6, ffn_hidden=96),
}


def small(**overrides) -> TransformerConfig:
    return TransformerConfig(
        **{**dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=64), **overrides}
    )


def random_model(cfg: TransformerConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def logits_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers_with_same_logits(name, tmp_path):
    cfg = small(**CONFIGS[name])
    model = random_model(cfg)
    to_hf(model, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == cfg.rope_theta and config["rms_norm_eps"] == cfg.norm_eps
    assert config["tie_word_embeddings"] == cfg.tie_embeddings
    assert config["num_key_value_heads"] == cfg.kv_heads and config["intermediate_size"] == cfg.hidden
    assert config["vocab_size"] == 97 and config["max_position_embeddings"] == 64
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.rms_norm_eps == cfg.norm_eps
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        logits_close(hf(tokens).logits, model(tokens))
    # and back: the same tensors
    cfg2, sd = from_hf(tmp_path)
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "hidden", "tie_embeddings"):
        assert getattr(cfg2, key) == getattr(cfg, key), key
    assert (cfg2.rope_theta, cfg2.norm_eps) == (cfg.rope_theta, cfg.norm_eps)
    for key, value in model.state_dict().items():
        assert torch.equal(sd[key], value), key


def hf_tiny(path, **overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama, saved with save_pretrained (model=tiny's shape at vocab 512)."""
    kw = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_import_from_transformers_has_same_logits(tmp_path, tied):
    hf = hf_tiny(tmp_path, tie_word_embeddings=tied, rope_theta=50000.0)
    cfg, sd = from_hf(tmp_path)
    assert cfg.tie_embeddings == tied and cfg.rope_theta == 50000.0 and cfg.n_kv_heads == 2
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    tokens = torch.randint(0, 512, (2, 50))
    with torch.no_grad():
        logits_close(model(tokens), hf(tokens).logits)


def test_unsupported_llama_features_are_refused(tmp_path):
    hf_tiny(tmp_path, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias=True is not supported"):
        from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path / "nothing")


# -- checkpoints, the command line, init_from ----------------------------------------------------------
@pytest.fixture(scope="module")
def clm_ckpt(tiny_data, tmp_path_factory):
    from tests.conftest import compose_train

    run_dir = tmp_path_factory.mktemp("clm")
    cfg = compose_train(
        [
            f"data.path={tiny_data}",
            f"run_dir={run_dir}",
            "model=tiny",
            "model.n_kv_heads=2",
            "data.seq_len=32",
            "data.batch_size=4",
            "debug=fast",
        ]
    )
    return run(cfg).last_checkpoint


def test_export_cli_from_a_trained_checkpoint(clm_ckpt, tiny_data, tmp_path):
    out = tmp_path / "hf"
    assert export_main([str(clm_ckpt), str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "special_tokens_map.json" in names and "generation_config.json" in names
    cfg, sd, hp = load_checkpoint(clm_ckpt)
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        logits_close(hf(tokens).logits, model(tokens))
    # the tokenizer: the data's ids, its special tokens, and the config's token ids agree
    from tokenizers import Tokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    text = "def main():\n    return sorted(items, key=len)"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text, add_special_tokens=False).ids
    assert (
        tok.eos_token == "<eos>" and tok.eos_token_id == hf.config.eos_token_id == hp["special_tokens"]["eos"]
    )
    assert tok.pad_token_id == hf.config.pad_token_id == hp["special_tokens"]["pad"]
    assert tok.decode(tok(text)["input_ids"]) == text


def test_export_finds_the_tokenizer_of_a_relative_data_path(tiny_data, tmp_path, monkeypatch, capsys):
    """data.path relative to the directory training ran in: export from elsewhere reads run_manifest.json."""
    from tests.conftest import compose_train

    monkeypatch.chdir(tiny_data.parent)
    result = run(
        compose_train(
            [f"data.path={tiny_data.name}", f"run_dir={tmp_path / 'run'}", "model=tiny", "data.seq_len=32"]
            + ["data.batch_size=4", "debug=fast", "trainer.max_steps=1"]
        )
    )
    monkeypatch.chdir(tmp_path)
    assert export_main([str(result.last_checkpoint), "out"]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tiny_data / "tokenizer.json").read_bytes()


def test_export_refuses_mlm_and_sharded_checkpoints(train_cfg, tmp_path, capsys):
    mlm = run(train_cfg("objective=mlm", "debug=fast", "trainer.max_steps=1", run_dir=tmp_path / "mlm"))
    assert export_main([str(mlm.last_checkpoint), str(tmp_path / "out"), "--no-tokenizer"]) == 2
    assert "objective=mlm checkpoint: only the causal LM (objective=clm)" in capsys.readouterr().err
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    assert export_main([str(sharded), str(tmp_path / "out")]) == 2
    assert "neither a checkpoint file nor a Hugging Face model directory" in capsys.readouterr().err
    (sharded / ".metadata").write_bytes(b"")  # what torch.distributed.checkpoint writes
    assert export_main([str(sharded), str(tmp_path / "out")]) == 2
    assert "python -m llmforge.consolidate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="only the causal LM"):
        from llmforge.models.transformer import Encoder

        to_hf(Encoder(small()), None, tmp_path / "enc")


def final_model(result) -> Transformer:
    cfg, sd, _ = load_checkpoint(result.last_checkpoint)
    model = Transformer(cfg).eval()
    model.load_state_dict(sd)
    return model


FROZEN = (
    "trainer.max_steps=1",
    "optim.lr=0",
    "optim.warmup_steps=0",
    "debug=fast",
)  # lr 0: weights unchanged


def test_init_from_hf_directory_trains_from_its_weights(train_cfg, tmp_path):
    hf = hf_tiny(tmp_path / "llama")
    result = run(
        train_cfg(f"init_from={tmp_path / 'llama'}", "model.n_kv_heads=2", *FROZEN, run_dir=tmp_path / "r")
    )
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        logits_close(final_model(result)(tokens), hf(tokens).logits)


def test_init_from_llmforge_checkpoint(clm_ckpt, train_cfg, tmp_path):
    result = run(train_cfg(f"init_from={clm_ckpt}", "model.n_kv_heads=2", *FROZEN, run_dir=tmp_path / "r"))
    tokens = torch.randint(0, 512, (2, 32))
    source = final_model(type("R", (), {"last_checkpoint": clm_ckpt}))
    with torch.no_grad():
        logits_close(final_model(result)(tokens), source(tokens))


def test_init_from_mismatch_names_both_shapes(train_cfg, tmp_path):
    hf_tiny(tmp_path / "llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(ValueError) as err:
        run(train_cfg(f"init_from={tmp_path / 'llama'}", *FROZEN, run_dir=tmp_path / "r"))
    message = str(err.value)
    assert "this run has d_model=64" in message and "the source has d_model=32" in message
    assert "model.d_model=32" in message
    hf_tiny(tmp_path / "plain")  # a standard-parameterisation model into a µP run: its scales would differ
    mup = ("model.n_kv_heads=2", "model.mup=true", "model.mup_base_width=32")
    with pytest.raises(ValueError) as err:
        run(train_cfg(f"init_from={tmp_path / 'plain'}", *mup, *FROZEN, run_dir=tmp_path / "r3"))
    assert "this run has width_mult=2.0" in str(err.value) and "model.mup=false" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        run(train_cfg(f"init_from={tmp_path / 'missing.ckpt'}", *FROZEN, run_dir=tmp_path / "r2"))


@pytest.mark.slow
def test_init_from_hf_under_fsdp_then_consolidate_and_export(tmp_path, tiny_data):
    """Two FSDP ranks start from a Hugging Face Llama; the consolidated checkpoint exports back to it."""
    from llmforge.checkpoints import consolidate
    from tests.conftest import run_cli

    hf = hf_tiny(tmp_path / "llama")
    run_dir = tmp_path / "run"
    proc = run_cli(
        "llmforge.train",
        "strategy=fsdp",
        "hardware.devices=2",
        "model=tiny",
        "model.n_kv_heads=2",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "data.batch_size=4",
        f"run_dir={run_dir}",
        f"init_from={tmp_path / 'llama'}",
        *FROZEN,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = consolidate(run_dir / "checkpoints" / "last.ckpt", tmp_path / "full.ckpt")
    assert export_main([str(ckpt), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    back = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        logits_close(back(tokens).logits, hf(tokens).logits)
