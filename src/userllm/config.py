"""Typed configurations: every default of userllm, documented in one place.

Each stage has one pydantic model. A run resolves its config from (lowest to highest precedence):
the defaults below, an optional YAML file (``--config FILE``), and command-line flags. The resolved
config is saved beside every output (``config.yaml``) and inside ``manifest.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from userllm.errors import ConfigError

Source = Literal["movielens-100k", "movielens", "amazon", "google-local", "synthetic"]
SOURCES: tuple[str, ...] = Source.__args__  # type: ignore[attr-defined]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Config):
    """The seeded generator with planted structure (``--source synthetic``), used by tests and benchmarks."""

    num_users: int = Field(500, ge=1, description="number of users")
    num_items: int = Field(400, ge=2, description="number of items in the catalogue")
    num_genres: int = Field(8, ge=2, description="number of genres; each item has 1 or 2")
    mean_events: float = Field(40.0, gt=3, description="mean timeline length (Poisson, at least 5 events)")
    drift: float = Field(1.0, ge=0, le=1, description="how far preferences move from start to end (0 = static)")
    seed: int = Field(0, description="random seed; the same seed gives byte-identical data")


class PrepareConfig(_Config):
    """``userllm prepare``: raw logs -> a prepared dataset directory."""

    source: Source = Field("movielens-100k", description=f"reader to use: one of {', '.join(Source.__args__)}")
    paths: list[Path] = Field(default_factory=list, description="input files or directories of the source")
    out: Path = Field(Path("outputs/dataset"), description="prepared dataset directory to create")
    max_history: int = Field(50, ge=1, description="events in the history window before each target")
    rating_threshold: float | None = Field(
        None, description="keep only events rated at least this (unrated events are dropped when set)"
    )
    min_user_events: int = Field(0, ge=0, description="k-core: users need at least this many events (0 = off)")
    min_item_events: int = Field(0, ge=0, description="k-core: items need at least this many events (0 = off)")
    rating_bucket: float = Field(0.5, gt=0, description="rating vocabulary: ratings rounded to this step")
    train_examples_per_user: int = Field(
        5, ge=0, description="labelled train examples per user: the last N targets of the train part"
    )
    strict: bool = Field(False, description="stop at the first malformed row instead of skipping it")
    force: bool = Field(False, description="replace an existing output directory")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (empty file: ``{}``); ConfigError naming the file otherwise."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} fields, got {type(loaded).__name__}")
    return loaded or {}


def load_config(cls: type[_Config], yaml_path: Path | None = None, overrides: dict[str, Any] | None = None):
    """Build ``cls`` from defaults, then a YAML file, then ``overrides`` (``None`` values are ignored).

    Nested fields are overridden with dotted keys, e.g. ``{"synthetic.num_users": 100}``.
    Raises :class:`ConfigError` naming the file and the field on any invalid value.
    """
    data: dict[str, Any] = {}
    where = "command line"
    if yaml_path is not None:
        where = f"{yaml_path} (or the command line)"
        data = read_yaml_mapping(yaml_path, "config")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid configuration in {where}:"]
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


def with_overrides(cfg: _Config, **overrides) -> _Config:
    """``cfg`` with those of ``overrides`` that are not None (a command's options), validated as a config
    file's fields are: a bad value is a clear error naming the field."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return load_config(type(cfg), None, {**dump_config(cfg), **overrides}) if overrides else cfg


def dump_config(config: _Config) -> dict[str, Any]:
    """The config as plain JSON/YAML-serializable data."""
    return config.model_dump(mode="json")


def save_config(config: _Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(dump_config(config), sort_keys=False))


Feature = Literal["item", "rating", "category", "time_gap", "text"]


class EncoderConfig(_Config):
    """The user encoder (stage 1): a causal Transformer over a timeline's events."""

    features: list[Feature] = Field(
        default_factory=lambda: ["item", "rating", "category", "time_gap"],
        description="per-event features; ['item'] alone is the SASRec-style baseline",
    )
    fusion: Literal["early", "late"] = Field(
        "early", description="early: concat features, one Transformer; late: one Transformer per feature, then fuse"
    )
    d_model: int = Field(64, ge=8, description="width of the event embeddings the encoder outputs")
    n_layers: int = Field(2, ge=1, description="Transformer blocks (per feature under late fusion)")
    n_heads: int = Field(2, ge=1, description="attention heads")
    d_feature: int = Field(64, ge=4, description="embedding width of each feature before fusion")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout on embeddings, attention and MLP outputs")
    item_head: bool = Field(
        False,
        description="a linear map of the output before scoring it against the item embeddings (always there "
        "when d_model != d_feature); without it the output itself is scored, as in SASRec",
    )
    max_len: int = Field(50, ge=2, description="longest timeline the encoder reads")
    positions: Literal["learned", "alibi"] = Field(
        "learned",
        description="learned: an embedding per position from the window's start (SASRec); alibi: none, "
        "each head's attention biased by -slope x the distance between events (Press et al., 2022), so recency "
        "reads the same however long the window",
    )
    time_gap_buckets: int = Field(24, ge=3, description="log2 buckets of seconds since the previous event")
    text_dim: int = Field(0, ge=0, description="width of the fixed item-text embeddings ('text' feature)")
    # filled from the dataset at training time
    num_items: int = Field(0, ge=0, description="item vocabulary size, specials included")
    num_ratings: int = Field(0, ge=0, description="rating vocabulary size, specials included")
    num_categories: int = Field(0, ge=0, description="category vocabulary size, specials included")

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> EncoderConfig:
        """A saved encoder config; one written before ``item_head`` existed had the head."""
        return cls.model_validate({"item_head": True, **data})


class _RunConfig(_Config):
    """What every training run has: where it runs, and how it treats an existing run directory."""

    device: str = Field("cpu", description="cpu, cuda, or cuda:N")
    bf16: bool = Field(False, description="bf16 autocast for the forward pass")
    resume: bool = Field(False, description="continue from the last checkpoint in --out")
    force: bool = Field(False, description="start over, replacing an existing run in --out")


class PretrainConfig(_RunConfig):
    """``userllm pretrain``: next-event prediction on the train part of every timeline."""

    dataset: Path = Field(Path("outputs/ml-100k"), description="prepared dataset directory")
    out: Path = Field(Path("runs/encoder"), description="run directory (checkpoints, metrics, config)")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    item_text_path: Path | None = Field(
        None,
        description="for the 'text' feature: a .npy array (item vocabulary size, text_dim) of fixed item-text "
        "embeddings, row i for item_idx i (rows 0 and 1: padding and unknown)",
    )
    epochs: int = Field(40, ge=1, description="epochs (the cosine schedule ends with the last one)")
    batch_size: int = Field(64, ge=1, description="training windows per step (over all processes)")
    train_stride: int | None = Field(
        16,
        ge=1,
        description="training windows end every this many events; each target is scored once with at "
        "least max_len - stride events of context (None = max_len: disjoint windows)",
    )
    lr: float = Field(3e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps, then cosine decay to 0")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clipping")
    ema_decay: float = Field(
        0.998,
        ge=0,
        lt=1,
        description="if > 0, an exponential moving average of the weights (this decay per step, "
        "i.e. over about the last 1 / (1 - decay) steps) is what is validated and saved as the run's model; 0: the "
        "raw weights (for runs of a few hundred steps)",
    )
    loss_weights: dict[str, float] = Field(
        default_factory=lambda: {"item": 1.0, "rating": 0.2, "category": 0.2},
        description="weights of the next-item, next-rating and next-category losses",
    )
    sampled_softmax_above: int = Field(
        50_000, ge=0, description="use sampled softmax (logQ-corrected) when the catalogue is larger than this"
    )
    num_negatives: int = Field(1024, ge=1, description="negatives per step for the sampled softmax")
    patience: int = Field(20, ge=1, description="early stopping: epochs without a better valid NDCG@10")
    eval_every: int = Field(1, ge=1, description="validate every this many epochs")
    seed: int = Field(2020, description="seeds parameters, window sampling and dropout")
    time_budget_s: float | None = Field(None, gt=0, description="stop after the epoch that exceeds this wall time")


class UserLLMConfig(_Config):
    """Stage 2: how the user encoder contextualizes the decoder LLM."""

    backbone: str = Field("smollm2-135m", description="'smollm2-135m' (the wheel), a local HF directory, or a hub id")
    decoder_layers_path: str | None = Field(
        None,
        description="dotted path of the decoder layer list, for "
        "model types userllm does not recognise (e.g. 'model.layers')",
    )
    mode: Literal["cross_attention", "soft_prompt"] = Field("cross_attention", description="how embeddings enter")
    cross_attention_every: int = Field(
        8,
        ge=1,
        description="a gated cross-attention block before every k-th decoder layer (8: 4 blocks on SmolLM2's 30)",
    )
    cross_attention_layers: list[int] | None = Field(None, description="explicit layer indices (overrides _every)")
    ff_mult: int = Field(2, ge=1, description="feed-forward width multiplier in the cross-attention blocks")
    gate_init: float = Field(0.0, description="initial value of every tanh gate (0: each block starts as the identity)")
    item_words: list[Literal["title", "category"]] = Field(
        default_factory=lambda: ["category"],
        description="add each event's item in the LLM's own words to its "
        "context entry: the frozen mean input embedding of its title's tokens / of its categories' names (beyond the "
        "paper)",
    )
    candidates: int = Field(
        0,
        ge=0,
        description="append the encoder's k most likely next items to the context, each "
        "in its title's words plus a rank embedding (TP: their titles listed in the prompt, from "
        "the stage-1 `encoder`; 0 = off; beyond the paper)",
    )
    exclude_history: bool = Field(
        False,
        description="the stage-1 encoder's top items (the candidates, TP's listed "
        "ones, the run's shortlist and the encoder-alone reference) leave out the items of "
        "the history window it reads (for datasets where a user chooses an item once)",
    )
    perceiver_latents: int = Field(0, ge=0, description="compress the timeline to this many latents (0 = off)")
    perceiver_depth: int = Field(2, ge=1, description="Perceiver blocks")
    strategy: Literal["full", "lora", "enc", "proj"] = Field(
        "enc",
        description="full: LLM+encoder+connectors; lora: LoRA+encoder+connectors; enc: encoder+connectors; "
        "proj: connectors only",
    )
    lora_rank: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    lora_targets: list[str] | None = Field(
        None, description="module names for LoRA (None: PEFT's default for the model)"
    )


Task = Literal["next_item", "favorite_genre", "review"]


class TrainConfig(_RunConfig):
    """``userllm train``: fine-tune User-LLM (or the text-prompt baseline) on one task."""

    dataset: Path = Field(Path("outputs/ml-100k"), description="prepared dataset directory")
    out: Path = Field(Path("runs/task"), description="run directory (checkpoints, model, metrics, config)")
    task: Task = Field("next_item", description="next_item, favorite_genre, or review (datasets with review text)")
    method: Literal["userllm", "textprompt"] = Field(
        "userllm", description="userllm: history as embeddings; textprompt: history written out in the prompt (TP)"
    )
    llm: UserLLMConfig = Field(default_factory=UserLLMConfig)
    encoder: str | None = Field(
        None, description="userllm: a stage-1 run directory (`userllm pretrain`), or 'random' for an untrained encoder"
    )
    random_encoder: EncoderConfig = Field(
        default_factory=EncoderConfig,
        description="the encoder built when encoder='random' (max_len follows max_history)",
    )
    max_history: int = Field(50, ge=1, description="events of history before each target (embeddings or text lines)")
    train_examples: int = Field(1024, ge=1, description="training budget: examples seen (steps x batch size)")
    train_flops: float | None = Field(
        None,
        gt=0,
        description="training budget in analytic FLOPs instead (steps until "
        "the examples' training FLOPs reach it; e.g. TP's budget, for equal compute)",
    )
    batch_size: int = Field(8, ge=1, description="examples per optimizer step (over all processes)")
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="examples per forward/backward, gradients accumulated to the same step (less memory for "
        "long prompts); None: sized to the memory available (max_memory_gb)",
    )
    max_memory_gb: float | None = Field(
        None,
        gt=0,
        description="memory a run may use, GiB: training without micro_batch_size splits each batch into the "
        "largest micro-batches whose estimated memory fits it, and a run whose one example does not fit stops "
        "before it starts; scoring takes batches of at most eval_batch_size that fit (None: 80% of what the "
        "machine has available, less 128 MiB)",
    )
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate (linear warmup, cosine decay)")
    gate_lr_scale: float = Field(
        20.0,
        gt=0,
        description="the tanh gates' learning rate: lr times this (at 1 the "
        "zero-initialised gates barely open within a thousand examples)",
    )
    encoder_lr_scale: float = Field(1.0, gt=0, description="the user encoder's learning rate: lr times this")
    encoder_dropout: float | None = Field(
        None, ge=0, lt=1, description="the user encoder's dropout while stage 2 trains (None: as pretrained)"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clipping")
    checkpoint_every: int = Field(20, ge=1, description="steps between atomic checkpoints (and one at the end)")
    beams: int = Field(10, ge=1, description="next_item: beams of the title-constrained beam search (= largest K)")
    shortlist: int = Field(
        0,
        ge=0,
        description="next_item: rank only the stage-1 encoder's N "
        "highest-scoring items per user (retrieve, then the LLM reranks; every method ranks the "
        "same list, from `encoder`, each title by log p(title + eos); 0: the whole catalogue)",
    )
    max_new_tokens: int = Field(48, ge=1, description="longest unconstrained generation (greedy titles, reviews)")
    eval_batch_size: int = Field(8, ge=1, description="examples per evaluation batch")
    seed: int = Field(0, description="seeds connectors, the example order and dropout")

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> TrainConfig:
        """A run's saved config (its random encoder read as :meth:`EncoderConfig.from_saved`)."""
        if "random_encoder" in data:
            data = {**data, "random_encoder": EncoderConfig.from_saved(data["random_encoder"])}
        return cls.model_validate(data)
