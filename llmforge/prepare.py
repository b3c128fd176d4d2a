"""python -m llmforge.prepare [pipeline=web|text] [executor=local|slurm|ray] [key=value ...]
(conf/prepare.yaml)

Crawl files (WARC/WET), text files or the embedded demo crawl -> extract, clean, filter, deduplicate ->
BPE tokenizer -> train/val token shards with a manifest, a funnel report and samples of what was dropped.
Reruns skip finished work and redo what a changed config or input touches (llmforge/prep/pipeline.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from llmforge.config import register
from llmforge.prep.task import TaskFailed

register()
DEMO_CRAWL = Path("data/demo-crawl")


def resolve_inputs(cfg: dict) -> list[str]:
    from llmforge.prep.readers import expand_inputs

    spec = cfg["input"]
    if spec == "demo":
        if not list(DEMO_CRAWL.glob("*.warc.gz")):
            print(f"building the demo crawl in {DEMO_CRAWL} (Python's standard library as HTML pages)")
            subprocess.run([sys.executable, "-m", "llmforge.prep.demo_warc", str(DEMO_CRAWL)], check=True,
                           stdout=subprocess.DEVNULL)
        return sorted(str(p) for p in DEMO_CRAWL.glob("*.warc.gz"))
    if spec == "stdlib":
        return ["stdlib"]
    return expand_inputs(spec, cfg["base_url"], Path(cfg["output_dir"]) / "work" / "downloads")


def prepare(cfg: DictConfig) -> dict:
    from llmforge.prep.executor import make_executor
    from llmforge.prep.pipeline import run_pipeline

    plain = OmegaConf.to_container(cfg, resolve=True)
    out = Path(plain["output_dir"])
    executor = make_executor(plain.pop("executor"), out, progress=plain.pop("progress"))
    manifest = run_pipeline(plain, resolve_inputs(plain), out, executor)
    print((out / "report.md").read_text())
    print(f"dataset    {out}   (manifest.json, report.md, stats.json, dropped/)")
    return manifest


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    try:
        prepare(cfg)
    except (ValueError, FileNotFoundError, TypeError, OSError, TaskFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
