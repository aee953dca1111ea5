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

    model = UserLLM(UserLLMConfig(mode="cross_attention", strategy="enc"), encoder=enc, llm=backbone.model)
    loss = model(user_batch, input_ids, attention_mask, labels).loss
    tokens = model.generate(user_batch, input_ids, attention_mask, max_new_tokens=16)
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from userllm.config import EncoderConfig, UserLLMConfig, dump_config
from userllm.encoder.model import UserEncoder
from userllm.errors import InputError
from userllm.io import write_dir_atomically
from userllm.llm.backbone import decoder_layers
from userllm.llm.connectors import GatedCrossAttentionBlock, PerceiverResampler, Projector


class UserLLM(nn.Module):
    """Encoder + connectors + backbone LLM (see module docstring)."""

    def __init__(self, cfg: UserLLMConfig, *, encoder: UserEncoder, llm: nn.Module) -> None:
        super().__init__()
        self.cfg, self.encoder, self.llm = cfg, encoder, llm
        d = llm.config.hidden_size
        heads = llm.config.num_attention_heads
        self.projector = Projector(d_in=encoder.cfg.d_model, d_out=d)
        self.perceiver = (
            PerceiverResampler(dim=d, num_latents=cfg.perceiver_latents, depth=cfg.perceiver_depth, heads=heads)
            if cfg.perceiver_latents else None
        )  # fmt: skip
        self.xattn = nn.ModuleDict()
        self._active: dict | None = None  # the user context of the call in progress, else None
        if cfg.mode == "cross_attention":
            layers = decoder_layers(llm, cfg.decoder_layers_path)
            where = cfg.cross_attention_layers or list(range(0, len(layers), cfg.cross_attention_every))
            bad = [i for i in where if not 0 <= i < len(layers)]
            if bad:
                raise InputError(f"cross_attention_layers {bad} are outside 0..{len(layers) - 1}")
            for i in where:
                self.xattn[str(i)] = GatedCrossAttentionBlock(dim=d, heads=heads, ff_mult=cfg.ff_mult)
                layers[i].register_forward_pre_hook(partial(self._cross_attend, str(i)), with_kwargs=True)
        self._apply_strategy()

    # ----------------------------------------------------------------- training strategies
    def _apply_strategy(self) -> None:
        """Set ``requires_grad`` for the paper's four strategies (and wrap the LLM with LoRA for ``lora``)."""
        s = self.cfg.strategy
        self.requires_grad_(False)
        for module in self.connectors():
            module.requires_grad_(True)
        if s in ("full", "lora", "enc"):
            self.encoder.requires_grad_(True)
        if s == "full":
            self.llm.requires_grad_(True)
        if s == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
                              target_modules=self.cfg.lora_targets, task_type="CAUSAL_LM")  # fmt: skip
            self.llm = get_peft_model(self.llm, lora)

    def connectors(self) -> list[nn.Module]:
        return [m for m in (self.projector, self.perceiver, self.xattn) if m is not None]

    def parameter_groups(self) -> dict[str, tuple[int, int]]:
        """{group: (trainable, total)} parameter counts for encoder, connectors, cross-attention, llm."""
        groups = {
            "encoder": [self.encoder],
            "projector+perceiver": [m for m in (self.projector, self.perceiver) if m is not None],
            "cross-attention blocks": [self.xattn],
            "llm": [self.llm],
        }
        params = {name: [p for m in modules for p in m.parameters()] for name, modules in groups.items()}
        return {name: (sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)) for name, ps in params.items()}

    # ----------------------------------------------------------------- user context
    def user_context(self, user_batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Encoder -> projector (-> Perceiver): context (b, n or m, d) and its mask (b, n or m)."""
        h, mask = self.encoder(user_batch)
        ctx = self.projector(h)
        if self.perceiver is not None:
            ctx = self.perceiver(ctx, mask)
            mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device)
        return ctx, mask

    @contextmanager
    def _conditioned(self, ctx: Tensor, mask: Tensor):
        """Make the user context visible to the cross-attention hooks for the duration of one call."""
        kv = {k: block.attn.context_kv(ctx) for k, block in self.xattn.items()}
        self._active = {"mask": mask, "kv": kv}
        try:
            yield
        finally:
            self._active = None

    def _cross_attend(self, key: str, module: nn.Module, args: tuple, kwargs: dict):
        if self._active is None:
            return None
        block = self.xattn[key]
        ctx = self._active
        if args:
            return (block(args[0], None, context_mask=ctx["mask"], kv=ctx["kv"][key]), *args[1:]), kwargs
        kwargs["hidden_states"] = block(kwargs["hidden_states"], None, context_mask=ctx["mask"], kv=ctx["kv"][key])
        return args, kwargs

    def _embed_tokens(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def _soft_prompt(self, ctx: Tensor, ctx_mask: Tensor, input_ids: Tensor, attention_mask: Tensor,
                     labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
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
    def forward(self, user_batch: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
                labels: Tensor | None = None):  # fmt: skip
        """The LLM's output for ``input_ids`` (b, t) conditioned on the users; ``.loss`` counts only labels != -100."""
        ctx, ctx_mask = self.user_context(user_batch)
        if self.cfg.mode == "cross_attention":
            with self._conditioned(ctx, ctx_mask):
                return self.llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                                labels=labels)  # fmt: skip
        embeds, mask, pos, labels = self._soft_prompt(ctx, ctx_mask, input_ids, attention_mask, labels)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=labels)

    @torch.no_grad()
    def generate(self, user_batch: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor, *,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 eos_token_id: int | None = None, pad_token_id: int = 0, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
        """New tokens (b, max_new_tokens) for left-padded prompts; greedy, or sampling with temperature/top-k.

        After ``eos_token_id`` a row emits ``pad_token_id``. ``use_cache=False`` recomputes the whole sequence
        at every step (slow; for checking the cache).
        """
        was_training = self.training
        self.eval()
        try:
            ctx, ctx_mask = self.user_context(user_batch)
            if self.cfg.mode == "cross_attention":
                with self._conditioned(ctx, ctx_mask):
                    embeds, mask = self._embed_tokens()(input_ids), attention_mask.long()
                    return self._decode(embeds, mask, max_new_tokens, do_sample, temperature, top_k, eos_token_id,
                                        pad_token_id, use_cache, generator)  # fmt: skip
            embeds, mask, _, _ = self._soft_prompt(ctx, ctx_mask, input_ids, attention_mask, None)
            return self._decode(embeds, mask, max_new_tokens, do_sample, temperature, top_k, eos_token_id,
                                pad_token_id, use_cache, generator)  # fmt: skip
        finally:
            self.train(was_training)

    def _decode(self, embeds, mask, max_new_tokens, do_sample, temperature, top_k, eos, pad, use_cache, generator):
        b = embeds.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=embeds.device)
        out_tokens, past = [], None
        step_embeds = embeds
        for _ in range(max_new_tokens):
            if use_cache:
                pos = positions(mask)[:, -step_embeds.shape[1]:]
                out = self.llm(inputs_embeds=step_embeds, attention_mask=mask, position_ids=pos, cache=past,
                               use_cache=True)  # fmt: skip
                past = out.cache
            else:
                out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), use_cache=False)
            logits = out.logits[:, -1].float()
            if do_sample:
                logits = logits / max(temperature, 1e-6)
                if top_k:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            else:
                token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            out_tokens.append(token)
            if eos is not None:
                done |= token == eos
            new = self._embed_tokens()(token[:, None])
            embeds = torch.cat([embeds, new], 1)
            step_embeds = new
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=mask.device)], 1)
            if eos is not None and done.all():
                break
        return torch.stack(out_tokens, 1)

    # ----------------------------------------------------------------- saving and loading
    def trained_state_dict(self) -> dict[str, Tensor]:
        """What this strategy trains: connectors and cross-attention blocks always; the encoder unless
        ``proj``; LoRA weights under ``lora``; the LLM's weights only under ``full``."""
        keep = ("projector.", "perceiver.", "xattn.")
        if self.cfg.strategy != "proj":
            keep += ("encoder.",)
        state = {}
        for name, tensor in self.state_dict().items():
            if name.startswith(keep) or (self.cfg.strategy == "full" and name.startswith("llm.")) or (
                self.cfg.strategy == "lora" and "lora_" in name
            ):
                state[name] = tensor.detach().contiguous()
        return state

    def save(self, path: Path, *, extra: dict | None = None) -> None:
        """``path/userllm.safetensors`` (trained weights) + ``path/userllm.json`` (configs), atomically."""
        config = {"userllm": dump_config(self.cfg), "encoder": dump_config(self.encoder.cfg), **(extra or {})}

        def write(tmp: Path) -> None:
            save_file(self.trained_state_dict(), tmp / "userllm.safetensors")
            (tmp / "userllm.json").write_text(json.dumps(config, indent=2))

        write_dir_atomically(Path(path), write, force=True, marker="userllm.json")

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
            raise InputError(f"{path} was trained with strategy 'proj', which does not save the frozen encoder; "
                             "pass encoder=load_encoder(STAGE1_RUN)")  # fmt: skip
        if encoder is None:
            enc_cfg = EncoderConfig.model_validate(config["encoder"])
            encoder = UserEncoder(enc_cfg, item_categories=state["encoder.embed.item_categories"],
                                  item_text=state["encoder.embed.item_text"])  # fmt: skip
        model = cls(cfg, encoder=encoder, llm=llm)
        missing = set(state) - set(model.state_dict())
        if missing:
            raise InputError(f"{path}: saved weights do not fit this backbone: {sorted(missing)[:5]}")
        model.load_state_dict(state, strict=False)
        return model


def positions(mask: Tensor) -> Tensor:
    """Position ids that skip padding: (b, t) attention mask -> cumulative count - 1, 0 on padding."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)
