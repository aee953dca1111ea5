"""``userllm embed``: per-event user embeddings for every user, with the manifest of what produced them.

Each user's timeline is encoded over its last ``max_len`` events (the encoder's window). Two formats:

- ``*.parquet``: one row per event: ``user_id``, ``user_idx``, ``pos`` (position in the full timeline),
  ``item_id``, ``embedding`` (``d_model`` float32);
- a directory: safetensors shards ``embeddings-NNNNN.safetensors`` holding ``embeddings`` (u, n, d) float32,
  ``mask`` (u, n) uint8, ``user_idx`` (u,) and ``start`` (u,) (timeline position of column 0), plus
  ``index.json`` (users per shard) and ``manifest.json``.

New events later: encode incrementally with :class:`~userllm.encoder.model.EncoderState` (cached keys and
values) instead of re-encoding the timeline; past ``max_len`` events the window slides and is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import userllm
from userllm.data.dataset import PreparedDataset
from userllm.encoder.data import Timelines
from userllm.encoder.pretrained import encode_latest, encoder_weights, load_encoder
from userllm.errors import OutputExistsError
from userllm.io import sha256, write_dir_atomically, write_file_atomically, write_json
from userllm.progress import progress_bar

SHARD_USERS = 4096


def embed_dataset(
    run: Path, dataset: Path, out: Path, *, force: bool = False, device: str = "cpu", batch_size: int = 256
) -> dict:
    """Embed every user of ``dataset`` with the best encoder of ``run`` into ``out`` (see module docstring)."""
    run, out = Path(run), Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it")
    model = load_encoder(run, device)
    ds = PreparedDataset(dataset)
    tl = Timelines.from_dataset(ds, model.cfg.time_gap_buckets)
    manifest = {
        "userllm_version": userllm.__version__,
        "run": str(run),
        "model_sha256": sha256(encoder_weights(run)),
        "dataset": str(ds.root),
        "dataset_inputs": ds.manifest["inputs"],
        "users": tl.num_users,
        "d_model": model.cfg.d_model,
        "max_len": model.cfg.max_len,
        "encoder": model.cfg.model_dump(mode="json"),
    }
    batches = []
    with progress_bar("users") as progress:
        task = progress.add_task("embedding users", total=tl.num_users)
        for s in range(0, tl.num_users, batch_size):
            users = np.arange(s, min(s + batch_size, tl.num_users))
            batches.append((users, *encode_latest(model, tl, users, device)))
            progress.advance(task, len(users))
    if out.suffix == ".parquet":
        rows = write_parquet(out, batches, tl, ds, manifest)
        return {"out": str(out), "rows": rows, "users": tl.num_users, "d_model": model.cfg.d_model}
    shards = write_shards(out, batches, manifest, force=force)
    return {"out": str(out), "shards": shards, "users": tl.num_users, "d_model": model.cfg.d_model}


def write_parquet(out: Path, batches: list, tl: Timelines, ds: PreparedDataset, manifest: dict) -> int:
    """One row per event; ``FILE.manifest.json`` beside it. Returns the number of rows."""
    user_ids = ds.sequences.get_column("user_id").to_numpy()
    item_ids = np.array(["<pad>", "<unk>", *ds.items.get_column("item_id").to_list()], dtype=object)
    frames = []
    for users, h, mask, starts in batches:
        rows, cols = np.nonzero(mask.numpy())
        u, pos = users[rows], starts[rows] + cols
        frames.append(
            pl.DataFrame(
                {
                    "user_id": user_ids[u],
                    "user_idx": u.astype(np.int32),
                    "pos": pos.astype(np.int32),
                    "item_id": item_ids[tl.item[tl.offsets[u] + pos]],
                    "embedding": h[rows, cols].numpy(),
                }
            )
        )
    table = pl.concat(frames)
    write_file_atomically(out, table.write_parquet)
    write_json(out.with_suffix(".manifest.json"), manifest)
    return table.height


def write_shards(out: Path, batches: list, manifest: dict, *, force: bool) -> int:
    """Safetensors shards of up to ``SHARD_USERS`` users + ``index.json`` + ``manifest.json``. Returns the shard count."""
    per_shard = max(1, SHARD_USERS // max(1, len(batches[0][0])))
    groups = [batches[i : i + per_shard] for i in range(0, len(batches), per_shard)]

    def write(tmp: Path) -> None:
        index = []
        for k, group in enumerate(groups):
            width = max(h.shape[1] for _, h, _, _ in group)
            name = f"embeddings-{k:05d}.safetensors"
            save_file(
                {
                    "embeddings": torch.cat([F.pad(h, (0, 0, 0, width - h.shape[1])) for _, h, _, _ in group]),
                    "mask": torch.cat([F.pad(m.to(torch.uint8), (0, width - m.shape[1])) for _, _, m, _ in group]),
                    "user_idx": torch.from_numpy(np.concatenate([u for u, _, _, _ in group]).astype(np.int64)),
                    "start": torch.from_numpy(np.concatenate([s for _, _, _, s in group]).astype(np.int64)),
                },
                tmp / name,
            )
            index.append({"file": name, "users": [int(group[0][0][0]), int(group[-1][0][-1]) + 1]})
        (tmp / "index.json").write_text(json.dumps({"shards": index}, indent=2))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

    write_dir_atomically(out, write, force=force)
    return len(groups)
