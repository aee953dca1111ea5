"""A pretrained user encoder on disk: build one for a dataset, save it, load it back.

A saved encoder is a directory holding ``model.safetensors`` (every parameter and buffer, the item ->
categories table and the item-text table included) and ``config.json`` (its :class:`EncoderConfig`);
``userllm pretrain`` writes its best model to ``RUN/model/`` and its last epoch to ``RUN/checkpoint/``.

Example::

    encoder = load_encoder("runs/encoder")                 # the run's best model
    h, mask = encoder(batch)                                 # (b, n, d_model), (b, n)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from userllm.config import EncoderConfig, PretrainConfig, dump_config
from userllm.data.dataset import PreparedDataset
from userllm.encoder.data import Timelines
from userllm.encoder.model import UserEncoder
from userllm.errors import ConfigError, InputError


def encoder_inputs(ds: PreparedDataset, cfg: EncoderConfig) -> tuple[EncoderConfig, Tensor]:
    """The encoder config with the dataset's vocabulary sizes, and the (V, c) item -> categories table."""
    cats = ds.item_categories
    width = max(len(c) for c in cats)
    table = torch.zeros(len(cats), width, dtype=torch.long)
    for i, c in enumerate(cats):
        table[i, : len(c)] = torch.tensor(c)
    table[:2] = 0  # padding and unknown items have no categories
    vs = ds.manifest["vocab_sizes"]
    cfg = cfg.model_copy(
        update={"num_items": vs["item"], "num_ratings": vs["rating"], "num_categories": vs["category"]}
    )
    return cfg, table


def item_text_table(path: Path | None, cfg: EncoderConfig) -> Tensor | None:
    """The fixed (V, text_dim) item-text embeddings for the 'text' feature, checked against the vocabulary."""
    if "text" not in cfg.features:
        return None
    if path is None:
        raise ConfigError("the 'text' feature needs item_text_path: a .npy array (item vocabulary size, text_dim)")
    try:
        table = np.load(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"item_text_path {path}: cannot read a .npy array: {err}") from None
    if table.ndim != 2 or table.shape[0] != cfg.num_items:
        raise ConfigError(f"item_text_path {path}: expected shape ({cfg.num_items}, text_dim), got {table.shape}")
    return torch.from_numpy(table.astype(np.float32))


def build_encoder(
    ds: PreparedDataset, cfg: EncoderConfig, seed: int, item_text_path: Path | None = None
) -> UserEncoder:
    cfg, cats = encoder_inputs(ds, cfg)
    text = item_text_table(item_text_path, cfg)
    if text is not None:
        cfg = cfg.model_copy(update={"text_dim": text.shape[1]})
    torch.manual_seed(seed)
    return UserEncoder(cfg, item_categories=cats, item_text=text)


def save_encoder(model: UserEncoder, path: Path) -> None:
    """``path/model.safetensors`` + ``path/config.json`` (the encoder config)."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(dump_config(model.cfg), indent=2))


def encoder_weights(path: Path) -> Path:
    """The ``model.safetensors`` of a run (its best ``model/``) or of a ``model/`` / ``checkpoint/`` directory."""
    path = Path(path)
    if (path / "model" / "model.safetensors").exists():
        path = path / "model"
    if not (path / "model.safetensors").exists():
        raise InputError(f"{path} holds no encoder (model.safetensors); train one with `userllm pretrain`")
    return path / "model.safetensors"


def load_encoder(path: Path, device: str = "cpu") -> UserEncoder:
    """Load an encoder saved by :func:`save_encoder` (a run's ``model/`` or ``checkpoint/`` directory, or the run)."""
    weights = encoder_weights(path)
    cfg = EncoderConfig.from_saved(json.loads((weights.parent / "config.json").read_text()))
    state = load_file(weights, device=device)
    model = UserEncoder(cfg, item_categories=state["embed.item_categories"], item_text=state["embed.item_text"])
    model.load_state_dict(state)
    return model.to(device)


@torch.no_grad()
def encode_latest(
    model: UserEncoder, tl: Timelines, users: np.ndarray, device: str = "cpu"
) -> tuple[Tensor, Tensor, np.ndarray]:
    """Embeddings (u, n, d) and mask (u, n) of the last ``max_len`` events of ``users`` (indices into ``tl``),
    and each window's start in its timeline."""
    ends = tl.lengths[users]
    starts = np.maximum(ends - model.cfg.max_len, 0)
    h, mask = model.encode(tl.collate(users, starts, ends, device=device))
    return h.float().cpu(), mask.cpu(), starts


@dataclass
class EncoderRun:
    """A pretrained encoder with what it reads: ``encoder`` (eval mode), the run's resolved ``cfg`` and its
    prepared ``dataset`` (None for a bare saved encoder directory, or when the dataset is not there).

    Example::

        run = EncoderRun.from_pretrained("runs/encoder")      # or userllm.load("runs/encoder")
        per_event = run.embed(["1", "2"])                      # {user_id: (n, d_model)}, oldest event first
    """

    encoder: UserEncoder
    cfg: PretrainConfig | None = None
    dataset: PreparedDataset | None = None

    @classmethod
    def from_pretrained(cls, path: Path, *, device: str = "cpu") -> EncoderRun:
        """A `userllm pretrain` run directory (its best ``model/``), or a ``model/`` / ``checkpoint/`` directory."""
        path = Path(path)
        encoder = load_encoder(path, device).eval()
        cfg = dataset = None
        if (path / "config.json").exists() and (path / "model").is_dir():
            cfg = PretrainConfig.model_validate(json.loads((path / "config.json").read_text()))
            if (Path(cfg.dataset) / "manifest.json").exists():
                dataset = PreparedDataset(cfg.dataset)
        return cls(encoder, cfg, dataset)

    def embed(self, user_ids: list[str]) -> dict[str, Tensor]:
        """Each user's per-event embeddings (n, d_model) over their last ``max_len`` events, oldest first."""
        if self.dataset is None:
            raise InputError(
                "this encoder has no dataset to read timelines from; load a `userllm pretrain` run "
                "whose prepared dataset is in place"
            )
        ids = self.dataset.sequences.get_column("user_id").to_list()
        index = {u: i for i, u in enumerate(ids)}
        missing = [u for u in user_ids if u not in index]
        if missing:
            raise InputError(f"users {missing[:5]} are not in dataset {self.dataset.root} (ids look like {ids[0]!r})")
        tl = Timelines.from_dataset(self.dataset, self.encoder.cfg.time_gap_buckets)
        device = next(self.encoder.parameters()).device
        h, mask, _ = encode_latest(self.encoder, tl, np.array([index[u] for u in user_ids]), str(device))
        return {u: h[i][mask[i]] for i, u in enumerate(user_ids)}
