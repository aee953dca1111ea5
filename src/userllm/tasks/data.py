"""Task examples: from a prepared dataset to prompts, answers and token batches, for both methods.

========================  ===============================================================================
task                      answer (after the prompt, ended by the tokenizer's eos token)
========================  ===============================================================================
``next_item``             the title of the user's next item
``favorite_genre``        the most frequent category of the history window (ties: the most recent);
                          recomputed for ``max_history``
``review``                the review text the user wrote for the target item (its title and rating are
                          in the prompt); only datasets with review text
========================  ===============================================================================

The history of an example is the up-to-``max_history`` events before its target, the same window for the
embeddings (User-LLM) and for the text lines (TP). Examples come from ``examples.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from userllm.data.dataset import PreparedDataset
from userllm.data.prepare import favorite_categories
from userllm.encoder.data import Timelines
from userllm.errors import EmptyResultError, InputError
from userllm.progress import progress_bar
from userllm.tasks import prompts

IGNORE = -100  # label of prompt and padding tokens


@dataclass
class TaskExample:
    """One prompt/answer pair: user ``user_idx``'s events ``[start, end)`` are the history, ``end`` the target."""

    user_idx: int
    user_id: str
    start: int
    end: int
    prompt: str  # rendered prompt text (chat template applied)
    answer: str  # the target text
    label: int  # target item index (next_item, review) or category index (favorite_genre)

    @property
    def history_len(self) -> int:
        return self.end - self.start


class TaskData:
    """Everything a task needs from a dataset: examples of a split, the answer vocabulary, token batches.

    Example::

        data = TaskData(ds, tokenizer, task="next_item", method="textprompt", max_history=50)
        examples = data.examples("test")
        ids, mask, labels = data.batch(examples[:4], with_answers=True)
    """

    def __init__(
        self,
        ds: PreparedDataset,
        tokenizer,
        *,
        task: str,
        method: str,
        max_history: int,
        timelines: Timelines | None = None,
        candidates: int = 0,
        candidate_encoder=None,
        exclude_history: bool = False,
    ) -> None:
        self.ds, self.tokenizer, self.task, self.method, self.max_history = ds, tokenizer, task, method, max_history
        self.tl = timelines or Timelines.from_dataset(ds)
        self.exclude_history = exclude_history  # the encoder's top items leave out the history's (llm.exclude_history)
        # TP with candidates: the prompt also lists the titles of the stage-1 encoder's top k next items
        self.candidates, self.candidate_encoder = candidates, candidate_encoder
        self.shuffle_seed: int | None = None  # set: every history window's events in a seeded random order
        if candidates and (method != "textprompt" or candidate_encoder is None):
            raise InputError("prompt candidates are for the text prompt (TP), from a stage-1 encoder")
        self.words = prompts.domain_words(ds.manifest.get("source", ""))
        self.categories: list[str] = ds.vocab["category"]
        self.ratings: list[str] = ds.vocab["rating"]
        if tokenizer.eos_token_id is None:
            raise InputError("the backbone's tokenizer has no eos token: answers could not be ended")

    # ----------------------------------------------------------------- answers
    def answer_vocabulary(self) -> list[str]:
        """What a constrained answer may be: every item title (next_item) or every category name."""
        if self.task == "next_item":
            return self.ds.item_titles
        return self.categories

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def answer_tokens(self, text: str) -> list[int]:
        return self.tokens(text) + [self.tokenizer.eos_token_id]

    # ----------------------------------------------------------------- examples
    def _frame(self, split: str, users: list[int] | None) -> pl.DataFrame:
        ex = self.ds.examples.filter(pl.col("split") == split)
        if users is not None:
            ex = ex.filter(pl.col("user_idx").is_in(users))
        ex = ex.with_columns(history_start=(pl.col("target_pos") - self.max_history).clip(lower_bound=0))
        if self.task == "review":
            ex = ex.filter(pl.col("review_text").is_not_null() & (pl.col("review_text").str.strip_chars() != ""))
            if ex.height == 0:
                raise EmptyResultError(
                    f"{self.ds.root}: no {split} example has review text; the review task needs a "
                    "dataset with reviews (amazon, google-local, synthetic)"
                )
        if self.task == "favorite_genre":
            offsets = self.tl.offsets[ex.get_column("user_idx").to_numpy()]
            windows = pl.DataFrame(
                {
                    "g0": offsets + ex.get_column("history_start").to_numpy(),
                    "g1": offsets + ex.get_column("target_pos").to_numpy(),
                }
            )
            item_cats = self.ds.items.select("item_idx", "category_idx")
            with progress_bar("examples", transient=True) as progress:
                fav = favorite_categories(windows, self.tl.item, item_cats, progress)
            ex = ex.with_columns(fav).filter(pl.col("favorite_category").is_not_null())
        if ex.height == 0:
            raise EmptyResultError(f"{self.ds.root}: no {split} examples for task {self.task}")
        return ex

    def examples(self, split: str, users: list[int] | None = None) -> list[TaskExample]:
        """The split's examples (optionally of some users only), prompts rendered for this method."""
        out = []
        for row in self._frame(split, users).iter_rows(named=True):
            answer, label, text = self._answer(row)
            out.append(
                TaskExample(
                    row["user_idx"], row["user_id"], row["history_start"], row["target_pos"], text, answer, label
                )
            )
        return self._rendered(out)

    def _rendered(self, examples: list[TaskExample]) -> list[TaskExample]:
        """``examples`` whose ``prompt`` holds the bare instruction, with their prompts rendered for this method:
        TP writes the history (and the encoder's candidates, when configured) in front of it."""
        tops = self.encoder_top(self.candidate_encoder, examples, self.candidates) if self.candidates else None
        for i, ex in enumerate(examples):
            lines = self.history_lines(ex.user_idx, ex.start, ex.end) if self.method == "textprompt" else None
            listed = [self.ds.item_titles[j] for j in tops[i]] if tops else None
            ex.prompt = prompts.render(self.tokenizer, ex.prompt, lines, self.words, listed)
        return examples

    def answers(self, split: str, users: list[int] | None = None) -> list[str]:
        """The answers of :meth:`examples`, without rendering any prompt."""
        return [self._answer(row)[0] for row in self._frame(split, users).iter_rows(named=True)]

    def _answer(self, row: dict) -> tuple[str, int, str]:
        """One example row's answer, its label (category or item index) and the task's instruction."""
        if self.task == "favorite_genre":
            label = row["favorite_category"]
            return self.categories[label], int(label), prompts.instruction("favorite_genre", self.words)
        label = row["target_item"]
        if self.task == "next_item":
            return self.ds.item_titles[label], int(label), prompts.instruction("next_item", self.words)
        title, rating = self.ds.item_titles[label], prompts.rating_text(row["target_rating"])
        return (
            row["review_text"].strip(),
            int(label),
            prompts.instruction("review", self.words, title=title, rating=rating),
        )

    def request(self, user: int, start: int, end: int, text: str, user_id: str = "") -> TaskExample:
        """An unlabelled example: ``text`` (an instruction) about user ``user``'s events ``[start, end)``,
        rendered for this method (the history written out in front of it for TP)."""
        return self._rendered([TaskExample(user, user_id, start, end, text, "", -1)])[0]

    def window_rows(self, user: int, start: int, end: int) -> np.ndarray:
        """The timeline rows of user ``user``'s events ``[start, end)``, oldest first; with ``shuffle_seed``
        the same events in a random order, seeded by the seed, the user and the window (an ablation: does the
        model read the order of the history?)."""
        rows = self.tl.offsets[user] + np.arange(start, end)
        if self.shuffle_seed is not None:
            rows = np.random.default_rng([self.shuffle_seed, user, start, end]).permutation(rows)
        return rows

    def history_lines(self, user: int, start: int, end: int) -> list[str]:
        """TP serialization: one line per event of ``[start, end)``, oldest first (see :meth:`window_rows`)."""
        rows = self.window_rows(user, start, end)
        cats = self.ds.item_categories
        return [
            prompts.history_line(
                self.ds.item_titles[i], self.ratings[r], [self.categories[c] for c in cats[i] if c > 1]
            )
            for i, r in zip(self.tl.item[rows], self.tl.rating[rows])
        ]

    # ----------------------------------------------------------------- batches
    def batch(
        self, examples: list[TaskExample], *, with_answers: bool, device: str = "cpu"
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Left-padded ``input_ids`` (b, t), ``attention_mask`` (b, t) and, with answers, ``labels`` (b, t)
        that score only the answer tokens (prompt and padding are -100)."""
        seqs, labels = [], []
        for ex in examples:
            prompt = self.tokens(ex.prompt)
            answer = self.answer_tokens(ex.answer) if with_answers else []
            seqs.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
        t = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((len(seqs), t), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        lab = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
        for r, (s, answer) in enumerate(zip(seqs, labels)):
            ids[r, t - len(s) :], mask[r, t - len(s) :], lab[r, t - len(answer) :] = (
                torch.tensor(s),
                1,
                torch.tensor(answer),
            )
        return ids.to(device), mask.to(device), (lab.to(device) if with_answers else None)

    def user_batch(
        self, examples: list[TaskExample], device: str = "cpu", timelines: Timelines | None = None
    ) -> dict[str, Tensor]:
        """The encoder's input for the examples' history windows (b, n) (from ``timelines``: default, this
        data's)."""
        tl = timelines or self.tl
        if self.shuffle_seed is not None:  # each window's events in their shuffled order, right-padded
            rows = [self.window_rows(e.user_idx, e.start, e.end) for e in examples]
            n = max(len(r) for r in rows)
            out = {}
            for name in ("item", "rating", "time_gap"):
                table = np.zeros((len(rows), n), dtype=getattr(tl, name).dtype)
                for i, r in enumerate(rows):
                    table[i, : len(r)] = getattr(tl, name)[r]
                out[name] = torch.from_numpy(table).to(device)
            return out
        users = np.array([e.user_idx for e in examples])
        starts = np.array([e.start for e in examples])
        ends = np.array([e.end for e in examples])
        return tl.collate(users, starts, ends, device=device)

    def encoder_batches(self, encoder, examples: list[TaskExample], batch_size: int = 256):
        """The encoder inputs of the examples' history windows, ``batch_size`` at a time, read with the
        encoder's own time-gap buckets (a TP run's timelines may have been built with others)."""
        tl = self.tl
        if tl.num_gap_buckets != encoder.cfg.time_gap_buckets:
            tl = Timelines.from_dataset(self.ds, encoder.cfg.time_gap_buckets)
        for c in range(0, len(examples), batch_size):
            yield self.user_batch(examples[c : c + batch_size], timelines=tl)

    @torch.no_grad()
    def encoder_top(self, encoder, examples: list[TaskExample], k: int, batch_size: int = 256) -> list[list[int]]:
        """A stage-1 encoder's ``k`` highest-scoring item indices after each example's history window, best
        first (specials excluded; the window's items too with ``exclude_history``, as for the LLM)."""
        return [
            row
            for batch in self.encoder_batches(encoder, examples, batch_size)
            for row in encoder.next_items(batch, k, self.exclude_history).tolist()
        ]

    @torch.no_grad()
    def encoder_logprobs(self, encoder, examples: list[TaskExample], batch_size: int = 256) -> Tensor:
        """A stage-1 encoder's log p(next item) after each example's history window, (n, V)
        (:meth:`~userllm.encoder.model.UserEncoder.next_item_logprobs`)."""
        batches = self.encoder_batches(encoder, examples, batch_size)
        return torch.cat([encoder.next_item_logprobs(batch) for batch in batches])
