"""``userllm train``: fine-tune User-LLM or the text-prompt baseline on one task (stage 2).

A flat loop over a fixed budget of training examples (``train_examples``, drawn in a seeded order from the
train split, cycling when the budget exceeds it): the language-model loss on the answer tokens only (with
``rank_negatives``, plus a listwise loss ranking each answer above other titles of its stage-1 shortlist),
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

import json
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from safetensors.torch import load_file
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from userllm.config import EncoderConfig, TrainConfig, dump_config, save_config
from userllm.data.dataset import PreparedDataset
from userllm.distributed import barrier, setup_distributed
from userllm.encoder.data import Timelines
from userllm.encoder.model import UserEncoder
from userllm.encoder.train import build_encoder, load_encoder, lr_lambda, state_hash
from userllm.errors import ConfigError, EmptyResultError, InputError, OutputExistsError
from userllm.io import runtime, source_commit, start_run, write_dir_atomically, write_file_atomically, write_json
from userllm.llm.backbone import Backbone, load_backbone
from userllm.llm.connectors import first_token_embeddings, mean_token_embeddings
from userllm.llm.flops import training_flops
from userllm.llm.model import ConditionedLM, TextPromptLM, UserLLM
from userllm.precision import autocast
from userllm.progress import console, progress_bar
from userllm.tasks.data import IGNORE, TaskData, TaskExample

MARKER = "config.json"


def task_encoder(cfg: TrainConfig, ds: PreparedDataset) -> UserEncoder:
    """The stage-1 encoder of ``cfg.encoder`` (checked against the dataset), or a seeded random one."""
    if cfg.encoder is None:
        raise ConfigError("--method userllm needs --encoder RUN_DIR (a `userllm pretrain` run) or --encoder random")
    if cfg.encoder == "random":
        enc_cfg: EncoderConfig = cfg.random_encoder
        return build_encoder(ds, enc_cfg.model_copy(update={"max_len": max(enc_cfg.max_len, cfg.max_history)}), cfg.seed)
    encoder = load_encoder(Path(cfg.encoder))
    if encoder.cfg.num_items != ds.num_items:
        raise InputError(f"encoder {cfg.encoder} was trained on a catalogue of {encoder.cfg.num_items} items, dataset "
                         f"{ds.root} has {ds.num_items}: pretrain it on this dataset")  # fmt: skip
    if encoder.cfg.max_len < cfg.max_history:
        raise ConfigError(f"--max-history {cfg.max_history} is longer than encoder {cfg.encoder} reads "
                          f"(max_len {encoder.cfg.max_len}); pretrain one with -s encoder.max_len={cfg.max_history}")  # fmt: skip
    return encoder


def item_word_tables(ds: PreparedDataset, backbone: Backbone, names: list[str], title_tokens: int = 0) -> dict[str, torch.Tensor]:
    """For :class:`~userllm.llm.connectors.ItemWords` and :class:`~userllm.llm.connectors.EncoderCandidates`: per
    item index (V, d), the mean input embedding of its title's tokens (``title``) and the mean over its
    categories of their names' (``category``), and (V, ``title_tokens``, d) the input embeddings of its title's
    first tokens (``title_tokens``); zeros for the padding and unknown items."""
    embed, tok = backbone.model.get_input_embeddings(), backbone.tokenizer
    tables = {}
    if "title" in names:
        tables["title"] = mean_token_embeddings(tok, embed, ["", "", *ds.item_titles[2:]])
    if "title_tokens" in names:
        tables["title_tokens"] = first_token_embeddings(tok, embed, ["", "", *ds.item_titles[2:]], title_tokens)
    if "category" in names:
        per_category = mean_token_embeddings(tok, embed, ["", "", *ds.vocab["category"][2:]])
        rows = [[c for c in cats if c > 1] for cats in ds.item_categories]
        tables["category"] = torch.stack([per_category[r].mean(0) if r else per_category[0] for r in rows])
        tables["category"][:2] = 0.0
    return tables


def write_title_embeddings(dataset: Path, out: Path, *, backbone: str = "smollm2-135m", force: bool = False) -> tuple[int, int]:
    """The stage-1 encoder's ``text`` feature in the LLM's own words: the backbone's frozen mean input embedding
    of each item's title (``item_word_tables``' ``title`` table; zeros for padding and unknown), (V, d) float32,
    saved as ``out`` (.npy) for ``userllm pretrain --features ...,text -s item_text_path=OUT``, so the user
    embeddings carry the words the LLM has to write. Returns its shape."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out}: the item-text table is a .npy file (item_text_path); name it *.npy")
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it")
    ds = PreparedDataset(dataset)
    table = item_word_tables(ds, load_backbone(backbone), ["title"])["title"].numpy().astype(np.float32)

    def save(tmp: Path) -> None:  # through a file object: np.save would append .npy to the temporary name
        with open(tmp, "wb") as f:
            np.save(f, table)

    write_file_atomically(out, save)
    return table.shape


def build(cfg: TrainConfig, ds: PreparedDataset, backbone: Backbone | None = None) -> tuple[ConditionedLM, TaskData]:
    """The untrained model of a run (connectors seeded by ``cfg.seed``) and its task data."""
    encoder = task_encoder(cfg, ds) if cfg.method == "userllm" else None  # checked before the slow backbone load
    listing = None  # TP with llm.candidates: the stage-1 encoder whose top items the prompt lists
    if cfg.method == "textprompt" and cfg.llm.candidates:
        if cfg.encoder in (None, "random"):
            raise ConfigError(f"a text prompt with candidates={cfg.llm.candidates} lists a pretrained stage-1 "
                              "encoder's top items: give --encoder RUN_DIR (a `userllm pretrain` run)")  # fmt: skip
        listing = task_encoder(cfg, ds)
    backbone = backbone or load_backbone(cfg.llm.backbone)
    torch.manual_seed(cfg.seed)
    if encoder is None:
        data = TaskData(ds, backbone.tokenizer, task=cfg.task, method=cfg.method, max_history=cfg.max_history,
                        candidates=cfg.llm.candidates if listing is not None else 0, candidate_encoder=listing,
                        exclude_history=cfg.llm.exclude_history)  # fmt: skip
        return TextPromptLM(cfg.llm, llm=backbone.model), data
    if cfg.encoder_dropout is not None:
        encoder.set_dropout(cfg.encoder_dropout)
    words = item_word_tables(ds, backbone, UserLLM.word_tables_needed(cfg.llm), cfg.llm.candidate_tokens)
    model = UserLLM(cfg.llm, encoder=encoder, llm=backbone.model, item_words=words)
    tl = Timelines.from_dataset(ds, encoder.cfg.time_gap_buckets)
    return model, TaskData(ds, backbone.tokenizer, task=cfg.task, method=cfg.method, max_history=cfg.max_history,
                           timelines=tl, exclude_history=cfg.llm.exclude_history)  # fmt: skip


def load_run(run_dir: Path, device: str = "cpu") -> tuple[TrainConfig, ConditionedLM, TaskData]:
    """A trained run (``userllm train``'s ``model/``) with its resolved config and task data."""
    run_dir = Path(run_dir)
    weights = run_dir / "model" / "userllm.safetensors"
    if not weights.exists():
        raise InputError(f"{run_dir} holds no trained model (model/userllm.safetensors); train one with `userllm train`")
    cfg = TrainConfig.from_saved(json.loads((run_dir / "config.json").read_text()))
    model, data = build(cfg, PreparedDataset(cfg.dataset))
    model.load_trained(run_dir / "model", load_file(weights))
    return cfg, model.to(device).eval(), data


def stage1_encoder(cfg: TrainConfig, data: TaskData) -> UserEncoder | None:
    """The stage-1 encoder a run names (``cfg.encoder``), or None when it has none or it reads fewer events
    than the run's history window."""
    if cfg.encoder in (None, "random"):
        return None
    encoder = load_encoder(Path(cfg.encoder))
    return encoder if encoder.cfg.max_len >= data.max_history else None


def shortlist_items(cfg: TrainConfig, data: TaskData, examples: list[TaskExample], encoder: UserEncoder | None = None
                    ) -> list[list[int]]:  # fmt: skip
    """Each example's stage-1 shortlist: the ``cfg.shortlist`` item indices the run's stage-1 encoder
    (``encoder``, else :func:`stage1_encoder`) scores highest after its history (:meth:`TaskData.encoder_top`)."""
    encoder = encoder if encoder is not None else stage1_encoder(cfg, data)
    if encoder is None:
        raise InputError(f"shortlist={cfg.shortlist} ranks the stage-1 encoder's items, but the run's encoder is "
                         f"{cfg.encoder!r}: give a `userllm pretrain` run whose max_len >= max_history "
                         f"({data.max_history}) as `encoder`")  # fmt: skip
    return data.encoder_top(encoder, examples, cfg.shortlist)


def shortlists(cfg: TrainConfig, data: TaskData, examples: list[TaskExample], encoder: UserEncoder | None = None
               ) -> dict[str, list[int]] | None:  # fmt: skip
    """next_item with ``cfg.shortlist`` N: each (test) example's :func:`shortlist_items` by user, {user_id: its
    N item indices}; None otherwise."""
    if data.task != "next_item" or not cfg.shortlist:
        return None
    return {ex.user_id: row for ex, row in zip(examples, shortlist_items(cfg, data, examples, encoder))}


def training_shortlists(cfg: TrainConfig, data: TaskData, examples: list[TaskExample]) -> list[list[int]] | None:
    """The training examples' :func:`shortlist_items`, computed once for what needs them
    (``train_on_shortlist``, ``rank_negatives``); None when nothing does."""
    return shortlist_items(cfg, data, examples) if cfg.train_on_shortlist or cfg.rank_negatives else None


def shortlisted(cfg: TrainConfig, examples: list[TaskExample], rows: list[list[int]] | None
                ) -> tuple[list[TaskExample], list[list[int]] | None]:  # fmt: skip
    """With ``cfg.train_on_shortlist``: the training examples whose target is among their stage-1 shortlist
    ``rows`` (:func:`training_shortlists`), the only answers a reranker of that list can give, with their rows;
    ``examples`` and ``rows`` as given otherwise."""
    if not cfg.train_on_shortlist:
        return examples, rows
    kept = [(ex, row) for ex, row in zip(examples, rows) if ex.label in row]
    if not kept:
        raise EmptyResultError(f"no training example's target is among the stage-1 encoder's {cfg.shortlist} items: "
                               "raise shortlist or leave train_on_shortlist off")  # fmt: skip
    console.print(f"train_on_shortlist: {len(kept):,} of {len(examples):,} training examples have their target "
                  f"among the stage-1 encoder's top {cfg.shortlist}")  # fmt: skip
    return [ex for ex, _ in kept], [row for _, row in kept]


def rank_negatives(cfg: TrainConfig, data: TaskData, examples: list[TaskExample], rows: list[list[int]] | None
                   ) -> list[list[int]] | None:  # fmt: skip
    """With ``cfg.rank_negatives`` k: per training example, k item indices drawn from its stage-1 shortlist
    (``rows``, :func:`training_shortlists`) among the titles other than its answer, seeded by ``cfg.seed`` and
    the example's position (with replacement only where fewer than k remain); None without."""
    if not cfg.rank_negatives:
        return None
    titles, out = data.ds.item_titles, []
    for i, (ex, row) in enumerate(zip(examples, rows)):
        pool = [j for j in row if titles[j] != ex.answer]
        picks = np.random.default_rng([cfg.seed, i]).choice(len(pool), cfg.rank_negatives, replace=len(pool) < cfg.rank_negatives)
        out.append([pool[j] for j in picks])
    return out


def scored_sequences(data: TaskData, examples: list[TaskExample], negatives: list[list[int]] | None) -> list[list[TaskExample]]:
    """What training scores of each example: the example itself, followed (with ``negatives``, see
    :func:`rank_negatives`) by its copies that answer each negative's title instead."""
    if negatives is None:
        return [[ex] for ex in examples]
    titles = data.ds.item_titles
    return [[ex, *(replace(ex, answer=titles[j], label=j) for j in row)] for ex, row in zip(examples, negatives)]


def answer_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """Each row's teacher-forced log-probability of its answer, summed over its answer tokens (labels != -100;
    answer + eos): (b,) from ``logits`` (b, t, V) and ``labels`` (b, t). What the constrained search ranks
    titles by."""
    target = labels[:, 1:]
    keep = target != IGNORE
    logp = logits[:, :-1][keep].float().log_softmax(-1).gather(1, target[keep][:, None])[:, 0]
    return torch.zeros(len(labels), dtype=logp.dtype, device=logp.device).index_add(0, keep.nonzero()[:, 0], logp)


def listwise_loss(logits: Tensor, labels: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """For rows in groups of ``group`` (an answer, then its negatives, :func:`scored_sequences`): the summed
    language-model loss of the answers' tokens (the first row of each group), and the summed listwise loss

        -log softmax(s)_0,   s_j = log p(title_j + eos | prompt, user)   (:func:`answer_log_probs`)

    over the groups, which is lowest when each answer outscores its negatives."""
    scores = answer_log_probs(logits, labels).view(-1, group)
    return -scores[:, 0].sum(), -scores.log_softmax(1)[:, 0].sum()


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
    start_run(out, resume=cfg.resume, force=cfg.force, rank=rank, marker=MARKER)
    ds = PreparedDataset(cfg.dataset)
    model, data = build(cfg, ds)
    model.to(device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dump_config(cfg))
        save_config(cfg, out / "config.yaml")
        print_parameters(model, cfg.llm.strategy)
    examples = data.examples("train")
    examples, rows = shortlisted(cfg, examples, training_shortlists(cfg, data, examples))
    groups = scored_sequences(data, examples, rank_negatives(cfg, data, examples, rows))
    size = 1 + cfg.rank_negatives  # sequences per example: its answer, then its negatives
    steps = math.ceil(cfg.train_examples / cfg.batch_size) if cfg.train_flops is None else flops_steps(model, data, groups, cfg)
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
            whole = [groups[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            batch = whole[rank::world]
            micro = cfg.micro_batch_size or len(batch)
            parts = [[seq for g in batch[i : i + micro] for seq in g] for i in range(0, len(batch), micro)]
            tensors = [data.batch(part, with_answers=True, device=device) for part in parts]
            counts = [int((labels[::size] != IGNORE).sum()) for _, _, labels in tensors]  # answer tokens per part
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # this step's dropout
            opt.zero_grad(set_to_none=True)
            loss_value, tokens = 0.0, 0
            state["flops"] += sum(training_flops(model, n_events=n, tokens=t) or 0
                                  for n, t in part_lengths(data, [seq for g in whole for seq in g], cfg))  # fmt: skip
            for j, (part, (ids, mask, labels), count) in enumerate(zip(parts, tensors, counts)):
                users = data.user_batch(part, device) if cfg.method == "userllm" else None
                # DDP averages gradients across processes once, after the last part
                with ddp.no_sync() if world > 1 and j < len(parts) - 1 else nullcontext():
                    with autocast(cfg.bf16, device):
                        if size == 1:  # the model's loss is the mean over this part's answer tokens: to the batch mean
                            loss = ddp(users, ids, mask, labels).loss * (count / sum(counts))
                        else:  # the same language-model loss, plus the listwise loss averaged over the batch
                            lm, ranking = listwise_loss(ddp(users, ids, mask).logits, labels, size)
                            loss = lm / sum(counts) + ranking / len(batch)
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
                    write_dir_atomically(ckpt, lambda tmp: _write_checkpoint(tmp, model, opt, sched, state),
                                         force=True, marker="userllm.json")  # fmt: skip
                barrier(world)
    summary = {
        "steps": state["step"], "examples": state["step"] * cfg.batch_size, "tokens": state["tokens"],
        "commit": state["commit"], "train_flops": state["flops"], "train_seconds": round(state["seconds"], 2),
        "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9)),
        "first_loss": state["losses"][0] if state["losses"] else None, "last_loss": state["losses"][-1] if state["losses"] else None,
        "losses": state["losses"], "gates": state["gates"],
        "parameters": {k: list(v) for k, v in model.parameter_groups().items()}, "runtime": runtime(),
    }  # fmt: skip
    if world > 1:
        hashes = [None] * world
        torch.distributed.all_gather_object(hashes, state_hash(model))
        summary["replica_sha256"] = hashes
    if rank == 0 and state["step"] == steps:
        model.save(out / "model")
        write_json(out / "summary.json", summary)
    return summary


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
    return [(ex.history_len if cfg.method == "userllm" else 0, len(data.tokens(ex.prompt)) + len(data.answer_tokens(ex.answer)))
            for ex in batch]  # fmt: skip


def flops_steps(model: ConditionedLM, data: TaskData, groups: list[list[TaskExample]], cfg: TrainConfig) -> int:
    """Steps of ``cfg.batch_size`` seeded examples until their training FLOPs (every sequence of each example,
    :func:`scored_sequences`) reach ``cfg.train_flops``."""
    per_example = np.array([sum(training_flops(model, n_events=n, tokens=t) or 0 for n, t in part_lengths(data, g, cfg))
                            for g in groups])  # fmt: skip
    if per_example.max() == 0:
        raise ConfigError(f"train_flops needs the analytic FLOP formula, which does not cover backbone {cfg.llm.backbone}")
    passes = math.ceil(cfg.train_flops / per_example.sum())  # each pass over the examples costs the same
    order = example_order(len(groups), passes * len(groups), cfg.seed)
    done = np.cumsum(per_example[order]) >= cfg.train_flops
    return math.ceil((int(done.argmax()) + 1) / cfg.batch_size)


def _write_checkpoint(tmp: Path, model: ConditionedLM, opt, sched, state: dict) -> None:
    model.write(tmp)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), **state}, tmp / "train_state.pt")
