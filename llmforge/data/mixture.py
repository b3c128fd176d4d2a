"""Training on a weighted mixture of token-shard directories (``data=mixture``).

**Sources.** Each source is a prepared dataset directory with a weight; the weights are shares of the
training *windows*, hence of training tokens (every window holds ``seq_len`` tokens; only a source's
last window may be shorter). All sources must share one tokenizer (same sha256 in their manifests). With
``data.alpha`` set, a source's weight is multiplied by its train tokens to the power alpha (the
temperature rule of XLM/mT5: alpha = 1 proportional to size, alpha = 0 the weights as given).

**Which window is global position i.** The stream of global positions is cut into blocks of ``B``
positions (`block_size`). By position ``T = b * B`` source s has been given ``c_s(T)`` positions: the
largest-remainder apportionment of T by the weights, so ``|c_s(T) - w_s T| < 1`` at every block edge.
Block b gives source s the ``c_s((b+1)B) - c_s(bB)`` slots whose *shuffled* slot number (a Feistel
permutation of [0, B) keyed by (seed, b)) falls in s's range; a slot's rank inside that range is s's next
draw. So the source of position i and its draw number k within the source are pure functions of
(seed, i, weights), computed for any i in O(B) time and O(1) memory, and source s's draws
0, 1, 2, ... are each made exactly once, in order of blocks. Draw k of source s is window
``perm_s(epoch = k // n_s)[k % n_s]`` of its n_s windows (a Feistel permutation per source and epoch, keyed
by the seed and the source's name): a small source with a large weight repeats (epoch after epoch, each a
new order); a large one is sampled without repetition within its epoch.

**Changed weights on resume (the rule).** Each source keeps its own cursor. The schedule is a list of
*segments*: a segment starts at a global cursor with the weights in force and, per source, the draws made
before it. A run resumed with other weights (or another set of sources) starts a new segment at the
resumed cursor, whose draw offsets are the draws each source had made, so every source goes on with its
next window: no source repeats a window before its epoch ends, and none skips one. A source that is new
starts at draw 0; a removed one simply stops. Positions before the new segment keep their old meaning
(`llmforge.inspect` reads them back). Resumed with the same weights, the run stays in its segment and
continues bitwise as if never interrupted.

**Indices.** The mixture's dataset concatenates the sources (sorted by name) into one index space: window
w of source s has the flat index ``base_s + w``. That flat index is what the sampler yields, what
``batch["index"]`` holds, and what seeds the collators (MLM masking, span corruption).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import Dataset, Sampler

from llmforge.data.dataset import PackedWindows, epoch_order, rank_stream
from llmforge.data.permutation import derive_key, permute
from llmforge.data.shards import ShardSet, manifest_sha256, read_manifest

MIN_BLOCK = 1024
BLOCK_KEY = 0x6D6978  # "mix": block keys differ from the sources' epoch keys


def normalise(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if not np.isfinite(w).all() or total <= 0:
        raise ValueError(f"mixture weights {list(weights)} do not sum to a positive number")
    return w / total


def block_size(weights: np.ndarray) -> int:
    """Positions per block: at least 1024, and enough that every source gets >= 1 slot per block on
    average (so the cumulative apportionment grows monotonically)."""
    return max(MIN_BLOCK, math.ceil(1.0 / float(weights.min())))


def apportion(totals: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder apportionment: (len(totals), S) non-negative counts, each row summing to its total,
    each within 1 of ``total * w_s``."""
    totals = np.asarray(totals, dtype=np.int64).reshape(-1)
    quota = totals[:, None].astype(np.float64) * weights[None, :]
    counts = np.floor(quota).astype(np.int64)
    remainder = quota - counts
    deficit = totals - counts.sum(axis=1)  # 0 .. S-1 (float rounding may give -1 or S: handled alike)
    order = np.argsort(-remainder, axis=1, kind="stable")  # ties: the first source first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(weights.size)[None, :].repeat(len(totals), 0), axis=1)
    counts += rank < deficit[:, None]
    over = -np.minimum(deficit, 0)  # quotas summed above the total: take back from the smallest remainders
    counts -= (rank >= weights.size - over[:, None]) & (over[:, None] > 0)
    return counts


@dataclass
class Segment:
    """From global cursor ``start`` on, these weights; ``offsets[s]``: draws source s made before it."""

    start: int
    names: list[str]
    weights: list[float]  # normalised
    offsets: list[int]
    seed: int

    def to_dict(self) -> dict:
        return {
            "start": self.start,
            "names": self.names,
            "weights": self.weights,
            "offsets": self.offsets,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Segment:
        return cls(
            int(d["start"]),
            list(d["names"]),
            [float(w) for w in d["weights"]],
            [int(o) for o in d["offsets"]],
            int(d["seed"]),
        )

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source number in ``names``, draw number within that source) of global positions >= start."""
        w = np.asarray(self.weights)
        big_b = block_size(w)
        local = np.asarray(positions, dtype=np.int64) - self.start
        if local.size and local.min() < 0:
            raise ValueError(f"position {int(local.min()) + self.start} precedes the segment at {self.start}")
        blocks, slots = np.divmod(local, big_b)
        uniq, inverse = np.unique(blocks, return_inverse=True)
        sources, ranks = self.cached_blocks(uniq)
        lo = apportion(uniq * big_b, w)
        source = sources[inverse, slots]
        before = np.asarray(self.offsets, dtype=np.int64)[source] + lo[inverse, source]
        return source, before + ranks[inverse, slots]

    def cached_blocks(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`blocks`, remembering the last few (consecutive batches share a block)."""
        if blocks.size > 4:  # a large request (a benchmark, inspect): no caching
            return self.blocks(blocks)
        cache = self.__dict__.setdefault("_blocks", {})
        todo = np.array([b for b in blocks.tolist() if b not in cache], dtype=np.int64)
        if len(cache) + todo.size > 8:
            cache.clear()
            todo = blocks
        if todo.size:
            for b, src, rank in zip(todo.tolist(), *self.blocks(todo), strict=True):
                cache[b] = (src, rank)
        found = [cache[b] for b in blocks.tolist()]
        return np.stack([f[0] for f in found]), np.stack([f[1] for f in found])

    def blocks(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For whole blocks: (U, B) source of each slot, and its rank among the block's slots of that
        source (so the draws of any prefix of a block are contiguous per source: a segment may end
        anywhere)."""
        w = np.asarray(self.weights)
        big_b = block_size(w)
        keys = derive_key(self.seed, BLOCK_KEY, blocks)
        shuffled = permute(np.tile(np.arange(big_b), blocks.size), big_b, np.repeat(keys, big_b))
        shuffled = shuffled.reshape(blocks.size, big_b)
        counts = apportion((blocks + 1) * big_b, w) - apportion(blocks * big_b, w)
        ends = np.cumsum(counts, axis=1)
        sources = (shuffled[:, :, None] >= ends[:, None, :]).sum(axis=2)
        ranks = np.zeros_like(sources)
        for k in range(w.size):
            mine = sources == k
            ranks[mine] = (np.cumsum(mine, axis=1) - 1)[mine]
        return sources, ranks

    def draws_before(self, cursor: int) -> list[int]:
        """Draws of each source made at global positions < cursor (cursor >= start)."""
        w = np.asarray(self.weights)
        big_b = block_size(w)
        full, partial = divmod(cursor - self.start, big_b)
        counts = apportion(np.array([full * big_b]), w)[0]
        if partial:
            source, _ = self.assign(np.arange(cursor - partial, cursor))
            counts = counts + np.bincount(source, minlength=w.size)
        return [int(o + c) for o, c in zip(self.offsets, counts, strict=True)]


def source_seed(seed: int, name: str) -> int:
    """The seed of a source's own window order: the run's seed and the source's name (not its position
    in the list, so adding a source leaves the others' orders alone)."""
    return int(derive_key(seed, zlib.crc32(name.encode())))


class MixtureSampler(Sampler[int]):
    """Endless, rank-sliced sampler over a mixture, at a global cursor (like `GlobalCursorSampler`).

    Yields flat indices ``base_s + window``. ``segments`` (default: one segment from 0 with ``weights``)
    carry the history of weight changes (see the module docstring).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
        names: Sequence[str] | None = None,
        segments: Sequence[Segment] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.names = list(names) if names is not None else [f"s{i}" for i in range(len(sizes))]
        self.sizes = [int(s) for s in sizes]
        if any(s <= 0 for s in self.sizes):
            bad = self.names[next(i for i, s in enumerate(self.sizes) if s <= 0)]
            raise ValueError(f"source {bad!r} has no window to draw from")
        self.bases = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self.segments = (
            list(segments)
            if segments
            else [Segment(0, self.names, normalise(weights).tolist(), [0] * len(self.names), seed)]
        )
        self.source_seeds = [source_seed(seed, n) for n in self.names]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source number in ``names``, draw number, window within the source) of global positions."""
        positions = np.asarray(positions, dtype=np.int64)
        source = np.empty_like(positions)
        draw = np.empty_like(positions)
        starts = np.array([s.start for s in self.segments])
        which = np.searchsorted(starts, positions, side="right") - 1
        for k in np.unique(which):
            seg = self.segments[k]
            sel = which == k
            local_source, local_draw = seg.assign(positions[sel])
            index = np.array([self.names.index(n) for n in seg.names])
            source[sel], draw[sel] = index[local_source], local_draw
        window = np.empty_like(positions)
        for s in np.unique(source):
            sel = source == s
            window[sel] = epoch_order(draw[sel], self.sizes[s], self.source_seeds[s], self.shuffle)
        return source, draw, window

    def orders(self, positions: np.ndarray) -> np.ndarray:
        source, _, window = self.locate(positions)
        return self.bases[source] + window

    def order(self, position: int) -> int:
        return int(self.orders(np.array([position]))[0])

    def __iter__(self) -> Iterator[int]:
        return rank_stream(self.orders, self.start, self.rank, self.batch_size, self.world_size)

    def draws(self, cursor: int) -> list[int]:
        """Draws each source (in ``names``) has made before global position ``cursor``."""
        done = draws_at(self.segments, cursor)
        return [done.get(n, 0) for n in self.names]


def draws_at(segments: Sequence[Segment], cursor: int) -> dict[str, int]:
    """Source name -> draws made before global position ``cursor``, over the segments in force until then
    (a source left out of a later segment keeps the count it reached)."""
    done: dict[str, int] = {}
    for k, seg in enumerate(segments):
        if seg.start > cursor:
            break
        end = min(cursor, segments[k + 1].start) if k + 1 < len(segments) else cursor
        done.update(zip(seg.names, seg.draws_before(end), strict=True))
    return done


class MixtureWindows(Dataset):
    """The sources' `PackedWindows`, concatenated: flat index ``base_s + w`` is window w of source s."""

    def __init__(self, names: Sequence[str], windows: Sequence[PackedWindows]) -> None:
        self.names, self.windows = list(names), list(windows)
        self.sizes = [len(w) for w in self.windows]
        self.bases = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.bases[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(source number, window within the source) of flat index i."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        s = int(np.searchsorted(self.bases, i, side="right")) - 1
        return s, i - int(self.bases[s])

    def __getitem__(self, i: int) -> dict:
        s, w = self.locate(i)
        return {"index": i, "tokens": self.windows[s].read(*self.windows[s].span(w))}


@dataclass
class Source:
    name: str
    path: Path
    weight: float  # normalised, after the temperature rule
    manifest: dict
    train: PackedWindows
    val: PackedWindows | None


def open_sources(
    sources: dict[str, dict], seq_len: int, alpha: float | None = None, val_split: str = "val"
) -> list[Source]:
    """Checks and opens the sources (sorted by name); every problem is a one-line ValueError or
    FileNotFoundError that names the source."""
    if not sources:
        raise ValueError("data.sources is empty: a mixture needs at least one source")
    opened: list[tuple[str, Path, float, dict, PackedWindows, PackedWindows | None]] = []
    for name in sorted(sources):
        spec = sources[name] or {}
        key = f"data.sources.{name}"
        if not spec.get("path"):
            raise ValueError(f"{key}.path is missing")
        weight = spec.get("weight", 1.0)
        if weight is None or not math.isfinite(float(weight)) or float(weight) <= 0:
            raise ValueError(f"{key}.weight={weight} must be a positive number")
        path = Path(spec["path"])
        if not (path / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{key}.path={path}: no token shards there (manifest.json missing): "
                "run `python -m llmforge.prepare ... output_dir=" + str(path) + "` first"
            )
        manifest = read_manifest(path)
        train = PackedWindows(ShardSet.open(path, "train"), seq_len)
        if len(train) == 0:
            raise ValueError(
                f"{key} ({path}): the train split is empty (shorter than one window of {seq_len + 1} tokens)"
            )
        val = None
        if val_split in manifest["splits"]:
            val = PackedWindows(ShardSet.open(path, val_split), seq_len)
        if val is None or len(val) == 0:
            raise ValueError(
                f"{key} ({path}): the {val_split} split is empty; re-prepare it with a larger "
                "val_fraction (every source is validated on its own)"
            )
        opened.append((name, path, float(weight), manifest, train, val))
    first_name, first = opened[0][0], opened[0][3]
    for name, _, _, manifest, _, _ in opened[1:]:
        if manifest.get("tokenizer_sha256") != first.get("tokenizer_sha256"):
            raise ValueError(
                f"data.sources.{name} was tokenized with tokenizer {manifest.get('tokenizer_sha256')}, "
                f"data.sources.{first_name} with {first.get('tokenizer_sha256')}: a mixture needs one "
                "tokenizer (prepare every source with tokenizer.path=<the same tokenizer.json>)"
            )
    raw = np.array([w for _, _, w, _, _, _ in opened])
    if alpha is not None:
        tokens = np.array([m["splits"]["train"]["tokens"] for _, _, _, m, _, _ in opened], dtype=np.float64)
        raw = raw * tokens ** float(alpha)
    weights = normalise(raw)
    return [Source(n, p, float(w), m, t, v) for (n, p, _, m, t, v), w in zip(opened, weights, strict=True)]


class MixtureMonitor(L.Callback):
    """Per-source progress of a mixture run.

    TensorBoard, at every optimizer step (Lightning keeps every ``trainer.log_every_n_steps``-th):
    ``data/<source>/epoch`` (windows drawn / the source's windows: 2.5 = the middle of its third epoch) and
    ``data/<source>/tokens`` (windows drawn x seq_len). ``run_manifest.json`` gets ``data.sources`` (path,
    weight in force, manifest sha256, train windows and tokens) at the start and ``data.progress`` (the same
    figures as the tags) at the end of training.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._last_step = -1

    @staticmethod
    def progress(datamodule) -> dict[str, dict[str, float]]:
        segments = datamodule.segments or datamodule.mixture_segments()
        done = draws_at(segments, datamodule.cursor())
        out = {}
        for s in datamodule.sources:
            windows = done.get(s.name, 0)
            out[s.name] = {
                "windows": windows,
                "epochs": windows / len(s.train),
                "tokens": windows * datamodule.seq_len,
            }
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last_step:
            return  # still accumulating
        self._last_step = trainer.global_step
        for name, p in self.progress(trainer.datamodule).items():
            pl_module.log(f"data/{name}/epoch", float(p["epochs"]))
            pl_module.log(f"data/{name}/tokens", float(p["tokens"]))

    def _update_manifest(self, trainer, key: str, value: dict | list) -> None:
        if not trainer.is_global_zero:
            return
        path = self.run_dir / "run_manifest.json"
        manifest = json.loads(path.read_text()) if path.is_file() else {}
        data = manifest.get("data") or {}
        data[key] = value
        manifest["data"] = data
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2) + "\n")

    def on_fit_start(self, trainer, pl_module):
        from llmforge.prep.decontaminate import read_tasks

        dm = trainer.datamodule
        sources = {
            s.name: {
                "path": str(s.path.resolve()),
                "weight": s.weight,
                "manifest_sha256": manifest_sha256(s.path),
                "train_windows": len(s.train),
                "train_tokens": s.train.total,
                "decontaminated_against": read_tasks(s.path),
            }
            for s in dm.sources
        }
        self._update_manifest(trainer, "sources", sources)
        # the eval tasks every source was decontaminated against (what `evaluate tasks=...` checks)
        cleaned = [set(s["decontaminated_against"] or ()) for s in sources.values()]
        self._update_manifest(trainer, "decontaminated_against", sorted(set.intersection(*cleaned)))

    def on_train_end(self, trainer, pl_module):
        self._update_manifest(trainer, "progress", self.progress(trainer.datamodule))
