"""``userllm pretrain``: self-supervised next-event pretraining of the user encoder.

A flat loop: every epoch tiles each user's train part into windows (a new tiling each epoch), and the
loss is taken at *every* position of every window at once (next item, next rating bucket, next
categories). AdamW with linear warmup then cosine decay, gradient clipping, optional bf16 autocast,
an exponential moving average of the weights (``ema_decay``; it is what is validated and saved),
validation NDCG@10 each epoch with early stopping. Each epoch ends with an atomic checkpoint
(``checkpoint/``: safetensors weights, config.json, optimizer/scheduler/moving-average state); ``--resume``
continues an interrupted run to the same result as an uninterrupted one, because every epoch's
randomness is derived from ``seed`` and the epoch number. The same code runs under
``torchrun --nproc_per_node=N`` (DistributedDataParallel: gloo on CPU, nccl on GPU).

Run directory: ``config.json``/``config.yaml`` (resolved), ``checkpoint/`` (last epoch), ``model/`` (best
valid epoch, moving average if on: ``model.safetensors`` + ``config.json``), ``history.json`` (per-epoch loss and metrics).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from userllm.config import PretrainConfig, dump_config, save_config
from userllm.data.dataset import PreparedDataset
from userllm.distributed import barrier, setup_distributed
from userllm.encoder.data import Timelines, train_windows
from userllm.encoder.evaluate import evaluate_split
from userllm.encoder.model import UserEncoder
from userllm.encoder.pretrained import build_encoder, save_encoder
from userllm.errors import ConfigError
from userllm.io import runtime, start_run, state_hash, write_dir_atomically, write_json
from userllm.precision import autocast
from userllm.progress import progress_bar
from userllm.schedule import lr_lambda

MARKER = "config.json"


def item_proposal(tl: Timelines, num_items: int) -> Tensor:
    """Sampled-softmax proposal: item frequency^0.75 (specials excluded), normalized."""
    freq = np.bincount(tl.item, minlength=num_items).astype(np.float64) ** 0.75
    freq[:2] = 0
    return torch.from_numpy(freq / freq.sum()).float()


def next_event_loss(
    model: UserEncoder, batch: dict[str, Tensor], cfg: PretrainConfig, proposal: Tensor | None, gen: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of next-item CE (full or sampled softmax with logQ correction), next-rating CE and
    next-category BCE, over every position that has a next event."""
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    h, _ = model(batch)
    tgt = batch["target_item"]
    keep = tgt > 0
    hv, t = h[keep], tgt[keep]
    if proposal is None:
        logits = raw.item_logits(hv)
        logits[:, :2] = float("-inf")
        item_loss = F.cross_entropy(logits, t)
    else:
        neg = torch.multinomial(proposal, cfg.num_negatives, replacement=True, generator=gen).to(h.device)
        q = proposal.to(h.device) * cfg.num_negatives
        cand = torch.cat([raw.item_logits(hv, t).diagonal()[:, None], raw.item_logits(hv, neg)], 1)
        cand = cand - torch.log(torch.cat([q[t][:, None], q[neg][None, :].expand(len(t), -1)], 1))
        cand[:, 1:] = cand[:, 1:].masked_fill(neg[None, :] == t[:, None], float("-inf"))  # accidental hits
        item_loss = F.cross_entropy(cand, torch.zeros(len(t), dtype=torch.long, device=h.device))
    w = cfg.loss_weights
    rating_loss = F.cross_entropy(raw.rating_logits(hv), batch["target_rating"][keep], ignore_index=0)
    cats = raw.embed.item_categories[t]
    multi_hot = torch.zeros(len(t), raw.cfg.num_categories, device=h.device).scatter_(1, cats, 1.0)
    multi_hot[:, 0] = 0
    category_loss = F.binary_cross_entropy_with_logits(raw.category_logits(hv), multi_hot)
    loss = w.get("item", 1.0) * item_loss + w.get("rating", 0.0) * rating_loss + w.get("category", 0.0) * category_loss
    return loss, {"item": item_loss.item(), "rating": rating_loss.item(), "category": category_loss.item()}


def _save_checkpoint(out: Path, model: UserEncoder, opt, sched, ema, state: dict) -> None:
    def write(tmp: Path) -> None:
        save_encoder(model, tmp)
        extra = {"ema": ema.state_dict()} if ema is not None else {}
        torch.save(
            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **extra, **state}, tmp / "train_state.pt"
        )

    write_dir_atomically(out / "checkpoint", write, force=True, marker=MARKER)


def pretrain(cfg: PretrainConfig, *, epochs_this_run: int | None = None) -> dict:
    """Pretrain an encoder on ``cfg.dataset`` into ``cfg.out``; returns the run summary (also ``summary.json``).

    ``epochs_this_run`` stops after that many epochs (the run can be continued with ``resume``).
    """
    rank, world, device = setup_distributed(cfg.device)
    out, ckpt = Path(cfg.out), Path(cfg.out) / "checkpoint"
    start_run(out, resume=cfg.resume, force=cfg.force, rank=rank, marker=MARKER)

    ds = PreparedDataset(cfg.dataset)
    tl = Timelines.from_dataset(ds, cfg.encoder.time_gap_buckets)
    model = build_encoder(ds, cfg.encoder, cfg.seed, cfg.item_text_path).to(device)
    cfg = cfg.model_copy(update={"encoder": model.cfg})
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dump_config(cfg))
        save_config(cfg, out / "config.yaml")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank_batch = max(1, cfg.batch_size // world)
    n_windows = len(train_windows(tl, model.cfg.max_len, np.random.default_rng(0), cfg.train_stride)[0])
    steps_per_epoch = max(1, n_windows // world // per_rank_batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.epochs * steps_per_epoch))
    proposal = item_proposal(tl, model.cfg.num_items) if model.cfg.num_items - 2 > cfg.sampled_softmax_above else None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay else None

    state = {"epoch": 0, "best_ndcg10": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": [], "train_seconds": 0.0}
    if cfg.resume:
        saved = torch.load(ckpt / "train_state.pt", weights_only=False)
        model.load_state_dict(load_file(ckpt / "model.safetensors", device=device))
        opt.load_state_dict(saved.pop("optimizer"))
        sched.load_state_dict(saved.pop("scheduler"))
        if (ema is None) != ("ema" not in saved):
            raise ConfigError(
                f"{ckpt} was written with ema_decay {'0' if ema is not None else '> 0'}: resume with the "
                "run's own ema_decay (see its config.json)"
            )
        if ema is not None:
            ema.load_state_dict(saved.pop("ema"))
        state = saved
    ddp = DistributedDataParallel(model) if world > 1 else model

    started, run_epochs = time.perf_counter(), 0
    with progress_bar("events") as progress:
        while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
            epoch = state["epoch"]
            rng = np.random.default_rng([cfg.seed, epoch])
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout of this epoch
            gen = torch.Generator().manual_seed(cfg.seed * 100_019 + epoch)
            users, starts, ends, loss_from = train_windows(tl, model.cfg.max_len, rng, cfg.train_stride)
            order = rng.permutation(len(users))[rank::world][: steps_per_epoch * per_rank_batch]
            scored = ends - starts - loss_from  # targets scored per window
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=int(scored[order].sum()))
            model.train()
            t0, losses = time.perf_counter(), []
            for s in range(0, len(order), per_rank_batch):
                idx = order[s : s + per_rank_batch]
                batch = tl.collate(users[idx], starts[idx], ends[idx], loss_from[idx], device=device)
                with autocast(cfg.bf16, device):
                    loss, parts = next_event_loss(ddp, batch, cfg, proposal, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update_parameters(model)
                losses.append(loss.item())
                progress.update(
                    task,
                    advance=int(scored[idx].sum()),
                    description=f"epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.3f}",
                )
            seconds = time.perf_counter() - t0
            state["train_seconds"] += seconds
            record = {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)),
                "lr": sched.get_last_lr()[0],
                "train_seconds": round(state["train_seconds"], 2),
                "events_per_s": round(int(scored[order].sum()) * world / seconds),
            }
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                best = model if ema is None else ema.module  # what is validated and saved as the run's model
                valid = evaluate_split(best, tl, "valid", device)
                record["valid"] = valid
                if valid["ndcg@10"] > state["best_ndcg10"]:
                    state.update(best_ndcg10=valid["ndcg@10"], best_epoch=epoch + 1, bad_epochs=0)
                    if rank == 0:
                        write_dir_atomically(
                            out / "model", lambda tmp: save_encoder(best, tmp), force=True, marker=MARKER
                        )
                else:
                    state["bad_epochs"] += 1
            state["history"].append(record)
            state["epoch"] = epoch + 1
            if rank == 0:
                _save_checkpoint(out, model, opt, sched, ema, state)
                write_json(out / "history.json", state["history"])
            barrier(world)
            run_epochs += 1
            if epochs_this_run is not None and run_epochs >= epochs_this_run:
                break
            if cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s:
                break
    summary = {
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "best_valid_ndcg@10": state["best_ndcg10"],
        "train_seconds": round(state["train_seconds"], 2),
        "parameters": model.num_parameters(),
        "finished": state["epoch"] >= cfg.epochs or state["bad_epochs"] >= cfg.patience,
        "runtime": runtime(),
    }
    if world > 1:  # every replica must hold the same weights; record each one's hash to prove it
        hashes = [None] * world
        dist.all_gather_object(hashes, state_hash(model))
        summary["replica_sha256"] = hashes
    if rank == 0:
        write_json(out / "summary.json", summary)
    return summary
