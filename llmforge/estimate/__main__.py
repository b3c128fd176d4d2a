"""python -m llmforge.estimate model=7b tokens=1e12 gpu=h100 num_gpus=64 [objective=mlm|denoise] [--json]

The command line of `llmforge.estimate` (keys: ``conf/estimate.yaml``): argument handling only."""

from __future__ import annotations

import sys

import llmforge.estimate as library
from llmforge.estimate.plan import EstimateConfig, compose, from_config
from llmforge.estimate.report import format_table


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(library.__doc__.split("What is computed")[0].strip())
        print("\nkeys (conf/estimate.yaml):", ", ".join(EstimateConfig.__dataclass_fields__))
        return 0
    if "--json" in args:
        args = [a for a in args if a != "--json"] + ["json=true"]
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(args)
        result = from_config(cfg)
    except MissingConfigException as err:  # model=<no such preset>, precision=<no such option>
        options = ", ".join(err.options or [])
        print(
            f"error: {str(err).splitlines()[0]}" + (f"; options: {options}" if options else ""),
            file=sys.stderr,
        )
        return 2
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        text = f"{err}" + (f": {err.__cause__}" if err.__cause__ else "")
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        print("error: " + ("\n  ".join(lines) or type(err).__name__), file=sys.stderr)
        return 2
    print(result.to_json() if cfg.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
