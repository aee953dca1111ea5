"""What User-LLM and the text-prompt baseline share: the user side of a request (:class:`UserContext`), how a
strategy trains the backbone (:func:`apply_llm_strategy`), and :class:`ConditionedLM` (generation, trainable
groups, saving and loading trained weights).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from userllm.config import UserLLMConfig, dump_config
from userllm.errors import InputError
from userllm.io import write_dir_atomically
from userllm.llm.backbone import base_model, decoder_layers
from userllm.llm.connectors import AbsorbedContext, ContextKV
from userllm.llm.decoding import generate_tokens
from userllm.llm.quant import quantize_linears


@dataclass
class UserContext:
    """The user side of a request, independent of the question asked: the context the LLM reads
    ``ctx`` (b, m, d) with its ``mask`` (b, m), and in cross-attention mode each block's projected keys and
    values ``kv[layer] = ContextKV(k, v)``, each (b, heads, m, d / heads) (or, while a call decodes, their
    :class:`~userllm.llm.connectors.AbsorbedContext`)."""

    ctx: Tensor
    mask: Tensor
    kv: dict[str, ContextKV | AbsorbedContext]

    def select(self, rows: Tensor) -> UserContext:
        """The context of ``rows`` (b',), indices into this batch, repeats allowed (e.g. each row once per beam)."""
        pick = lambda x: x.index_select(0, rows.to(x.device))  # noqa: E731
        return UserContext(pick(self.ctx), pick(self.mask), {key: t._make(map(pick, t)) for key, t in self.kv.items()})

    @staticmethod
    def stack(contexts: list[UserContext]) -> UserContext:
        """One batch from single-user contexts (b = 1 each), right-padded to the longest (mask False)."""
        m = max(c.ctx.shape[1] for c in contexts)

        def pad(t: Tensor, dim: int) -> Tensor:
            shape = list(t.shape)
            shape[dim] = m - t.shape[dim]
            return torch.cat([t, t.new_zeros(shape)], dim)

        return UserContext(
            torch.cat([pad(c.ctx, 1) for c in contexts]),
            torch.cat([pad(c.mask, 1) for c in contexts]),
            {
                key: ContextKV(*(torch.cat([pad(c.kv[key][i], 2) for c in contexts]) for i in range(2)))
                for key in contexts[0].kv
            },
        )


def apply_llm_strategy(llm: nn.Module, cfg: UserLLMConfig) -> nn.Module:
    """The backbone as the strategy trains it: all weights (``full``), LoRA adapters (``lora``, PEFT) or
    frozen (``enc``, ``proj``). Returns the (possibly PEFT-wrapped) model."""
    llm.requires_grad_(cfg.strategy == "full")
    if cfg.strategy == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_targets,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft 0.21 reads transformers 5's deprecated alias; nothing for a user to do
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            llm = get_peft_model(llm, lora)
    return llm


class ConditionedLM(nn.Module):
    """What User-LLM and the text-prompt baseline share: generation, trainable groups, saving.

    Subclasses set ``cfg``, ``llm`` and implement ``forward``, ``conditioned`` and ``context_rows``.
    """

    cfg: UserLLMConfig
    llm: nn.Module
    method = ""
    trained_prefixes: tuple[str, ...] = ()  # state-dict prefixes saved under every strategy

    def groups(self) -> dict[str, list[nn.Module]]:
        return {"llm": [self.llm]}

    def parameter_groups(self) -> dict[str, tuple[int, int]]:
        """{group: (trainable, total)} parameter counts."""
        params = {name: [p for m in modules for p in m.parameters()] for name, modules in self.groups().items()}
        return {
            name: (sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps))
            for name, ps in params.items()
        }

    @torch.no_grad()
    def generate(
        self,
        user_batch: dict[str, Tensor] | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        context: UserContext | None = None,
        **kwargs,
    ) -> Tensor:
        """New tokens (b, <= max_new_tokens) for left-padded prompts; keyword arguments as in
        :func:`~userllm.llm.decoding.generate_tokens` (greedy or sampling, eos, KV cache on). A precomputed
        ``context`` (User-LLM) skips all user-side work."""
        was_training = self.training
        self.eval()
        try:
            with self.conditioned(user_batch, input_ids, attention_mask, context=context) as (embeds, mask):
                return generate_tokens(self, embeds, mask, **kwargs)
        finally:
            self.train(was_training)

    def trained_state_dict(self) -> dict[str, Tensor]:
        """What this strategy trains: ``trained_prefixes``; LoRA weights under ``lora``; the LLM's weights
        only under ``full``."""
        s, out, seen = self.cfg.strategy, {}, set()
        for name, t in self.state_dict().items():
            if (
                name.startswith(self.trained_prefixes)
                or (s == "full" and name.startswith("llm."))
                or (s == "lora" and "lora_" in name)
            ):
                where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                if where not in seen:  # tied weights (e.g. embeddings = LM head) are saved once and load into both
                    seen.add(where)
                    out[name] = t.detach().contiguous()
        return out

    def save_config(self) -> dict:
        return {"method": self.method, "userllm": dump_config(self.cfg)}

    def write(self, directory: Path, *, extra: dict | None = None) -> None:
        """``directory/userllm.safetensors`` (trained weights) + ``directory/userllm.json`` (configs)."""
        save_file(self.trained_state_dict(), Path(directory) / "userllm.safetensors")
        (Path(directory) / "userllm.json").write_text(json.dumps({**self.save_config(), **(extra or {})}, indent=2))

    def save(self, path: Path, *, extra: dict | None = None) -> None:
        """:meth:`write` to ``path`` atomically (a temporary directory renamed into place)."""
        write_dir_atomically(Path(path), lambda tmp: self.write(tmp, extra=extra), force=True, marker="userllm.json")

    def load_trained(self, path: Path, state: dict[str, Tensor]) -> None:
        """Load saved trained weights; every saved tensor must find its parameter."""
        missing = set(state) - set(self.state_dict())
        if missing:
            raise InputError(f"{path}: saved weights do not fit this backbone: {sorted(missing)[:5]}")
        self.load_state_dict(state, strict=False)

    def quantize_backbone(self) -> dict:
        """For serving: the backbone's decoder layers as 4-bit weights, in place (:mod:`userllm.llm.quant`;
        LoRA adapters, connectors and the LM head stay float). No training afterwards. Returns the report of
        :func:`~userllm.llm.quant.quantize_linears`."""
        return quantize_linears(decoder_layers(base_model(self.llm), self.cfg.decoder_layers_path))
