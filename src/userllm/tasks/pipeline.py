"""A trained run, ready to answer: ``userllm.load(RUN)`` and what every user of a run shares.

:class:`Pipeline` holds everything a `userllm train` run needs to answer (its resolved config, the model
with its trained weights, the tokenizer, the user encoder and the task data over the run's dataset) and
answers as ``userllm evaluate`` scores: ``answer`` ranks the task's answers (titles, categories) with the
constrained search, ``generate`` writes free text. Training, evaluation, serving and the benchmarks build
and load runs through this module (:func:`build`, :meth:`Pipeline.from_pretrained`).

Example::

    import userllm

    run = userllm.load("runs/xattn")                     # a `userllm train` run directory
    run.answer(["122", "125"], top=3)                    # each user's top 3 answers with probabilities
    run.generate("122", "Which movie will this user watch next?")
    encoder = userllm.load("runs/encoder")               # a `userllm pretrain` run: its EncoderRun
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from userllm.config import EncoderConfig, TrainConfig, with_overrides
from userllm.data.dataset import PreparedDataset
from userllm.encoder.data import Timelines
from userllm.encoder.model import UserEncoder
from userllm.encoder.pretrained import EncoderRun, build_encoder, load_encoder
from userllm.errors import ConfigError, InputError, OutputExistsError
from userllm.io import write_file_atomically
from userllm.llm.backbone import Backbone, load_backbone
from userllm.llm.base import ConditionedLM
from userllm.llm.connectors import mean_token_embeddings
from userllm.llm.decoding import TokenTrie, constrained_beam_search
from userllm.llm.model import UserLLM
from userllm.llm.textprompt import TextPromptLM
from userllm.precision import autocast
from userllm.tasks import prompts
from userllm.tasks.data import TaskData, TaskExample


def task_encoder(cfg: TrainConfig, ds: PreparedDataset) -> UserEncoder:
    """The stage-1 encoder of ``cfg.encoder`` (checked against the dataset), or a seeded random one."""
    if cfg.encoder is None:
        raise ConfigError("--method userllm needs --encoder RUN_DIR (a `userllm pretrain` run) or --encoder random")
    if cfg.encoder == "random":
        enc_cfg: EncoderConfig = cfg.random_encoder
        return build_encoder(
            ds, enc_cfg.model_copy(update={"max_len": max(enc_cfg.max_len, cfg.max_history)}), cfg.seed
        )
    encoder = load_encoder(Path(cfg.encoder))
    if encoder.cfg.num_items != ds.num_items:
        raise InputError(
            f"encoder {cfg.encoder} was trained on a catalogue of {encoder.cfg.num_items} items, dataset "
            f"{ds.root} has {ds.num_items}: pretrain it on this dataset"
        )
    if encoder.cfg.max_len < cfg.max_history:
        raise ConfigError(
            f"--max-history {cfg.max_history} is longer than encoder {cfg.encoder} reads "
            f"(max_len {encoder.cfg.max_len}); pretrain one with -s encoder.max_len={cfg.max_history}"
        )
    return encoder


def item_word_tables(ds: PreparedDataset, backbone: Backbone, names: list[str]) -> dict[str, torch.Tensor]:
    """For :class:`~userllm.llm.connectors.ItemWords` and :class:`~userllm.llm.connectors.EncoderCandidates`: per
    item index (V, d), the mean input embedding of its title's tokens (``title``) and the mean over its
    categories of their names' (``category``); zeros for the padding and unknown items."""
    embed, tok = backbone.model.get_input_embeddings(), backbone.tokenizer
    tables = {}
    if "title" in names:
        tables["title"] = mean_token_embeddings(tok, embed, ["", "", *ds.item_titles[2:]])
    if "category" in names:
        per_category = mean_token_embeddings(tok, embed, ["", "", *ds.vocab["category"][2:]])
        rows = [[c for c in cats if c > 1] for cats in ds.item_categories]
        tables["category"] = torch.stack([per_category[r].mean(0) if r else per_category[0] for r in rows])
        tables["category"][:2] = 0.0
    return tables


def write_title_embeddings(
    dataset: Path, out: Path, *, backbone: str = "smollm2-135m", force: bool = False
) -> tuple[int, int]:
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
            raise ConfigError(
                f"a text prompt with candidates={cfg.llm.candidates} lists a pretrained stage-1 "
                "encoder's top items: give --encoder RUN_DIR (a `userllm pretrain` run)"
            )
        listing = task_encoder(cfg, ds)
    backbone = backbone or load_backbone(cfg.llm.backbone)
    torch.manual_seed(cfg.seed)
    if encoder is None:
        data = TaskData(
            ds,
            backbone.tokenizer,
            task=cfg.task,
            method=cfg.method,
            max_history=cfg.max_history,
            candidates=cfg.llm.candidates if listing is not None else 0,
            candidate_encoder=listing,
            exclude_history=cfg.llm.exclude_history,
        )
        return TextPromptLM(cfg.llm, llm=backbone.model), data
    if cfg.encoder_dropout is not None:
        encoder.set_dropout(cfg.encoder_dropout)
    words = item_word_tables(ds, backbone, UserLLM.word_tables_needed(cfg.llm))
    model = UserLLM(cfg.llm, encoder=encoder, llm=backbone.model, item_words=words)
    tl = Timelines.from_dataset(ds, encoder.cfg.time_gap_buckets)
    return model, TaskData(
        ds,
        backbone.tokenizer,
        task=cfg.task,
        method=cfg.method,
        max_history=cfg.max_history,
        timelines=tl,
        exclude_history=cfg.llm.exclude_history,
    )


def stage1_encoder(cfg: TrainConfig, data: TaskData) -> UserEncoder | None:
    """The stage-1 encoder a run names (``cfg.encoder``), or None when it has none or it reads fewer events
    than the run's history window."""
    if cfg.encoder in (None, "random"):
        return None
    encoder = load_encoder(Path(cfg.encoder))
    return encoder if encoder.cfg.max_len >= data.max_history else None


def shortlist_items(
    cfg: TrainConfig, data: TaskData, examples: list[TaskExample], encoder: UserEncoder | None = None
) -> list[list[int]]:
    """Each example's stage-1 shortlist: the ``cfg.shortlist`` item indices the run's stage-1 encoder
    (``encoder``, else :func:`stage1_encoder`) scores highest after its history (:meth:`TaskData.encoder_top`)."""
    encoder = encoder if encoder is not None else stage1_encoder(cfg, data)
    if encoder is None:
        raise InputError(
            f"shortlist={cfg.shortlist} ranks the stage-1 encoder's items, but the run's encoder is "
            f"{cfg.encoder!r}: give a `userllm pretrain` run whose max_len >= max_history "
            f"({data.max_history}) as `encoder`"
        )
    return data.encoder_top(encoder, examples, cfg.shortlist)


def shortlists(
    cfg: TrainConfig, data: TaskData, examples: list[TaskExample], encoder: UserEncoder | None = None
) -> dict[str, list[int]] | None:
    """next_item with ``cfg.shortlist`` N: each (test) example's :func:`shortlist_items` by user, {user_id: its
    N item indices}; None otherwise."""
    if data.task != "next_item" or not cfg.shortlist:
        return None
    return {ex.user_id: row for ex, row in zip(examples, shortlist_items(cfg, data, examples, encoder))}


def answer_trie(data: TaskData) -> TokenTrie:
    """The token trie of the task's answer vocabulary (titles or categories); answer i is vocabulary index i + 2."""
    return TokenTrie([data.tokens(v) for v in data.answer_vocabulary()[2:]], eos_token_id=data.tokenizer.eos_token_id)


def shortlist_titles(vocab: list[str], items: list[int]) -> list[str]:
    """The distinct titles of a shortlist's item indices, in its order (two items may share a title)."""
    return list(dict.fromkeys(vocab[i] for i in items))


def answer_space(
    data: TaskData, trie: TokenTrie, examples: list[TaskExample], shortlists: dict[str, list[int]] | None = None
) -> tuple[TokenTrie | list[TokenTrie], list[list[str]]]:
    """What the constrained search may answer for a batch, and each row's answers in trie order: ``trie``
    (the whole answer vocabulary) for every row, or per row a trie of the distinct titles of the user's
    shortlist (item indices, :func:`shortlists`; two items may share a title)."""
    vocab = data.answer_vocabulary()
    if shortlists is None:
        return trie, [vocab[2:]] * len(examples)
    names = [shortlist_titles(vocab, shortlists[ex.user_id]) for ex in examples]
    eos = data.tokenizer.eos_token_id
    return [TokenTrie([data.tokens(t) for t in row], eos_token_id=eos) for row in names], names


@dataclass
class Pipeline:
    """A trained run (User-LLM or the text-prompt baseline) with all it needs to answer; see the module.

    ``cfg``: the run's resolved :class:`TrainConfig` (with ``bf16`` as asked at load); ``model``: the trained
    :class:`~userllm.llm.model.UserLLM` or :class:`~userllm.llm.textprompt.TextPromptLM`, in eval mode;
    ``data``: the task data over the run's dataset (tokenizer, prompts, timelines).
    """

    cfg: TrainConfig
    model: ConditionedLM
    data: TaskData
    run_dir: Path | None = None
    _stage1: list = field(default_factory=list, repr=False)  # the stage-1 encoder, once loaded

    @classmethod
    def from_pretrained(cls, run_dir: Path, *, device: str = "cpu", bf16: bool | None = None) -> Pipeline:
        """Load a `userllm train` run directory (``model/``, ``config.json``); ``bf16``: answer under bf16
        autocast (None: as the run trained, as ``userllm evaluate`` scores it)."""
        run_dir = Path(run_dir)
        weights = run_dir / "model" / "userllm.safetensors"
        if not weights.exists():
            raise InputError(
                f"{run_dir} holds no trained model (model/userllm.safetensors); train one with `userllm train`"
            )
        cfg = TrainConfig.from_saved(json.loads((run_dir / "config.json").read_text()))
        model, data = build(cfg, PreparedDataset(cfg.dataset))
        model.load_trained(run_dir / "model", load_file(weights))
        return cls(with_overrides(cfg, bf16=bf16), model.to(device).eval(), data, run_dir)

    @property
    def tokenizer(self):
        return self.data.tokenizer

    @property
    def dataset(self) -> PreparedDataset:
        return self.data.ds

    @property
    def encoder(self) -> UserEncoder | None:
        """The user encoder the model reads (User-LLM), else None."""
        return getattr(self.model, "encoder", None)

    def stage1_encoder(self) -> UserEncoder | None:
        """The run's stage-1 encoder (``cfg.encoder``: the shortlist, TP's listed candidates, the encoder-alone
        reference), loaded once; None without one (see :func:`stage1_encoder`)."""
        if not self._stage1:
            self._stage1.append(stage1_encoder(self.cfg, self.data))
        return self._stage1[0]

    def shortlists(self, examples: list[TaskExample]) -> dict[str, list[int]] | None:
        """next_item with a shortlist: each example's stage-1 items by user (:func:`shortlists`); else None."""
        if self.data.task != "next_item" or not self.cfg.shortlist:
            return None
        return shortlists(self.cfg, self.data, examples, self.stage1_encoder())

    def request(self, user_id: str, instruction: str | None = None) -> TaskExample:
        """A request about one user of the run's dataset: ``instruction`` (default: the task's) over their last
        ``max_history`` events."""
        data = self.data
        ids = data.ds.sequences.get_column("user_id").to_list()
        if user_id not in ids:
            raise InputError(f"user {user_id!r} is not in dataset {self.cfg.dataset} (user ids look like {ids[0]!r})")
        u = ids.index(user_id)
        end = int(data.tl.lengths[u])
        text = instruction if instruction is not None else prompts.instruction(data.task, data.words)
        return data.request(u, max(0, end - self.cfg.max_history), end, text, user_id)

    @torch.no_grad()
    def answer(self, user_ids: list[str], *, top: int = 5) -> list[dict]:
        """The run's task answered for each user from their latest history, as evaluation answers it: the ``top``
        answers of the constrained beam search (titles or categories) with their probabilities, beside the
        user's most recent titles and most frequent categories (what the answer should reflect)."""
        data, model = self.data, self.model
        if data.task == "review":
            raise InputError(f"{self.run_dir}: a review run writes free text; use `generate` for it")
        examples = [self.request(u) for u in user_ids]
        vocab = data.answer_vocabulary()
        tries, names = answer_space(data, answer_trie(data), examples, self.shortlists(examples))
        ids, mask, _ = data.batch(examples, with_answers=False)
        users = data.user_batch(examples) if self.cfg.method == "userllm" else None
        with autocast(self.cfg.bf16), model.conditioned(users, ids, mask) as (embeds, prefix_mask):
            found = constrained_beam_search(model, embeds, prefix_mask, tries, beams=min(top, len(vocab) - 2))
        out = []
        for r, (ex, row) in enumerate(zip(examples, found)):
            rows = data.tl.offsets[ex.user_idx] + np.arange(ex.start, ex.end)
            items = data.tl.item[rows]
            cats = Counter(data.categories[c] for i in items for c in data.ds.item_categories[i] if c > 1)
            out.append(
                {
                    "user_id": ex.user_id,
                    "events": ex.history_len,
                    "recent": [data.ds.item_titles[i] for i in items[-3:][::-1]],
                    "top_categories": [c for c, _ in cats.most_common(3)],
                    "answers": [(names[r][i], math.exp(s)) for i, s in row],
                }
            )
        return out

    @torch.no_grad()
    def generate(self, user_id: str, instruction: str, *, max_new_tokens: int = 48) -> str:
        """A personalized answer for one user of the run's dataset (history: their last events), greedy."""
        example = self.request(user_id, instruction)
        ids, mask, _ = self.data.batch([example], with_answers=False)
        users = self.data.user_batch([example]) if self.cfg.method == "userllm" else None
        eos = self.tokenizer.eos_token_id
        with autocast(self.cfg.bf16):
            new = self.model.generate(
                users, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos
            )
        return self.tokenizer.decode([t for t in new[0].tolist() if t != eos], skip_special_tokens=True).strip()


def load(path: Path, *, device: str = "cpu", bf16: bool | None = None) -> Pipeline | EncoderRun:
    """A trained run ready to use: a `userllm train` run as a :class:`Pipeline`, a `userllm pretrain` run (or
    a saved encoder directory) as an :class:`~userllm.encoder.pretrained.EncoderRun`."""
    path = Path(path)
    config = path / "config.json"
    if (path / "model" / "userllm.safetensors").exists() or (
        config.exists() and "task" in json.loads(config.read_text())
    ):
        return Pipeline.from_pretrained(path, device=device, bf16=bf16)
    return EncoderRun.from_pretrained(path, device=device)
