"""OnlineLearner: the recommender plus everything that makes learning from a stream safe.

Two verbs, river-style: `learn(batch) -> StepStats` and `rank(...)`. `evaluate(batch)` scores a
batch before it is learned (prequential). The learner keeps each user's recent history from the
events it learns, so the trainer consumer and the benchmark drive it identically.
"""

from __future__ import annotations

import copy
import math
import random
import time
import zlib
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.config import ModelConfig
from model.encoder import TextEncoder
from model.events import Interaction, Item
from model.replay import Reservoir
from model.scorer import ItemNames, Scorer, fixed_projection
from model.serialization import ID_TABLE
from model.towers import TwoTower

Example = tuple[tuple[int, ...], int]  # (history item indices oldest first, target index)
GATE_SAMPLE_VERDICTS = 64  # verdicts one sample of a large catalog serves (`gate_items`)


@dataclass(frozen=True)
class StepStats:
    """What one `learn` call did."""

    events: int  # fresh events in the batch
    replayed: int  # past examples mixed in
    loss: float  # cross-entropy of the last step
    anchor_penalty: float  # L2-SP term of the last step
    lr: float  # learning rate used (after the adaptive multiplier)
    grad_norm: float  # global grad norm before clipping
    seconds: float


@dataclass(frozen=True)
class GateDecision:
    """Whether the weights learned since the last publish may be published."""

    publish: bool
    hr: float  # HR@10 of the candidate on the held-out validation events
    reference: float  # HR@10 on the same events of the weights published when each was judged
    events: int  # validation events ranked (0: no verdict, too few or nothing published yet)


@dataclass
class HeldOut:
    """A validation event: no version trained on it while it is in the gate's set."""

    example: Example  # (history rows, target row); learned through replay once it leaves
    exclude: tuple[int, ...]  # rows of everything the user had interacted with before it
    # the hit of the weights that were published when the gate first ranked it, kept while it
    # is in the set (None: not ranked yet)
    reference_hit: float | None = None


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA when present, else the CPU. Nothing assumes a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class OnlineLearner:
    """Incremental AdamW training of the two-tower recommender, with continual-learning guards."""

    def __init__(self, cfg: ModelConfig, encoder: TextEncoder | None = None,
                 device: str = "auto") -> None:
        self.cfg = cfg
        self.device = pick_device(device)
        torch.manual_seed(cfg.seed)
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self._gate_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the gate's item samples
        self._gate_rows: torch.Tensor | None = None  # the sample in use (None: every item)
        self._gate_uses = 0  # verdicts on it so far
        self.encoder = encoder or TextEncoder(cfg.encoder_path, cfg.max_text_tokens, cfg.policy,
                                              cfg.lora_rank)
        self.encoder.to(self.device)
        self.item_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.texts: list[str] = []
        self.text = torch.zeros(0, self.encoder.dim, device=self.device)  # (N, H) cached features
        self.net = TwoTower(cfg, self.encoder.dim).to(self.device)
        self.counts = np.zeros(0, dtype=np.float64)  # item popularity, all time
        self.total = 0.0
        self.freq = np.zeros(0, dtype=np.float64)  # item frequency for the logQ correction,
        self.freq_total = 0.0  # forgetting with cfg.logq_halflife (a stream's hot items move)
        self.histories: dict[str, deque[int]] = {}
        self.seen: dict[str, set[int]] = {}
        self.reservoir: Reservoir[Example] = Reservoir(cfg.replay_size, cfg.seed)
        self._rng = random.Random(cfg.seed)
        self._dense = [p for n, p in self.net.named_parameters() if n != "id_emb"]
        self._dense += [p for p in self.encoder.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self._dense, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.id_opt = torch.optim.SparseAdam([self.net.id_emb], lr=cfg.id_lr)
        self._loss_fast = self._loss_slow = None  # EMAs driving the adaptive learning rate
        self.lr_scale = 1.0
        self.anchor: list[torch.Tensor] | None = None
        self._ema_sum: list[torch.Tensor] | None = None  # anchor="ema": see _move_ema_anchor
        self._ema_mass = 0.0
        self._published: dict[str, torch.Tensor] | None = None
        self._published_rows = 0  # ID-table rows of the published weights
        self._published_scorer: Scorer | None = None
        self.validation: deque[HeldOut] = deque()  # the gate's set, oldest first
        self._stamp = 0  # changes whenever the weights do
        self._scorer: Scorer | None = None
        # linear item tower: the newest Scorer built, and the catalog rows whose ID row or text
        # changed since (None: everything, e.g. after a rollback), so the next is built from it
        self._last_scorer: Scorer | None = None
        self._touched: list[torch.Tensor] | None = None
        # ID rows written since the last publish (None: any row may have been), so a delta
        # and the rollback point cost what changed, not the catalog
        self._dirty: list[torch.Tensor] | None = None
        self.autocast = self.device.type == "cuda"
        # items kept per user history and per example: what the user tower reads, or more when
        # history_not_negative looks further back
        self._kept = max(cfg.history_len, cfg.negative_history_len)

    # ------------------------------------------------------------------ catalog
    def add_items(self, items: Iterable[Item], progress: bool = False) -> int:
        """Add or re-describe catalog items; encodes only texts not encoded yet. Returns #new."""
        fresh: list[tuple[int, str]] = []
        for item in items:
            i = self._ensure(item.item_id)
            if self.texts[i] != item.text:
                self.texts[i] = item.text
                fresh.append((i, item.text))
        if fresh and self.cfg.policy == "head":
            feats = self.encoder.encode([t for _, t in fresh], progress=progress)
            rows = torch.tensor([i for i, _ in fresh], device=self.device)
            self.text[rows] = torch.from_numpy(feats).to(self.device)
            self._touch(rows)
        elif fresh:
            self._refresh_text()
        self._scorer = None
        return len(fresh)

    def set_text_features(self, feats: dict[str, np.ndarray], texts: dict[str, str]) -> None:
        """Install text features computed elsewhere (e.g. cached in Redis) without re-encoding."""
        if not feats:
            return
        rows = []
        for item_id in feats:
            i = self._ensure(item_id)
            self.texts[i] = texts.get(item_id, self.texts[i])
            rows.append(i)
        matrix = np.stack([np.asarray(v, dtype=np.float32) for v in feats.values()])  # (n, H)
        positions = torch.tensor(rows, device=self.device)
        self.text[positions] = torch.from_numpy(matrix).to(self.device)
        self._touch(positions)
        self._scorer = None

    def _ensure(self, item_id: str) -> int:
        i = self.index.get(item_id)
        if i is not None:
            return i
        i = len(self.item_ids)
        self.item_ids.append(item_id)
        self.index[item_id] = i
        self.texts.append("")
        if i >= self.text.shape[0]:  # amortised growth of every per-item table
            cap = max(64, 2 * self.text.shape[0])
            grown = torch.zeros(cap, self.encoder.dim, device=self.device)
            grown[: self.text.shape[0]] = self.text
            self.text = grown
            self.counts = np.concatenate([self.counts, np.zeros(cap - len(self.counts))])
            self.freq = np.concatenate([self.freq, np.zeros(cap - len(self.freq))])
        return i

    def _sync_id_table(self) -> None:
        """Grow the ID table (and SparseAdam's state) to the catalog size."""
        n = len(self.item_ids)
        if self.net.id_emb.shape[0] >= n:
            return
        old_state = self.id_opt.state.get(self.net.id_emb, {})
        self.net.grow(n)
        self.id_opt = torch.optim.SparseAdam([self.net.id_emb], lr=self.cfg.id_lr * self.lr_scale)
        if old_state:
            state = {}
            for key, val in old_state.items():
                if torch.is_tensor(val) and val.dim() == 2:
                    pad = torch.zeros(n - val.shape[0], val.shape[1], device=val.device)
                    val = torch.cat([val, pad])
                state[key] = val
            self.id_opt.state[self.net.id_emb] = state

    def _touch(self, rows: torch.Tensor | None) -> None:
        """Rows (k,) whose item columns changed (None: all of them), for the next linear
        Scorer. Bounded while nothing ranks: merged every 64 steps, and once they cover half
        the catalog a full rebuild is as cheap."""
        if self.cfg.item_tower != "linear":
            return
        if rows is None:
            self._touched = None
        elif self._touched is not None:
            self._touched.append(rows.flatten().to(self.device))
            if len(self._touched) > 64:
                merged = torch.cat(self._touched).unique()
                self._touched = [merged] if len(merged) < len(self.item_ids) // 2 else None

    def _refresh_text(self) -> None:
        """lora/full: the encoder itself changes, so every cached feature is recomputed."""
        self._touch(None)
        if self.item_ids:
            feats = self.encoder.encode(self.texts)
            self.text[: len(feats)] = torch.from_numpy(feats).to(self.device)

    # ------------------------------------------------------------------ histories
    def history(self, user_id: str) -> list[str]:
        """The user's recent items as the learner saw them, oldest first."""
        return [self.item_ids[i] for i in self.histories.get(user_id, ())]

    def _observe(self, events: Sequence[Interaction]) -> list[Example]:
        """Turn events into (history-before, target) examples and append them to histories.

        The events the validation gate holds out (`holds_out`) go to its set instead of the
        returned examples; they still join the user's history, as they do in serving."""
        out = []
        for e in events:
            target = self._ensure(e.item_id)
            hist = self.histories.setdefault(e.user_id, deque(maxlen=self._kept))
            seen = self.seen.setdefault(e.user_id, set())
            example = (tuple(hist), target)
            if self.holds_out(e):
                self._hold(HeldOut(example, tuple(seen)))
            else:
                out.append(example)
            hist.append(target)
            seen.add(target)
            self.counts[target] += 1
            self.total += 1
            self.freq[target] += 1
            self.freq_total += 1
        return out

    def holds_out(self, event: Interaction) -> bool:
        """Whether `event` validates the gate instead of training: one in `gate_holdout`, by a
        hash of (user, item, time) that every process and run computes alike."""
        if not self.cfg.gate:
            return False
        key = f"{event.user_id}\x1f{event.item_id}\x1f{event.ts!r}".encode()
        return zlib.crc32(key) % self.cfg.gate_holdout == 0

    def _hold(self, held: HeldOut) -> None:
        self.validation.append(held)
        if len(self.validation) > self.cfg.gate_set:
            old = self.validation.popleft()  # no version trained on it; from now on one may
            if self.cfg.replay:
                self.reservoir.add(old.example)

    # ------------------------------------------------------------------ learning
    def learn(self, batch: Sequence[Interaction]) -> StepStats:
        """One micro-batch: fresh examples plus replayed ones, `steps_per_batch` AdamW steps.

        A micro-batch of n < `cfg.step_events` events learns at lr * n / step_events
        (`small_batch="scale"`): Adam moves each weight by about lr per step whatever the batch
        holds, so at full lr a slow stream, learned in many small micro-batches, would learn each
        event many times harder than a fast one. Scaled, it learns no harder per event.
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        if cfg.logq_halflife > 0:
            decay = 0.5 ** (len(batch) / cfg.logq_halflife)
            self.freq *= decay
            self.freq_total *= decay
        fresh = self._observe(batch)
        self._sync_id_table()
        share = min(1.0, len(fresh) / cfg.step_events)  # of a full step's events
        lr_mult = share if cfg.small_batch == "scale" else 1.0
        replayed = self.reservoir.sample(self._replay_count(len(fresh)))
        examples = fresh + replayed
        owners = None
        if cfg.user_not_negative or cfg.future_positives > 0:  # whose; replayed: nobody's
            keys = {u: j for j, u in enumerate(dict.fromkeys(e.user_id for e in batch))}
            owners = [keys[e.user_id] for e in batch if not self.holds_out(e)]
            owners += range(-1, -1 - len(replayed), -1)
        for ex in fresh:
            self.reservoir.add(ex)
        self._set_lr(lr_mult)
        loss = penalty = grad_norm = 0.0
        if examples:  # else every event was held out for the gate: nothing to learn
            for _ in range(cfg.steps_per_batch):
                loss, penalty, grad_norm = self._step(examples, owners)
            self._adapt_lr(loss, share)
        self._move_ema_anchor(len(fresh))
        self._stamp += 1
        self._scorer = None
        if cfg.policy != "head":
            self._refresh_text()
        return StepStats(len(fresh), len(examples) - len(fresh), loss, penalty,
                         cfg.lr * self.lr_scale * lr_mult, grad_norm, time.perf_counter() - t0)

    def _replay_count(self, n: int) -> int:
        """replay_ratio * n replayed examples, rounded at random so that small micro-batches
        replay as much on average as large ones (truncation gave 1-event batches none)."""
        if not self.cfg.replay:
            return 0
        want = n * self.cfg.replay_ratio
        return int(want) + (self._rng.random() < want - int(want))

    def _set_lr(self, mult: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * self.lr_scale * mult
        for g in self.id_opt.param_groups:
            g["lr"] = self.cfg.id_lr * self.lr_scale * mult

    def _step(self, examples: Sequence[Example], owners: Sequence[int] | None = None
              ) -> tuple[float, float, float]:
        """One AdamW step; `owners` (B,) says which examples are the same user's (equal keys)."""
        cfg, dev = self.cfg, self.device
        b, t, n = len(examples), cfg.history_len, len(self.item_ids)
        # histories right-aligned, -1 = none, built as one tensor (a tensor per row cost more
        # than the step's matmuls); L > T when history_not_negative looks further back
        width = self._kept if cfg.history_not_negative and self._kept > t else t
        flat: list[int] = []
        for h, _ in examples:
            h = h[-width:]
            flat.extend([-1] * (width - len(h)))
            flat.extend(h)
        full = torch.tensor(flat, dtype=torch.long).view(b, width)  # (B, L)
        hist = full[:, width - t:].contiguous()  # (B, T) what the user tower reads
        long = full if width > t else None
        pos = torch.tensor([target for _, target in examples])
        neg = torch.randint(n, (cfg.negatives,), generator=self._gen)
        cands = torch.cat([pos.unique(), neg])  # (C,)
        needed, inverse = torch.cat([hist.flatten().clamp(min=0), cands]).unique(
            return_inverse=True)
        needed, inverse = needed.to(dev), inverse.to(dev)
        hist, pos, cands = hist.to(dev), pos.to(dev), cands.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            if cfg.policy == "head":
                text = self.text[needed]
            else:
                text = self.encoder([self.texts[i] for i in needed.tolist()])
            vecs, bias = self.net.item_parts(text, needed)  # (U, d), (U,) or None
            h_rows = inverse[: b * t].view(b, t)
            c_rows = inverse[b * t: b * t + len(cands)]
            mask = hist >= 0
            # index_select, not vecs[rows]: the backward of advanced indexing accumulates in a
            # thread-dependent order on the CPU, which broke seeded determinism with 2 threads
            h_vecs = vecs.index_select(0, h_rows.flatten()).view(b, t, -1)  # (B, T, d)
            users = self.net.user_vectors(h_vecs * mask.unsqueeze(-1), mask)  # (B, d)
            logits = users.float() @ vecs.index_select(0, c_rows).float().T  # (B, C)
            if bias is not None:
                logits = logits + bias.index_select(0, c_rows).float()
            logits = logits / cfg.temperature
        is_pos = cands.unsqueeze(0) == pos.unsqueeze(1)  # (B, C)
        first = is_pos.float().argmax(dim=1)  # the positive's column (unique part comes first)
        other = is_pos.clone()
        other[torch.arange(b, device=dev), first] = False  # sampled copies of the positive
        if cfg.in_batch_negatives:
            # logQ correction: candidates come from a mixture of the batch's positives (by
            # popularity) and a uniform draw; subtract the log expected count of each under it.
            p = torch.from_numpy(self.freq[cands.cpu().numpy()] / max(self.freq_total, 1.0))
            logq = torch.log(b * p.to(dev).float() + cfg.negatives / max(n, 1) + 1e-9)
            logits = logits - cfg.logq_weight * logq
        else:
            n_unique = len(cands) - cfg.negatives
            other[:, :n_unique] |= ~is_pos[:, :n_unique]  # sampled negatives only
        if cfg.history_not_negative:
            other |= _history_mask(hist if long is None else long.to(dev), needed, c_rows)
        later = None
        if owners is not None:  # (user, candidate) pairs that are some example's (user, positive)
            key = torch.tensor(list(owners), device=dev)  # (B,) replayed: negative, unique
            owned = (key * n + pos).unique()  # sorted codes of (user, positive)
            query = key.unsqueeze(1) * n + cands.unsqueeze(0)  # (B, C)
            at = torch.searchsorted(owned, query).clamp(max=len(owned) - 1)
            other |= owned[at] == query
            if cfg.future_positives > 0:  # the positives of the user's later examples
                same = key.unsqueeze(1) == key.unsqueeze(0)
                order = torch.arange(b, device=dev)
                after = same & (order.unsqueeze(0) > order.unsqueeze(1))  # (B, B)
                later = (after.float() @ is_pos.float()) > 0  # (B, C)
        rows = torch.arange(b, device=dev)
        if cfg.history_not_negative or owners is not None:
            other[rows, first] = False
        raw = logits
        logits = logits.masked_fill(other, float("-inf"))
        loss = F.cross_entropy(logits, first)
        if later is not None:
            later[rows, first] = False
            # -log softmax of each later positive p over {p} + the example's negatives
            negs = logits.clone()
            negs[rows, first] = float("-inf")
            lse = torch.logsumexp(negs, dim=1, keepdim=True)  # (B, 1)
            terms = F.softplus(lse - raw).masked_fill(~later, 0.0)  # (B, C)
            per_row = terms.sum(1) / later.sum(1).clamp(min=1)
            loss = loss + cfg.future_positives * per_row.mean()
        penalty = self._anchor_penalty()
        if cfg.text_norm_penalty > 0 and cfg.item_tower == "linear" and cfg.text:
            sq = self.net.text_part(text).float().pow(2).sum(-1)  # (U,)
            penalty = penalty + cfg.text_norm_penalty * (sq - 1).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        self.id_opt.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        grad_norm = 0.0
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._dense, cfg.grad_clip))
        self.opt.step()
        if self.net.id_emb.grad is not None:
            self.id_opt.step()
            self._touch(needed)  # SparseAdam moved exactly the rows of its sparse gradient
            self._mark_dirty(needed)
        return float(loss.detach()), float(penalty.detach()), grad_norm

    def _anchor_penalty(self) -> torch.Tensor:
        if self.cfg.anchor == "none" or self.anchor is None:
            return torch.zeros((), device=self.device)
        return self.cfg.anchor_strength * sum(
            ((p - a) ** 2).sum() for p, a in zip(self._dense, self.anchor, strict=True))

    def _move_ema_anchor(self, n: int) -> None:
        """anchor="ema": the anchor trails the weights with a half-life of anchor_halflife
        events, so it holds what the model knew over a long stretch, not 4 batches ago.

        It is the bias-corrected average (as Adam's moments): the weights' exponentially
        weighted sum divided by the weight it has gathered, so the weights the learner started
        from (a random init, for a new model) count for one step, not for the first half-life:
        a plain average starting there pulled a learning model back towards them (ML-100K dev
        HR@10 0.2056 -> 0.2011 at strength 0.1)."""
        if self.cfg.anchor != "ema" or n <= 0:
            return
        keep = 0.5 ** (n / self.cfg.anchor_halflife)
        with torch.no_grad():
            if self._ema_sum is None:
                self._ema_sum = [torch.zeros_like(p) for p in self._dense]
                self.anchor = [p.detach().clone() for p in self._dense]
            self._ema_mass = keep * self._ema_mass + (1.0 - keep)
            for s, a, p in zip(self._ema_sum, self.anchor, self._dense, strict=True):
                s.mul_(keep).add_(p.detach(), alpha=1.0 - keep)
                torch.div(s, self._ema_mass, out=a)

    def _adapt_lr(self, loss: float, share: float = 1.0) -> None:
        """Loss above its long-run average means drift: learn faster; below it: calm down.

        The averages move by `share` of a full step's weight, so they span the same number of
        events whatever the micro-batch size."""
        if not math.isfinite(loss):
            return
        if self._loss_fast is None:
            self._loss_fast = self._loss_slow = loss
        fast, slow = 1 - 0.7 ** share, 1 - 0.98 ** share
        self._loss_fast = fast * loss + (1 - fast) * self._loss_fast
        self._loss_slow = slow * loss + (1 - slow) * self._loss_slow
        if not self.cfg.adaptive_lr:
            return
        lo, hi = self.cfg.adaptive_lr_range
        self.lr_scale = min(hi, max(lo, (self._loss_fast / max(self._loss_slow, 1e-9)) ** 4))

    # ------------------------------------------------------------------ ranking
    def scorer(self) -> Scorer:
        """A frozen ranking view of the current weights (rebuilt lazily after learning)."""
        if self._scorer is None:
            self._sync_id_table()
            n = len(self.item_ids)
            if self.cfg.item_tower == "linear":
                self._scorer = self._linear_scorer(n)
            else:
                net = copy.deepcopy(self.net).eval()
                self._scorer = Scorer(net, self.text[:n], self.item_ids)
        return self._scorer

    def _linear_scorer(self, n: int) -> Scorer:
        """The linear tower's Scorer, built from the previous one at the cost of the rows
        touched since (ID rows SparseAdam moved, new texts, appended items): the dense towers
        are copied (small), the ID table is not, and item names are shared, not copied."""
        table = self.net.id_emb.detach()  # (N, d)
        no_table = nn.Parameter(table[:0].clone(), requires_grad=False)
        net = copy.deepcopy(self.net, memo={id(self.net.id_emb): no_table}).eval()
        names = ItemNames(self.item_ids, self.index, n)
        prev, touched = self._last_scorer, self._touched
        if prev is None or touched is None:
            scorer = Scorer(net, self.text[:n], names, ids=table[:n])
        else:
            appended = torch.arange(len(prev), n, device=self.device)
            rows = torch.cat([*touched, appended]).unique()  # (k,) sorted
            ids = table[rows] if self.cfg.id_embedding else table.new_zeros(len(rows), table.shape[1])
            base = fixed_projection(net, self.text[rows]) if self.cfg.text else None
            scorer = prev.updated(net, names, rows, ids, base)
        self._last_scorer, self._touched = scorer, []
        return scorer

    def rank(self, history: Sequence[str], k: int = 10,
             exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """Top-k (item_id, score) for a history of item ids."""
        return self.scorer().rank_batch([history], k, [exclude])[0]

    def rank_batch(self, histories: Sequence[Sequence[str]], k: int,
                   exclude: Sequence[Collection[str]]) -> list[list[str]]:
        """Benchmark protocol: top-k item ids per history."""
        return [[i for i, _ in r] for r in self.scorer().rank_batch(histories, k, exclude)]

    def evaluate(self, batch: Sequence[Interaction], k: int = 10,
                 only: Collection[int] | None = None) -> tuple[list[float], list[float]]:
        """Prequential HR@k and NDCG@k per event, before learning it (histories grow in-batch);
        `only`: rank just the events at these positions of `batch` (a sample of it)."""
        hist_of: dict[str, list[str]] = {}
        seen_of: dict[str, set[str]] = {}
        histories, excludes, targets = [], [], []
        for j, e in enumerate(batch):
            h = hist_of.setdefault(e.user_id, self.history(e.user_id))
            s = seen_of.setdefault(e.user_id, {self.item_ids[i] for i in self.seen.get(e.user_id, ())})
            if only is None or j in only:
                histories.append(list(h))
                excludes.append(set(s))
                targets.append(e.item_id)
            h.append(e.item_id)
            s.add(e.item_id)
        return _hits(self.rank_batch(histories, k, excludes), targets)

    # ------------------------------------------------------------------ publishing
    def gate(self, k: int = 10) -> GateDecision:
        """Validation gate: HR@k of the exact candidate weights (the current ones) on the
        held-out events, which no version has trained on, against the weights that were
        published when the gate first ranked each of them (its `reference_hit`, kept while the
        event is in the set). So the reference is up to a set's span old (`gate_set` x
        `gate_holdout` events), not the last publish: damage learned a little per publish adds
        up against what was served before it, where against the last publish each slice of it
        looked harmless (tests/test_gate_burst.py: 40 publishes of flipped labels each lost at
        most 9% to the one before, and 40% in all). Drift hits the candidate and the reference
        alike on events neither trained on; if anything the older reference knew less of it.
        Refused when the candidate lost more than `gate_tolerance` of the reference HR and the
        paired difference is `gate_z` standard errors or more (a sign test on the events where
        only one of the two hits). With fewer than `gate_min_events` held out, or nothing
        published yet, there is no verdict: publish. A catalog above `gate_items` is sampled:
        both weights rank each target among the same `gate_items` random items
        (`_gate_sample`)."""
        held = list(self.validation)
        cfg = self.cfg
        if not cfg.gate or self._published_scorer is None or len(held) < cfg.gate_min_events:
            return GateDecision(True, 0.0, 0.0, 0)
        among = self._gate_sample()
        todo = [h for h in held if h.reference_hit is None]
        if todo:  # the published weights rank each held-out event once (per sample)
            for h, hit in zip(todo, self._held_hits(self._published_scorer, todo, k, among),
                              strict=True):
                h.reference_hit = hit
        hits = self._held_hits(self.scorer(), held, k, among)
        refs = [h.reference_hit or 0.0 for h in held]
        hr, ref = float(np.mean(hits)), float(np.mean(refs))
        only_ref = sum(r > c for c, r in zip(hits, refs, strict=True))
        only_cand = sum(c > r for c, r in zip(hits, refs, strict=True))
        worse = only_ref - only_cand >= cfg.gate_z * math.sqrt(only_ref + only_cand)
        refuse = hr < (1.0 - cfg.gate_tolerance) * ref and worse
        return GateDecision(not refuse, hr, ref, len(held))

    def _gate_sample(self) -> torch.Tensor | None:
        """The catalog rows the gate ranks among: None (all of them) up to `gate_items`, else
        a uniform sample of that many, kept for GATE_SAMPLE_VERDICTS verdicts so that the
        published weights' hits (computed once per held-out event) stay comparable; a new
        sample forgets them (the reference is then the last published weights again). Items
        added since the draw join at the next one."""
        n, want = len(self.item_ids), self.cfg.gate_items
        if not want or n <= want:
            if self._gate_rows is not None:
                self._forget_reference_hits()
            self._gate_rows = None
            return None
        if self._gate_rows is None or self._gate_uses >= GATE_SAMPLE_VERDICTS:
            self._gate_rows = torch.randperm(n, generator=self._gate_gen)[:want]
            self._gate_uses = 0
            self._forget_reference_hits()
        self._gate_uses += 1
        return self._gate_rows

    def _forget_reference_hits(self) -> None:
        for h in self.validation:
            h.reference_hit = None

    def _held_hits(self, scorer: Scorer, held: Sequence[HeldOut], k: int,
                   among: torch.Tensor | None = None) -> list[float]:
        """Hits of `scorer` on `held`. Items added to the catalog after `scorer` was built
        (the published weights are older than the candidate's catalog) are unknown to it: it
        cannot recommend a target among them (a miss), and it reads histories without them,
        as `Scorer.user_vectors` skips unknown ids."""
        t, n = self.cfg.history_len, len(scorer)
        hist = torch.full((len(held), t), -1, dtype=torch.long)
        rows, cols, unknown = [], [], []
        for r, h in enumerate(held):
            past = [j for j in h.example[0] if j < n][-t:]
            if past:
                hist[r, t - len(past):] = torch.tensor(past)
            seen = [j for j in h.exclude if j < n]
            rows.extend([r] * len(seen))
            cols.extend(seen)
            unknown.append(h.example[1] >= n)
        targets = torch.tensor([0 if u else h.example[1] for h, u in zip(held, unknown,
                                                                          strict=True)])
        if among is not None:
            among = among[among < n]
        hits = scorer.hits(hist, (torch.tensor(rows, dtype=torch.long),
                                  torch.tensor(cols, dtype=torch.long)), targets, k,
                           among).tolist()
        return [0.0 if u else hit for hit, u in zip(hits, unknown, strict=True)]

    def mark_published(self) -> None:
        """The current weights were published: they become the anchor, the rollback point and
        the gate's reference for the held-out events it has not ranked yet (the ones it has
        keep theirs). Costs the ID rows written since the last publish, not the catalog."""
        if self.cfg.anchor != "ema":  # the ema anchor moves on its own clock
            self.anchor = [p.detach().clone() for p in self._dense]
        now = self.state_tensors()
        pub = self._published
        if pub is None or self._dirty is None:
            self._published = {k: v.detach().clone() for k, v in now.items()}
        else:
            table, old = now[ID_TABLE], pub[ID_TABLE]
            if table.shape[0] > old.shape[0]:  # appended items: amortised growth
                grown = table.new_zeros(max(table.shape[0], 2 * old.shape[0]), table.shape[1])
                grown[: old.shape[0]] = old
                old = grown
            rows = torch.cat([self._dirty_rows(self._published_rows),
                              torch.arange(self._published_rows, table.shape[0],
                                           device=table.device)])
            old[rows] = table[rows]
            self._published = {k: v.detach().clone() for k, v in now.items() if k != ID_TABLE}
            self._published[ID_TABLE] = old  # rows past the table's: spare capacity
        self._published_rows = now[ID_TABLE].shape[0]
        self._dirty = []
        self._published_scorer = self.scorer()

    def published_scorer(self) -> Scorer:
        """A ranking view of the last published weights: what a server ranks with."""
        assert self._published_scorer is not None, "nothing published yet"
        return self._published_scorer

    def published_state(self) -> dict[str, torch.Tensor]:
        """The last published weights (the rollback point), as `state_tensors` had them."""
        assert self._published is not None, "nothing published yet"
        return {**self._published, ID_TABLE: self._published[ID_TABLE][: self._published_rows]}

    def published_delta(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """What changed since the last publish in `make_delta`'s form (dense tensors that
        differ whole, the ID rows that differ or were appended, the appended names), at the
        cost of the rows written since, not the catalog."""
        assert self._published is not None, "nothing published yet"
        now = self.state_tensors()
        n_pub, table = self._published_rows, now[ID_TABLE]
        old = self._published[ID_TABLE]
        rows = self._dirty_rows(table.shape[0])
        rows = rows[rows < n_pub]
        rows = rows[(table[rows] != old[rows]).any(dim=1)]
        rows = torch.cat([rows, torch.arange(n_pub, table.shape[0], device=rows.device)])
        delta = {k: v for k, v in now.items()
                 if k != ID_TABLE and not torch.equal(v, self._published[k])}
        delta["id_emb.rows"] = rows.to(torch.int64).cpu()
        delta["id_emb.values"] = table[rows].cpu()
        delta["id_emb.size"] = torch.tensor([table.shape[0]], dtype=torch.int64)
        return delta, self.item_ids[n_pub: table.shape[0]]

    def _mark_dirty(self, rows: torch.Tensor | None) -> None:
        if rows is None:
            self._dirty = None
        elif self._dirty is not None:
            self._dirty.append(rows.flatten())
            if len(self._dirty) > 64:  # bounded between publishes
                self._dirty = [torch.cat(self._dirty).unique()]

    def _dirty_rows(self, n: int) -> torch.Tensor:
        """(k,) sorted rows below `n` written since the last publish (every row: unknown)."""
        if self._dirty is None:
            return torch.arange(n, device=self.device)
        rows = torch.cat([torch.zeros(0, dtype=torch.long, device=self.device), *self._dirty])
        rows = rows.unique()
        return rows[rows < n]

    def rollback(self) -> None:
        """Return to the last published weights (after the gate refused the candidate)."""
        if self._published is not None:
            self.load_tensors(self.published_state(), self.item_ids[: self._published_rows])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a server needs besides the base encoder: adapters, user tower, ID table."""
        self._sync_id_table()
        out = {k: v.detach() for k, v in self.net.state_dict().items()}
        out.update({k: v.detach() for k, v in self.encoder.trainable_state().items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], item_ids: Sequence[str]) -> None:
        """Load published weights; `item_ids` names the ID table's rows (a prefix of ours or new)."""
        for item_id in item_ids:
            self._ensure(item_id)
        if [self.index[i] for i in item_ids] != list(range(len(item_ids))):
            raise ValueError("published item order does not match this learner's catalog order")
        self._sync_id_table()
        net_state = {k: v for k, v in tensors.items() if not k.startswith("encoder.")}
        ids = net_state.pop("id_emb")
        with torch.no_grad():
            self.net.id_emb[: ids.shape[0]] = ids.to(self.device)
        missing = self.net.load_state_dict(net_state, strict=False)
        if [k for k in missing.missing_keys if k != "id_emb"] or missing.unexpected_keys:
            raise ValueError(f"weights do not fit the model: {missing}")
        enc = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
        if enc:
            self.encoder.model.load_state_dict(enc, strict=False)
            self._refresh_text()
        self._touch(None)  # any row may differ from the last Scorer's
        self._mark_dirty(None)
        self._scorer = None
        self._stamp += 1


def _history_mask(hist: torch.Tensor, needed: torch.Tensor, c_rows: torch.Tensor) -> torch.Tensor:
    """(B, C) True where candidate c is in row b's history: histories (B, L) of catalog rows
    (-1 = none), `needed` (U,) the sorted unique rows the step embeds, `c_rows` (C,) each
    candidate's position in it. O(B L log U + B U): no (B, L, C) comparison."""
    b = hist.shape[0]
    at = torch.searchsorted(needed, hist.clamp(min=0)).clamp(max=len(needed) - 1)  # (B, L)
    found = (needed[at] == hist) & (hist >= 0)
    marks = torch.zeros(b, len(needed), dtype=torch.bool, device=hist.device)  # (B, U)
    rows = torch.arange(b, device=hist.device).unsqueeze(1).expand_as(at)
    marks[rows[found], at[found]] = True
    return marks[:, c_rows]


def _hits(ranked: Sequence[Sequence[str]], targets: Sequence[str]) -> tuple[list[float], list[float]]:
    """HR and NDCG per (ranking, target) pair."""
    hits, ndcgs = [], []
    for r, target in zip(ranked, targets, strict=True):
        rank = list(r).index(target) if target in r else -1
        hits.append(1.0 if rank >= 0 else 0.0)
        ndcgs.append(1.0 / math.log2(rank + 2) if rank >= 0 else 0.0)
    return hits, ndcgs
