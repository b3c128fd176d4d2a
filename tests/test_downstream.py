"""lm-evaluation-harness on llmforge checkpoints: parity with lm-eval's own `hf` model on the exported
checkpoint, request by request; the three request types; the command lines; refusals. Offline: every task
here is written by the test (``dataset_path: json`` over local files) or shipped in llmforge."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from llmforge.downstream.adapter import LlmforgeLM  # noqa: E402
from llmforge.downstream.harness import run_tasks, scores  # noqa: E402
from llmforge.training import run  # noqa: E402
from tests.conftest import compose_train, run_cli  # noqa: E402

MC_ITEMS = [
    {
        "question": "The function dumps() is defined in the Python module",
        "choices": ["json", "os", "re"],
        "answer": 0,
    },
    {
        "question": "Return the sorted list of",
        "choices": ["items", "the keys", "values in order"],
        "answer": 1,
    },
    {"question": "def main():\n    return", "choices": ["None", " sorted(items)", "x"], "answer": 2},
    {"question": "import", "choices": [" os", " sys", " json"], "answer": 0},
]
TEXTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "The module provides functions for working with paths.\n\n" * 12,  # longer than seq: several windows
    "x",
]


def write_tasks(directory) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in MC_ITEMS))
    (directory / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (directory / "gen.jsonl").write_text(
        "".join(json.dumps({"prompt": t[:20], "answer": t[20:30]}) + "\n" for t in TEXTS[:2])
    )
    common = "test_split: test\nmetadata:\n  version: 1.0\n"
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'mc.jsonl'}\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (directory / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'texts.jsonl'}\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (directory / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {directory / 'gen.jsonl'}\n" + common + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.fixture(scope="module")
def ckpts(tiny_data, tmp_path_factory):
    """A clm checkpoint trained a few steps (seq 64: the rolling text takes several windows), an mlm one."""
    out = {}
    for objective in ("clm", "mlm"):
        run_dir = tmp_path_factory.mktemp(objective)
        cfg = compose_train(
            [
                f"data.path={tiny_data}",
                f"run_dir={run_dir}",
                "model=tiny",
                "model.max_seq_len=64",
                f"objective={objective}",
                "data.seq_len=32",
                "data.batch_size=4",
                "debug=fast",
                "trainer.max_steps=4",
            ]
        )
        out[objective] = run(cfg).last_checkpoint
    return out


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    write_tasks(d)
    return d


def samples(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_loglikelihoods_equal_lm_evals_hf_model_on_the_export(ckpts, tasks_dir, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from llmforge.export import main as export_main

    hf_dir = tmp_path / "hf"
    assert export_main([str(ckpts["clm"]), str(hf_dir)]) == 0
    ours = LlmforgeLM(checkpoint=str(ckpts["clm"]), batch_size=3)
    eos = ours.eot_token_id
    theirs = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=3, prefix_token_id=eos)
    tasks = ["tiny_mc", "tiny_rolling"]
    a = run_tasks(ours, tasks, include_path=tasks_dir, log_samples=True)
    b = run_tasks(theirs, tasks, include_path=tasks_dir, log_samples=True)
    n = 0
    for task in tasks:
        for ra, rb in zip(samples(a, task), samples(b, task), strict=True):
            for xa, xb in zip(ra, rb, strict=True):
                va = xa[0][0] if isinstance(xa[0], (list, tuple)) else xa[0]
                vb = xb[0][0] if isinstance(xb[0], (list, tuple)) else xb[0]
                assert va == pytest.approx(vb, abs=1e-4), (task, va, vb)
                n += 1
    assert n == sum(len(i["choices"]) for i in MC_ITEMS) + len(TEXTS)
    # the rolling text longer than max_seq_len really was split into several windows
    assert len(ours.tok_encode(TEXTS[1])) > ours.max_length
    sa, sb = scores(a), scores(b)
    assert sa["tiny_mc/acc"] == sb["tiny_mc/acc"]
    assert sa["tiny_rolling/bits_per_byte"] == pytest.approx(sb["tiny_rolling/bits_per_byte"], rel=1e-5)


def test_loglikelihood_matches_a_direct_forward(ckpts):
    lm = LlmforgeLM(checkpoint=str(ckpts["clm"]), batch_size=2)
    context, continuation = "Return the sorted", " list of items"
    whole = lm.tok_encode(context + continuation)
    ctx = lm.tok_encode(context)
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = lm.model(torch.tensor([whole[:-1]])).log_softmax(-1)[0]
    expected = sum(float(logits[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    ((got, _),) = lm._loglikelihood_tokens([(None, ctx, cont)])
    assert got == pytest.approx(expected, abs=1e-5)
    # batching and ordering do not change a request's score
    many = lm._loglikelihood_tokens([(None, ctx, cont), (None, whole[:3], whole[3:5]), (None, ctx, cont)])
    assert many[0][0] == pytest.approx(expected, abs=1e-5) and many[2][0] == pytest.approx(expected, abs=1e-5)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(ckpts, tasks_dir):
    from llmforge.inference import generate_ids

    lm = LlmforgeLM(checkpoint=str(ckpts["clm"]), batch_size=2)
    results = run_tasks(lm, ["tiny_gen"], include_path=tasks_dir, log_samples=True)
    outs = [r[0][0] if isinstance(r[0], list) else r[0] for r in samples(results, "tiny_gen")]
    for text, out in zip(TEXTS[:2], outs, strict=True):
        ids = generate_ids(
            lm.model, [[lm.eot_token_id] + lm.tok_encode(text[:20])], 6, eos_id=lm.eot_token_id
        )[0]
        expected = lm.tok_decode([t for t in ids if t != lm.eot_token_id]).split("\n")[0]
        assert out == expected
    assert "tiny_gen/exact_match" in scores(results)


def test_the_shipped_stdlib_task_runs_offline(ckpts):
    lm = LlmforgeLM(checkpoint=str(ckpts["clm"]), batch_size=8)
    out = scores(run_tasks(lm, ["llmforge_stdlib"], limit=8))
    assert 0.0 <= out["llmforge_stdlib/acc"] <= 1.0 and "llmforge_stdlib/acc_norm" in out


def test_mlm_checkpoints_are_refused_in_one_line(ckpts):
    with pytest.raises(ValueError, match="mlm checkpoint cannot answer"):
        LlmforgeLM(checkpoint=str(ckpts["mlm"]))


@pytest.mark.slow
def test_lm_eval_command_line_with_the_llmforge_model(ckpts, tasks_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli(
        "llmforge.lm_eval",
        "--model", "llmforge",
        "--model_args", f"checkpoint={ckpts['clm']}",
        "--batch_size", "4",
        "--tasks", "tiny_mc",
        "--include_path", str(tasks_dir),
        "--output_path", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tiny_mc" in r.stdout and "acc" in r.stdout
    files = list(out.rglob("results_*.json"))
    assert files and "tiny_mc" in json.loads(files[0].read_text())["results"]


# -- decontamination -----------------------------------------------------------------------------------
def test_decontamination_drops_a_planted_task_item_and_counts_it_per_task(tasks_dir, tmp_path, capsys):
    from llmforge.prep.text import stdlib_documents

    item = MC_ITEMS[0]
    planted = f"{item['question']} {item['choices'][item['answer']]}."
    docs = [t for _, (_, t) in zip(range(6), stdlib_documents(), strict=False)]
    src = tmp_path / "in"
    src.mkdir()
    for i, text in enumerate(docs):
        (src / f"{i}.txt").write_text(text)
    (src / "leak.txt").write_text(docs[0][:400] + "\n\nQuiz. " + planted.upper() + "\n\n" + docs[1][:400])
    out = tmp_path / "ds"
    args = [
        "pipeline=text",
        "progress=false",
        f"input={src}/*.txt",
        f"output_dir={out}",
        "tokenizer.vocab_size=400",
        "tokenizer.num_sentinels=4",
        "filters.decontaminate.enabled=true",
        "filters.decontaminate.tasks=[tiny_mc,tiny_rolling]",
        f"filters.decontaminate.include_path={tasks_dir}",
    ]
    proc = run_cli("llmforge.prepare", *args, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["decontaminated_against"] == ["tiny_mc", "tiny_rolling"]
    stats = json.loads((out / "stats.json").read_text())
    text = json.dumps(stats)
    assert '"decontaminate:tiny_mc": 1' in text, text[:3000]
    assert "decontaminate:tiny_rolling" not in text
    sample = out / "dropped" / "decontaminate" / "decontaminate_tiny_mc.jsonl"
    assert sample.is_file() and "leak.txt" in sample.read_text()
    assert manifest["source"]["funnel"]["decontaminate"]["dropped"] == {"decontaminate:tiny_mc": 1}
    # the run trained on it records the tasks; evaluate warns only about the task it was not cleaned for
    cfg = compose_train(
        [f"data.path={out}", f"run_dir={tmp_path / 'run'}", "model=tiny", "debug=fast", "trainer.max_steps=1"]
    )
    ckpt = run(cfg).last_checkpoint
    recorded = json.loads((tmp_path / "run" / "run_manifest.json").read_text())
    assert recorded["data"]["decontaminated_against"] == ["tiny_mc", "tiny_rolling"]
    from llmforge.evaluate import main

    assert main([str(ckpt), "tasks=tiny_mc,tiny_gen", f"include_path={tasks_dir}", "limit=1"]) == 0
    err = capsys.readouterr().err
    assert "warning: tiny_gen: the training data" in err and "tiny_mc:" not in err


def test_decontamination_filter_matches_windows_and_short_items(tmp_path):
    import numpy as np

    from llmforge.prep.decontaminate import DecontaminateFilter, _WordHasher, window_hashes, words
    from llmforge.prep.document import Document

    h = _WordHasher()
    long_item = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    short_item = "alpha beta gamma delta epsilon zeta eta theta"  # 8 words: matched whole
    parts = [(window_hashes(h(words(long_item)), 13), 0), (window_hashes(h(words(short_item)), 8), 1)]
    hashes = np.concatenate([p for p, _ in parts])
    index = {
        "hashes": hashes,
        "task": np.array([0, 0, 1], dtype=np.int32),
        "sizes": np.array([13, 13, 8], dtype=np.int32),
        "names": np.array(["long", "short"]),
    }
    order = np.argsort(index["hashes"])
    np.savez(tmp_path / "i.npz", **{k: (v[order] if k != "names" else v) for k, v in index.items()})
    f = DecontaminateFilter(index=str(tmp_path / "i.npz"))
    doc = lambda t: Document(t, "d", {})  # noqa: E731
    assert f.filter(
        doc("Intro. Two three FOUR, five six seven eight nine ten eleven twelve thirteen fourteen!")
    ) == (
        False,
        "decontaminate:long",
    )
    assert f.filter(doc("one two three four five six seven eight nine ten eleven twelve")) == (True, None)
    assert f.filter(doc("zero one two three four five six seven eight nine ten eleven twelve thirteen")) == (
        False,
        "decontaminate:long",
    )
    assert f.filter(doc("x Alpha beta gamma delta epsilon zeta eta theta y")) == (
        False,
        "decontaminate:short",
    )
    assert f.filter(doc("alpha beta gamma delta epsilon zeta eta")) == (True, None)
    # the filter's prefix-sum hashes equal the index's window hashes bit for bit
    from llmforge.prep.decontaminate import _Powers, all_window_hashes

    rng = np.random.default_rng(0)
    for length in (0, 7, 8, 13, 500):
        wh = rng.integers(0, 2**63, length, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        got = all_window_hashes(wh, (8, 13), _Powers())
        assert all(np.array_equal(got[n], window_hashes(wh, n)) for n in (8, 13))


# -- in-loop downstream evaluation ----------------------------------------------------------------------
def test_downstream_callback_logs_eval_scores_and_leaves_training_unchanged(train_cfg, tasks_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["debug=fast", "trainer.max_steps=4", "logger=tensorboard", "callbacks.sample_text=null"]
    on = [
        "callbacks.downstream.enabled=true",
        "callbacks.downstream.tasks=[tiny_mc,tiny_rolling]",
        f"callbacks.downstream.include_path={tasks_dir}",
        "callbacks.downstream.every_n_steps=2",
    ]
    with_eval = run(train_cfg(*common, *on, run_dir=tmp_path / "on"))
    without = run(train_cfg(*common, run_dir=tmp_path / "off"))
    assert with_eval.metrics["train/loss"] == without.metrics["train/loss"]
    events = EventAccumulator(str(tmp_path / "on" / "tb")).Reload()
    tags = events.Tags()["scalars"]
    assert {"eval/tiny_mc/acc", "eval/tiny_rolling/bits_per_byte", "eval/seconds"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/tiny_mc/acc")] == [0, 2, 4]
    acc = [e.value for e in events.Scalars("eval/tiny_mc/acc")]
    assert all(0.0 <= a <= 1.0 for a in acc)
    bpb = [e.value for e in events.Scalars("eval/tiny_rolling/bits_per_byte")]
    assert bpb[0] != bpb[-1]  # the weights changed between the calls


def test_downstream_callback_refuses_non_causal_objectives(train_cfg, tmp_path):
    cfg = train_cfg(
        "objective=mlm", "debug=fast", "callbacks.downstream.enabled=true", run_dir=tmp_path / "m"
    )
    with pytest.raises(ValueError, match="needs objective=clm"):
        run(cfg)


def test_the_base_install_does_not_import_lm_eval():
    import subprocess
    import sys

    code = (
        "import sys, llmforge.prep.filters, llmforge.prep.pipeline, llmforge.training, llmforge.generate; "
        "print('lm_eval' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_evaluate_cli_scores_tasks_and_warns_about_contamination(ckpts, tasks_dir, tmp_path, capsys):
    from llmforge.evaluate import main

    out = tmp_path / "r.json"
    args = [str(ckpts["clm"]), "tasks=tiny_mc", f"include_path={tasks_dir}", "limit=2", f"--out={out}"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "tiny_mc" in printed.out and "acc" in printed.out
    assert json.loads(out.read_text())["results"]["tiny_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    # tiny_data was prepared without decontamination: every task gets its warning line
    assert "warning: tiny_mc: the training data" in printed.err


def test_stdlib_items_hold_the_description_and_three_neighbour_swaps():
    from llmforge.downstream.stdlib_task import make_items

    descriptions = {f"f{i}()": f"Return the number {i} of the given list." for i in range(40)}
    descriptions["short()"] = "Too short to swap."
    items = make_items(descriptions, n=30, seed=1)
    assert len(items) == 30 and all(i["question"] != "short()" for i in items)
    for item in items:
        right = item["choices"][item["answer"]]
        assert right == descriptions[item["question"]] and len(set(item["choices"])) == 4
        for choice in item["choices"]:
            a, b = right.split(), choice.split()
            diff = [k for k in range(len(a)) if a[k] != b[k]]
            assert sorted(a) == sorted(b) and (diff == [] or (len(diff) == 2 and diff[1] == diff[0] + 1))
    assert len({i["answer"] for i in items}) == 4  # the right answer's position is shuffled
