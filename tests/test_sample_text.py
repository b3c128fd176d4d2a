"""SampleText: samples in TensorBoard's Text tab for each objective; training itself is unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from llmforge.callbacks.sample_text import SampleText, with_placeholder
from llmforge.curves import read_scalars
from llmforge.training import run


def text_events(run_dir) -> dict[str, dict[int, str]]:
    """tag -> {step: text} of the text-plugin summaries in the run's TensorBoard events."""
    (events,) = {p.parent for p in run_dir.glob("tb/**/events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        if tag.startswith("samples/"):  # add_text(tag) is stored as "<tag>/text_summary"
            out[tag.removesuffix("/text_summary")] = {
                e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(tag)
            }
    return out


def sampled_run(train_cfg, tmp_path, objective: str, *extra: str, name: str = "run"):
    return run(
        train_cfg(
            f"objective={objective}",
            "debug=fast",
            "trainer.max_steps=4",
            "callbacks.sample_text.every_n_steps=2",
            "callbacks.sample_text.max_new_tokens=6",
            "callbacks.sample_text.prompts=[The,This module provides]",
            *extra,
            run_dir=tmp_path / f"{objective}-{name}",
        )
    )


@pytest.mark.parametrize(
    ("objective", "marker"), [("clm", "**The**"), ("mlm", "&lt;mask&gt;"), ("denoise", "&lt;extra_id_0&gt;")]
)
def test_samples_reach_tensorboard_as_text(train_cfg, tmp_path, objective, marker):
    result = sampled_run(train_cfg, tmp_path, objective)
    texts = text_events(result.run_dir)
    assert set(texts) == {f"samples/{objective}"}
    by_step = texts[f"samples/{objective}"]
    assert sorted(by_step) == [2, 4]
    for text in by_step.values():
        assert marker in text and "This module" in text
        assert len(text.split("\n\n")) == 2  # one paragraph per prompt


def test_sampling_leaves_training_bitwise_unchanged(train_cfg, tmp_path):
    """Sampled (not greedy) text every step; the losses and final weights equal a run without the callback."""
    sampling = ("callbacks.sample_text.every_n_steps=1", "callbacks.sample_text.temperature=1.0")
    with_cb = sampled_run(train_cfg, tmp_path, "clm", *sampling, "data.seed=5", name="with")
    without = sampled_run(
        train_cfg, tmp_path, "clm", "callbacks.sample_text=null", "data.seed=5", name="without"
    )
    assert sorted(text_events(with_cb.run_dir)["samples/clm"]) == [1, 2, 3, 4]
    assert text_events(without.run_dir) == {}
    a, b = read_scalars(with_cb.run_dir)["train/loss"], read_scalars(without.run_dir)["train/loss"]
    assert a == b and len(a) == 4
    wa = torch.load(with_cb.last_checkpoint, weights_only=False)["state_dict"]
    wb = torch.load(without.last_checkpoint, weights_only=False)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_model_back_in_train_mode_and_global_rng_untouched(tiny_data):
    from llmforge.data.shards import read_manifest
    from llmforge.objectives.clm import CausalLM

    specials = read_manifest(tiny_data)["special_tokens"]
    model = {"vocab_size": 576, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64}
    module = CausalLM(model, {}, specials, data={"path": str(tiny_data)}).train()
    written = []
    writer = SimpleNamespace(add_text=lambda tag, text, global_step: written.append((tag, global_step, text)))
    trainer = SimpleNamespace(
        global_step=3, is_global_zero=True, strategy=object(), loggers=[SimpleNamespace(experiment=writer)]
    )
    cb = SampleText(prompts=["The"], every_n_steps=3, max_new_tokens=4, temperature=0.9, top_k=10)
    state = torch.get_rng_state()
    cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_batch_end(trainer, module, None, None, 1)  # same step (gradient accumulation): once
    trainer.global_step = 4
    cb.on_train_batch_end(trainer, module, None, None, 2)  # not a multiple of 3
    assert torch.equal(state, torch.get_rng_state())
    assert module.model.training
    assert [(tag, step) for tag, step, _ in written] == [("samples/clm", 3)]
    trainer.is_global_zero, trainer.global_step = False, 6
    cb.on_train_batch_end(trainer, module, None, None, 3)
    assert len(written) == 1  # rank 0 only


def test_placeholders_and_bad_settings():
    assert with_placeholder("This module provides", "<mask>") == "This module<mask>"
    assert with_placeholder("The", "<extra_id_0>") == "The<extra_id_0>"
    assert with_placeholder("a <mask> b", "<mask>") == "a <mask> b"
    assert with_placeholder("a<extra_id_1> b", "<extra_id_0>") == "a<extra_id_1> b"
    with pytest.raises(ValueError, match="every_n_steps"):
        SampleText(every_n_steps=0)
