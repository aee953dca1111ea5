"""``userllm train``: fine-tune User-LLM or the text-prompt baseline on one task (stage 2).

A flat loop over a fixed budget of training examples (``train_examples``, drawn in a seeded order from the
train split, cycling when the budget exceeds it): the language-model loss on the answer tokens only,
AdamW over exactly the strategy's trainable parameters (printed with counts at start), linear warmup then
cosine decay, gradient clipping, optional bf16 autocast. Every ``checkpoint_every`` steps (and at the end)
an atomic checkpoint (``checkpoint/``: trained weights, optimizer/scheduler state); ``--resume`` continues
to the same result as an uninterrupted run, because the example order and each step's dropout are derived
from ``seed``. Runs unchanged under ``torchrun --nproc_per_node=N`` (DistributedDataParallel, gloo on CPU,
nccl on GPU; each process takes its share of every batch). ``micro_batch_size`` splits each process's share
into parts whose gradients add up to the same step (answer tokens weighted as in the whole batch), for
prompts too long to back-propagate together.

Run directory: ``config.json``/``config.yaml`` (resolved), ``checkpoint/``, ``model/`` (the trained weights,
``userllm.safetensors`` + ``userllm.json``), ``summary.json``; ``userllm evaluate`` adds ``metrics.json``.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from userllm.config import TrainConfig, dump_config, save_config
from userllm.data.dataset import PreparedDataset
from userllm.distributed import barrier, setup_distributed
from userllm.errors import ConfigError
from userllm.io import runtime, source_commit, start_run, state_hash, write_dir_atomically, write_json
from userllm.llm.base import ConditionedLM
from userllm.llm.budget import training_bytes
from userllm.llm.flops import training_flops
from userllm.llm.model import UserLLM
from userllm.memory import available_bytes, memory_budget, peak_rss_bytes
from userllm.precision import autocast
from userllm.progress import console, progress_bar
from userllm.schedule import lr_lambda
from userllm.tasks.data import IGNORE, TaskData
from userllm.tasks.pipeline import build

MARKER = "config.json"


def print_parameters(model: ConditionedLM, strategy: str) -> None:
    table = Table(title=f"trainable parameters (strategy {strategy})")
    for col in ("group", "trainable", "total"):
        table.add_column(col, justify="left" if col == "group" else "right")
    groups = model.parameter_groups()
    for name, (trainable, total) in groups.items():
        table.add_row(name, f"{trainable:,}", f"{total:,}")
    table.add_row("all", f"{sum(t for t, _ in groups.values()):,}", f"{sum(n for _, n in groups.values()):,}")
    console.print(table)


def example_order(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` example indices: seeded permutations of ``range(n)``, one after another."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(n) for _ in range(math.ceil(count / n))])[:count]


def train(cfg: TrainConfig, *, steps_this_run: int | None = None) -> dict:
    """Fine-tune into ``cfg.out``; returns the summary (also ``summary.json``).

    ``steps_this_run`` stops after that many steps, at a checkpoint (continue with ``resume``).
    """
    rank, world, device = setup_distributed(cfg.device)
    out = Path(cfg.out)
    # every process checks the run directory before any writes; an old run is replaced only once the new one
    # is known to fit the memory
    start_run(out, resume=cfg.resume, force=cfg.force, rank=rank, marker=MARKER, empty=False)
    ds = PreparedDataset(cfg.dataset)
    model, data = build(cfg, ds)
    model.to(device)
    examples = data.examples("train")
    lengths = part_lengths(data, examples, cfg)  # (events, tokens) of every example, tokenized once
    example_flops = np.array([training_flops(model, n_events=n, tokens=t) or 0 for n, t in lengths])
    # a run that cannot fit stops here, nothing written
    memory = memory_plan(model, max(t for _, t in lengths), cfg, world)
    if rank == 0 and cfg.force and not cfg.resume:  # now the old run is replaced
        start_run(out, resume=False, force=True, rank=0, marker=MARKER)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dump_config(cfg))
        save_config(cfg, out / "config.yaml")
        print_parameters(model, cfg.llm.strategy)
        console.print(memory["message"])
    steps = (
        math.ceil(cfg.train_examples / cfg.batch_size) if cfg.train_flops is None else flops_steps(example_flops, cfg)
    )
    order = example_order(len(examples), steps * cfg.batch_size, cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, steps))
    state = {"step": 0, "tokens": 0, "flops": 0, "seconds": 0.0, "losses": [], "gates": [], "commit": source_commit()}
    ckpt = out / "checkpoint"
    if cfg.resume:
        model.load_trained(ckpt, load_file(ckpt / "userllm.safetensors", device=device))
        saved = torch.load(ckpt / "train_state.pt", weights_only=False)
        opt.load_state_dict(saved.pop("optimizer"))
        sched.load_state_dict(saved.pop("scheduler"))
        state = {"flops": 0, "gates": [], "commit": None, **saved}  # checkpoints written before these were logged
    ddp = DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    model.train()
    with progress_bar("tokens") as progress:
        task = progress.add_task("training", total=None)
        last = steps if steps_this_run is None else min(steps, state["step"] + steps_this_run)
        for step in range(state["step"], last):
            t0 = time.perf_counter()
            chosen = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            whole = [examples[i] for i in chosen]
            batch = whole[rank::world]
            micro = memory["micro_batch_size"]
            parts = [batch[i : i + micro] for i in range(0, len(batch), micro)]
            tensors = [data.batch(part, with_answers=True, device=device) for part in parts]
            counts = [int((labels != IGNORE).sum()) for _, _, labels in tensors]  # answer tokens per part
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # this step's dropout
            opt.zero_grad(set_to_none=True)
            loss_value, tokens = 0.0, 0
            state["flops"] += int(example_flops[chosen].sum())
            for j, (part, (ids, mask, labels), count) in enumerate(zip(parts, tensors, counts)):
                users = data.user_batch(part, device) if cfg.method == "userllm" else None
                # DDP averages gradients across processes once, after the last part
                with ddp.no_sync() if world > 1 and j < len(parts) - 1 else nullcontext():
                    with autocast(cfg.bf16, device):  # the mean over this part's answer tokens, to the batch mean
                        loss = ddp(users, ids, mask, labels).loss * (count / sum(counts))
                    loss.backward()
                loss_value, tokens = loss_value + loss.item(), tokens + int(mask.sum()) * world
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            sched.step()
            state["step"], state["tokens"] = step + 1, state["tokens"] + tokens
            state["seconds"] += time.perf_counter() - t0
            state["losses"].append(round(loss_value, 5))
            progress.update(task, advance=tokens, description=f"step {step + 1}/{steps} loss {loss_value:.3f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == last:
                if isinstance(model, UserLLM) and model.xattn:
                    state["gates"].append({"step": step + 1, **{k: b.gate_report() for k, b in model.xattn.items()}})
                if rank == 0:
                    write_dir_atomically(
                        ckpt,
                        lambda tmp: _write_checkpoint(tmp, model, opt, sched, state),
                        force=True,
                        marker="userllm.json",
                    )
                barrier(world)
    summary = {
        "steps": state["step"],
        "examples": state["step"] * cfg.batch_size,
        "tokens": state["tokens"],
        "commit": state["commit"],
        "train_flops": state["flops"],
        "train_seconds": round(state["seconds"], 2),
        "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9)),
        "first_loss": state["losses"][0] if state["losses"] else None,
        "last_loss": state["losses"][-1] if state["losses"] else None,
        "losses": state["losses"],
        "gates": state["gates"],
        "parameters": {k: list(v) for k, v in model.parameter_groups().items()},
        "memory": {**{k: v for k, v in memory.items() if k != "message"}, "peak_rss_bytes": peak_rss_bytes()},
        "runtime": runtime(),
    }
    if world > 1:
        hashes = [None] * world
        torch.distributed.all_gather_object(hashes, state_hash(model))
        summary["replica_sha256"] = hashes
    if rank == 0 and state["step"] == steps:
        model.save(out / "model")
        write_json(out / "summary.json", summary)
    return summary


def memory_plan(model: ConditionedLM, longest: int, cfg: TrainConfig, world: int) -> dict:
    """Examples per forward/backward: ``cfg.micro_batch_size``, else the most of a batch's share whose
    estimated memory (:func:`~userllm.llm.budget.training_bytes` of the longest training example, ``longest``
    tokens) fits the budget: ``max_memory_gb``, or :func:`~userllm.memory.usable_bytes` less the optimizer's
    state.
    Raises :class:`ConfigError` (exit 2) when not even one example fits, naming its tokens, the estimate,
    the budget and what to change."""
    per_example = training_bytes(model, longest)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    available = available_bytes()
    budget, where = memory_budget(cfg.max_memory_gb, available=available)
    if cfg.max_memory_gb is None:
        budget -= 16 * trainable  # AdamW's moments and the gradients
    fits = min(math.ceil(cfg.batch_size / world), max(0, budget) // per_example)  # of this process's share
    if fits == 0:
        raise ConfigError(
            f"one training example of {longest:,} tokens needs about {per_example / 2**30:.1f} GiB to "
            f"back-propagate; {where} leaves {max(budget, 0) / 2**30:.1f} GiB. Shorten the history (--max-history), "
            "use a smaller backbone, or give more memory (-s max_memory_gb=..., on a larger machine)"
        )
    micro = cfg.micro_batch_size or fits
    return {
        "micro_batch_size": micro,
        "estimate_bytes_per_example": per_example,
        "budget_bytes": budget,
        "available_bytes": available,
        "longest_tokens": longest,
        "message": f"memory: micro-batches of {micro} (the longest example, {longest:,} tokens, needs about "
        f"{per_example / 2**30:.2f} GiB; {where}: {budget / 2**30:.1f} GiB)",
    }


def param_groups(model: ConditionedLM, cfg: TrainConfig) -> list[dict]:
    """AdamW groups of the trainable parameters: the tanh gates at ``lr * gate_lr_scale``, the user encoder at
    ``lr * encoder_lr_scale``, everything else at ``lr`` (the schedule scales all alike)."""
    groups: dict[str, list] = {"gates": [], "encoder": [], "rest": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "gates" if name.endswith("_gate") else "encoder" if name.startswith("encoder.") else "rest"
            groups[kind].append(p)
    scale = {"gates": cfg.gate_lr_scale, "encoder": cfg.encoder_lr_scale, "rest": 1.0}
    return [{"params": ps, "lr": cfg.lr * scale[k], "name": k} for k, ps in groups.items() if ps]


def part_lengths(data: TaskData, batch: list, cfg: TrainConfig) -> list[tuple[int, int]]:
    """(events, tokens) of each training example: its history window and its prompt + answer tokens, for
    :func:`~userllm.llm.flops.training_flops` (0 for backbones its formula does not cover)."""
    return [
        (
            ex.history_len if cfg.method == "userllm" else 0,
            len(data.tokens(ex.prompt)) + len(data.answer_tokens(ex.answer)),
        )
        for ex in batch
    ]


def flops_steps(per_example: np.ndarray, cfg: TrainConfig) -> int:
    """Steps of ``cfg.batch_size`` seeded examples until their training FLOPs (``per_example``, every training
    example's) reach ``cfg.train_flops``."""
    if per_example.max() == 0:
        raise ConfigError(
            f"train_flops needs the analytic FLOP formula, which does not cover backbone {cfg.llm.backbone}"
        )
    passes = math.ceil(cfg.train_flops / per_example.sum())  # each pass over the examples costs the same
    order = example_order(len(per_example), passes * len(per_example), cfg.seed)
    done = np.cumsum(per_example[order]) >= cfg.train_flops
    return math.ceil((int(done.argmax()) + 1) / cfg.batch_size)


def _write_checkpoint(tmp: Path, model: ConditionedLM, opt, sched, state: dict) -> None:
    model.write(tmp)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **state}, tmp / "train_state.pt")
