"""``UserLLM``: the user encoder, the connectors and a decoder LLM, as in User-LLM (arXiv 2402.13598).

Two ways for the user embeddings (b, n, d_enc) to reach the LLM:

- ``cross_attention``: a :class:`~userllm.llm.connectors.GatedCrossAttentionBlock` runs before every k-th
  decoder layer (or at explicit layers): the layer's input hidden states attend to the projected user
  embeddings (or Perceiver latents). Blocks are attached with forward pre-hooks on the backbone's own
  layers, so no modeling code is copied and the backbone's state-dict keys do not change. Gates start at
  zero: a fresh ``UserLLM`` computes exactly the base LLM's logits.
- ``soft_prompt``: the projected embeddings (or latents) are placed before the token embeddings; padding is
  moved to the left and positions follow the attention mask.

The user context exists only inside one ``forward`` or ``generate`` call (no state survives between calls);
in cross-attention mode its keys/values are computed once per call and reused at every decoding step.

Example::

    model = UserLLM(UserLLMConfig(mode="cross_attention", strategy="enc", item_words=[]), encoder=enc, llm=backbone.model)
    # the recipe's category words need their tables: item_words=userllm.tasks.pipeline.item_word_tables(ds, backbone, ["category"])
    loss = model(user_batch, input_ids, attention_mask, labels).loss
    tokens = model.generate(user_batch, input_ids, attention_mask, max_new_tokens=16)
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from userllm.config import EncoderConfig, UserLLMConfig, dump_config
from userllm.encoder.model import UserEncoder, last_output
from userllm.errors import InputError
from userllm.llm.backbone import decoder_layers
from userllm.llm.base import ConditionedLM, UserContext, apply_llm_strategy
from userllm.llm.connectors import EncoderCandidates, GatedCrossAttentionBlock, ItemWords, PerceiverResampler, Projector
from userllm.llm.decoding import positions


class UserLLM(ConditionedLM):
    """Encoder + connectors + backbone LLM (see module docstring)."""

    method = "userllm"

    def __init__(
        self, cfg: UserLLMConfig, *, encoder: UserEncoder, llm: nn.Module, item_words: dict[str, Tensor] | None = None
    ) -> None:
        """``item_words``: for ``cfg.item_words`` (and ``title`` for ``cfg.candidates``), each feature's frozen (V, d)
        table (:class:`ItemWords`, :class:`EncoderCandidates`)."""
        super().__init__()
        self.cfg, self.encoder, self.llm = cfg, encoder, llm
        d = llm.config.hidden_size
        heads = llm.config.num_attention_heads
        self.projector = Projector(d_in=encoder.cfg.d_model, d_out=d)
        missing = set(self.word_tables_needed(cfg)) - set(item_words or {})
        if missing:
            raise InputError(f"item_words {sorted(missing)} need their tables (item_words=...; see tasks.train.build)")
        self.item_words = ItemWords({k: item_words[k] for k in cfg.item_words}) if cfg.item_words else None
        self.candidates = EncoderCandidates(item_words["title"], cfg.candidates) if cfg.candidates else None
        self.perceiver = (
            PerceiverResampler(dim=d, num_latents=cfg.perceiver_latents, depth=cfg.perceiver_depth, heads=heads)
            if cfg.perceiver_latents
            else None
        )
        self.xattn = nn.ModuleDict()
        self._active: dict | None = None  # the user context of the call in progress, else None
        if cfg.mode == "cross_attention":
            layers = decoder_layers(llm, cfg.decoder_layers_path)
            where = cfg.cross_attention_layers or list(range(0, len(layers), cfg.cross_attention_every))
            bad = [i for i in where if not 0 <= i < len(layers)]
            if bad:
                raise InputError(f"cross_attention_layers {bad} are outside 0..{len(layers) - 1}")
            for i in where:
                self.xattn[str(i)] = GatedCrossAttentionBlock(
                    dim=d, heads=heads, ff_mult=cfg.ff_mult, gate_init=cfg.gate_init
                )
                layers[i].register_forward_pre_hook(partial(self._cross_attend, str(i)), with_kwargs=True)
        self._apply_strategy()

    # ----------------------------------------------------------------- training strategies
    def _apply_strategy(self) -> None:
        """Set ``requires_grad`` for the paper's four strategies (and wrap the LLM with LoRA for ``lora``)."""
        self.requires_grad_(False)
        for module in self.connectors():
            module.requires_grad_(True)
        self.encoder.requires_grad_(self.cfg.strategy != "proj")
        self.llm = apply_llm_strategy(self.llm, self.cfg)
        self.trained_prefixes = ("projector.", "item_words.", "candidates.", "perceiver.", "xattn.") + (
            ("encoder.",) if self.cfg.strategy != "proj" else ()
        )

    def connectors(self) -> list[nn.Module]:
        return [
            m for m in (self.projector, self.item_words, self.candidates, self.perceiver, self.xattn) if m is not None
        ]

    @staticmethod
    def word_tables_needed(cfg: UserLLMConfig) -> list[str]:
        """The item-word tables a config needs (``item_words``, and ``title`` for ``candidates``)."""
        return sorted(set(cfg.item_words) | ({"title"} if cfg.candidates else set()))

    def groups(self) -> dict[str, list[nn.Module]]:
        return {
            "encoder": [self.encoder],
            "projector+perceiver": [
                m for m in (self.projector, self.item_words, self.candidates, self.perceiver) if m is not None
            ],
            "cross-attention blocks": [self.xattn],
            "llm": [self.llm],
        }

    # ----------------------------------------------------------------- user context
    def user_context(self, user_batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Encoder -> projector (-> Perceiver): context (b, n or m, d) and its mask (b, n or m)."""
        h, mask = self.encoder(user_batch)
        return self.context_from_embeddings(h, mask, user_batch["item"])

    def event_context(self, h: Tensor, items: Tensor) -> Tensor:
        """Per-event context (b, n, d): the projected encoder outputs h (b, n, d_enc), plus the items' words
        (:class:`ItemWords`) when configured."""
        ctx = self.projector(h)
        return ctx if self.item_words is None else ctx + self.item_words(items).to(ctx.dtype)

    def context_from_embeddings(self, h: Tensor, mask: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`event_context` (+ the encoder's candidates) (-> Perceiver) over encoder outputs h (b, n, d_enc)
        of events ``items`` (b, n): context (b, n (+ k) or m, d), mask."""
        ctx = self.event_context(h, items)
        if self.candidates is not None:
            rated = items if self.cfg.exclude_history else None  # the history's items are not offered again
            entries, valid = self.candidates(self.encoder.item_logits(last_output(h, mask)), rated)
            ctx = torch.cat([ctx, entries.to(ctx.dtype)], 1)
            mask = torch.cat([mask, valid & mask.any(1, keepdim=True)], 1)
        if self.perceiver is not None:
            ctx = self.perceiver(ctx, mask)
            mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device)
        return ctx, mask

    def user_state(
        self, user_batch: dict[str, Tensor] | None = None, *, ctx: Tensor | None = None, mask: Tensor | None = None
    ) -> UserContext:
        """All the user-side work of a request, from the timelines (or from a given context and mask):
        the context, its mask, and in cross-attention mode every block's keys/values."""
        if ctx is None:
            ctx, mask = self.user_context(user_batch)
        kv = {k: block.attn.context_kv(ctx) for k, block in self.xattn.items()}
        return UserContext(ctx, mask, kv)

    def absorbed(self, context: UserContext, tokens: int) -> UserContext:
        """``context`` with each block's keys/values folded into its query and output projections where that
        saves FLOPs for a call of ``tokens`` prompt tokens (:meth:`~userllm.llm.connectors.MaskedCrossAttention.absorbs`;
        e.g. 16 Perceiver latents and a prompt of 21 tokens or more on SmolLM2). Exact."""
        kv = {
            key: block.attn.absorb(context.kv[key], context.mask)
            if block.attn.absorbs(context.mask.shape[1], tokens)
            else context.kv[key]
            for key, block in self.xattn.items()
        }
        return UserContext(context.ctx, context.mask, kv)

    @contextmanager
    def _conditioned(self, context: UserContext, tokens: int):
        """Make the user context visible to the cross-attention hooks for the duration of one call of
        ``tokens`` prompt tokens; without gradients (generation, evaluation) in its :meth:`absorbed` form."""
        self._active = context if torch.is_grad_enabled() else self.absorbed(context, tokens)
        try:
            yield
        finally:
            self._active = None

    def _cross_attend(self, key: str, module: nn.Module, args: tuple, kwargs: dict):
        if self._active is None:
            return None
        block, ctx = self.xattn[key], self._active
        if args:
            return (block(args[0], None, context_mask=ctx.mask, kv=ctx.kv[key]), *args[1:]), kwargs
        kwargs["hidden_states"] = block(kwargs["hidden_states"], None, context_mask=ctx.mask, kv=ctx.kv[key])
        return args, kwargs

    def _embed_tokens(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def _soft_prompt(
        self, ctx: Tensor, ctx_mask: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """[context; tokens] with all padding moved to the left: embeds (b, n+t, d), mask, positions, labels."""
        tokens = self._embed_tokens()(input_ids)
        embeds = torch.cat([ctx.to(tokens.dtype), tokens], 1)
        mask = torch.cat([ctx_mask.long(), attention_mask.long()], 1)
        order = torch.sort(mask, dim=1, stable=True).indices  # padding (0) first, real entries in order
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        mask = mask.gather(1, order)
        if labels is not None:
            labels = torch.cat([torch.full_like(ctx_mask, -100, dtype=labels.dtype), labels], 1).gather(1, order)
        return embeds, mask, positions(mask), labels

    # ----------------------------------------------------------------- forward / generate
    def forward(
        self,
        user_batch: dict[str, Tensor] | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        *,
        context: UserContext | None = None,
    ):
        """The LLM's output for ``input_ids`` (b, t) conditioned on the users; ``.loss`` counts only labels != -100.
        A precomputed ``context`` (:meth:`user_state`, e.g. from a ``UserContextCache``) replaces ``user_batch``."""
        context = context if context is not None else self.user_state(user_batch)
        if self.cfg.mode == "cross_attention":
            with self._conditioned(context, input_ids.shape[1]):
                return self.llm(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=positions(attention_mask),
                    labels=labels,
                )
        embeds, mask, pos, labels = self._soft_prompt(context.ctx, context.mask, input_ids, attention_mask, labels)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=labels)

    @contextmanager
    def conditioned(
        self,
        user_batch: dict[str, Tensor] | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        context: UserContext | None = None,
    ):
        """Decode under the users' context: yields the prefix (embeds (b, t, d), mask (b, t)) for
        :mod:`userllm.llm.decoding`; in cross-attention mode the blocks see the context until exit.
        A precomputed ``context`` skips all user-side work."""
        context = context if context is not None else self.user_state(user_batch)
        if self.cfg.mode == "cross_attention":
            with self._conditioned(context, input_ids.shape[1]):
                yield self._embed_tokens()(input_ids), attention_mask.long()
        else:
            embeds, mask, _, _ = self._soft_prompt(context.ctx, context.mask, input_ids, attention_mask, None)
            yield embeds, mask

    @contextmanager
    def context_rows(self, rows: Tensor):
        """Within it, a decoding call's batch is ``rows`` (b',) of the conditioned batch (e.g. each row once per
        beam): the active cross-attention context is selected to match (:meth:`UserContext.select`) and
        restored on exit. Soft prompts live in the KV cache, so there is nothing to do for them."""
        saved = self._active
        self._active = saved.select(rows) if saved is not None else None
        try:
            yield
        finally:
            self._active = saved

    # ----------------------------------------------------------------- saving and loading
    def save_config(self) -> dict:
        return {**super().save_config(), "encoder": dump_config(self.encoder.cfg)}

    @classmethod
    def load(cls, path: Path, *, llm: nn.Module, encoder: UserEncoder | None = None) -> UserLLM:
        """Rebuild from :meth:`save` onto a freshly loaded backbone ``llm`` (and the frozen ``encoder`` under
        ``proj``); every saved tensor must find its parameter."""
        path = Path(path)
        if not (path / "userllm.json").exists():
            raise InputError(f"{path} holds no saved UserLLM (userllm.json)")
        config = json.loads((path / "userllm.json").read_text())
        cfg = UserLLMConfig.model_validate(config["userllm"])
        state = load_file(path / "userllm.safetensors")
        if encoder is None and cfg.strategy == "proj":
            raise InputError(
                f"{path} was trained with strategy 'proj', which does not save the frozen encoder; "
                "pass encoder=load_encoder(STAGE1_RUN)"
            )
        if encoder is None:
            enc_cfg = EncoderConfig.from_saved(config["encoder"])
            encoder = UserEncoder(
                enc_cfg,
                item_categories=state["encoder.embed.item_categories"],
                item_text=state["encoder.embed.item_text"],
            )
        words = {name: state[f"item_words.table_{name}"] for name in cfg.item_words}
        if cfg.candidates:  # one title table serves both when both are on, and is saved once
            words["title"] = state.get("candidates.table_title", state.get("item_words.table_title"))
        model = cls(cfg, encoder=encoder, llm=llm, item_words=words)
        model.load_trained(path, state)
        return model
