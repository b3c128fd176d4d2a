"""`SampleIndexRecorder`: the windows each rank trained on (to check data order, resume and sharding)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class SampleIndexRecorder(L.Callback):
    """Writes the window indices each rank trains on to `samples/rank{r}.txt` (one line per batch)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        out = Path(trainer.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"rank{trainer.global_rank}.txt", "a") as f:
            f.write(" ".join(str(i) for i in batch["index"].tolist()) + "\n")
