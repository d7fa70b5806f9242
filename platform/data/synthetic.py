"""Synthetic worlds with a known optimum, generated in parallel Ray tasks straight to Parquet.

The world (built from the seed alone, the same in every task):
- T topics with unit vectors in R^d, a global topic popularity `base` and a sparse
  topic transition matrix M (rows ~ Dirichlet(transition_concentration));
- items: a topic each (equal topic sizes), a latent vector (topic vector + noise),
  a Zipf popularity weight w = 1 / rank^s (ranks scattered over ids) and a birth
  period: a share `new_item_fraction` of the catalog enters uniformly over
  `duration_days`, the rest exists from the start; with `item_half_life_days` an
  item's weight halves every half-life after its birth (old items fade).
  Time is cut into periods of `period_days` (the vocabulary clock).

A user (own interests theta ~ Dirichlet(interest_concentration * T * base), a taste
noise vector, a start time uniform over the span, a heavy-tailed length) lives in
sessions (each event ends the session with `session_end_prob`). At every event:
- at a new session (after the first) interests drift: theta <- (1-eta) theta + eta theta',
  theta' a fresh Dirichlet draw;
- next-topic probabilities
      pz = (1-eps) * (lam * M[topic of previous item] + (1-lam) * theta) + eps * base
  within a session, pz = (1-eps) * theta + eps * base at a session start;
- the true next-item distribution at period p, over items the user has not consumed:
      P(i) ~ pz[z_i] * F[p, i],   F[p, i] = w_i 2^(-(p - b_i)/h) [b_i <= p] / W[p, z_i]
  (W normalises each topic at period p): the exact conditional of drawing (topic,
  item) and redrawing when the item was already consumed (no repeats, as in MovieLens).
- affinity a = <taste, item vector>, taste = normalise(theta @ topic vectors + noise), the
  noise a private draw of size `taste_noise` per user;
  the impression's action is drawn from q = softmax(log rate_k + beta_k (a - A0)
  + gamma_k log(1 + position in session)), with beta = action_affinity * s,
  gamma = action_session_slope * s, s = -0.5 for the weakest (first) action and
  0.5 .. 1.0 for the others (the strongest last), and with probability m = multi_action_rate * 2 sigmoid(2 (a - A0))
  a second, different action from q without the first (the bitmask case). The
  probability that action k is in the impression's bitmask is known exactly:
      P(k) = q_k (1 + m sum_{j != k} q_j / (1 - q_j)).

Ground truth (beside the events): world.parquet (items: topic, birth, weight,
vector), truth/part-*.parquet (for every evaluated leave-one-out target of the
oracle users: the state pz and period, the action probabilities, the oracle rank),
and oracle.json: the ORACLE metrics, i.e. ranking every item by its true next-item
probability (full ranking over the catalog minus the user's whole history,
pessimistic ties, as genrec.train.evaluation) for the valid (second-to-last) and
test (last) targets, the same for a POPULARITY baseline (training-event counts),
and the oracle NE/AUC per action task from the true action probabilities.

Determinism: users are simulated in fixed blocks (block_users: a function of the config), each with its own RNG
stream (seed, block); a shard is a contiguous run of blocks, so the events (the rows,
in order) are the same for a seed whatever num_shards, and no process holds more
than one shard.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import SyntheticSource, resolve_path
from ..metrics import auc, metrics_from_ranks, normalized_entropy
from ..storage import Location, location
from .prepared import write_table

GENERATOR_VERSION = 2
CONTEXT_CARDINALITY = {"gender": 2, "age_bucket": 7, "region": 50}
EVENTS_DIR = "events"
TRUTH_DIR = "truth"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
WORLD_FILE = "world.parquet"
ORACLE_FILE = "oracle.json"
COMPLETE_FILE = "_COMPLETE"  # written last: the folder is whole
BLOCK_SEEN_BYTES = 1 << 26  # a block's users x items seen-matrix stays under this
AFFINITY_CENTER = 0.5  # A0: typical affinity of a consumed item
ITEM_NOISE = 0.6  # item vector = normalise(topic vector + ITEM_NOISE * N(0, I/d))
WITHIN_SESSION_GAP = (math.log(60.0), 1.0)  # log-normal (mu, sigma) seconds: median 1 min
BETWEEN_SESSION_GAP = (math.log(12 * 3600.0), 1.5)  # median 12 h
MAX_REDRAWS = 32  # then draw the few left from the exact conditional
SPLIT_NAMES = ("valid", "test")


def default_path(source: SyntheticSource) -> Path:
    spec = source.model_dump(exclude={"path", "num_shards"})
    spec["generator_version"] = GENERATOR_VERSION
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return resolve_path(f"outputs/raw/synthetic-{digest}")


def output_folder(source: SyntheticSource) -> Location:
    """Where the generated world goes: source.path (a folder or an object-store URI) or the default."""
    return location(source.path or default_path(source), "data.source.path")


# ----------------------------------------------------------------------------- the world

@dataclass
class World:
    num_items: int
    num_topics: int
    num_periods: int
    period_seconds: float
    start_time: int
    topic_base: np.ndarray  # [T]
    transition: np.ndarray  # [T, T]
    topic_vec: np.ndarray  # [T, d]
    item_topic: np.ndarray  # [V+1] int64, row 0 = padding (-1)
    item_birth_day: np.ndarray  # [V+1] float64 (0 = from the start)
    item_birth: np.ndarray  # [V+1] int64 birth period
    item_weight: np.ndarray  # [V+1] float64 (0 for padding)
    item_vec: np.ndarray  # [V+1, d]
    decay: np.ndarray  # [P, P]: decay[p, b] = 2^(-(p-b)/h) for b <= p, else 0
    norm: np.ndarray  # [P, T]: W[p, z]
    birth_cdf: np.ndarray  # [P, T, P]: cdf over birth period of a draw in topic z at period p
    group_upper: np.ndarray  # [V]: group id + within-group cdf, sorted
    group_items: np.ndarray  # [V]: item id of each entry
    action_names: list
    log_rates: np.ndarray  # [K]
    beta: np.ndarray  # [K]
    gamma: np.ndarray  # [K]

    def period_of(self, timestamps: np.ndarray) -> np.ndarray:
        p = np.floor((np.asarray(timestamps, dtype=np.float64) - self.start_time) / self.period_seconds)
        return np.clip(p, 0, self.num_periods - 1).astype(np.int64)

    def item_factors(self, period: int) -> np.ndarray:
        """F[p, i] for every item id (0 for padding and items not born yet): P(i) = pz[z_i] * F[p, i]."""
        factor = self.item_weight * self.decay[period, np.maximum(self.item_birth, 0)]
        factor[self.item_birth > period] = 0.0
        z = np.maximum(self.item_topic, 0)
        return factor / self.norm[period, z]

    def next_item_probs(self, topic_probs: np.ndarray, periods: np.ndarray) -> np.ndarray:
        """[n, V+1] unnormalised true next-item probabilities (before removing the user's history)."""
        topic_probs = np.atleast_2d(topic_probs)
        periods = np.broadcast_to(np.asarray(periods), (len(topic_probs),))
        z = np.maximum(self.item_topic, 0)
        out = np.empty((len(topic_probs), self.num_items + 1))
        for p in np.unique(periods):
            rows = np.flatnonzero(periods == p)
            out[rows] = topic_probs[rows][:, z] * self.item_factors(int(p))[None, :]
        out[:, 0] = 0.0
        return out

    def action_probs(self, affinity: np.ndarray, position: np.ndarray, multi_rate: float):
        """(q [n, K] first-action probabilities, m [n] second-action chance, P(bit k) [n, K])."""
        centred = np.asarray(affinity, dtype=np.float64) - AFFINITY_CENTER
        logits = (self.log_rates[None, :] + self.beta[None, :] * centred[:, None]
                  + self.gamma[None, :] * np.log1p(np.asarray(position, dtype=np.float64))[:, None])
        logits -= logits.max(1, keepdims=True)
        q = np.exp(logits)
        q /= q.sum(1, keepdims=True)
        if q.shape[1] == 1:
            return q, np.zeros(len(q)), q.copy()
        m = np.minimum(1.0, multi_rate * 2.0 / (1.0 + np.exp(-2.0 * centred)))
        ratio = q / np.maximum(1.0 - q, 1e-300)
        bits = q * (1.0 + m[:, None] * (ratio.sum(1, keepdims=True) - ratio))
        return q, m, np.minimum(bits, 1.0)


def _num_periods(source: SyntheticSource) -> int:
    if source.new_item_fraction == 0 and source.item_half_life_days is None:
        return 1
    return max(1, math.ceil(source.duration_days / source.period_days))


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _topics(rng, source: SyntheticSource, T: int, d: int):
    """(global topic popularity `base`, transition matrix M, unit topic vectors)."""
    base = 1.0 / np.arange(1, T + 1) ** 0.6
    base = rng.permutation(base / base.sum())
    transition = rng.dirichlet(np.full(T, source.transition_concentration), size=T) if T > 1 else np.ones((1, 1))
    transition = np.nan_to_num(transition)
    transition /= transition.sum(1, keepdims=True)
    topic_vec = _normalise(rng.standard_normal((T, d)))
    return base, transition, topic_vec


def _items(rng, source: SyntheticSource, topic_vec: np.ndarray, P: int):
    """Per item (0-based): (topic, Zipf weight, birth day, birth period, latent vector)."""
    V, (T, d) = source.num_items, topic_vec.shape
    order = rng.permutation(V)  # item order[k] (0-based) gets topic k % T: equal sizes
    topic = np.empty(V, np.int64)
    topic[order] = np.arange(V) % T
    weight = 1.0 / (rng.permutation(V) + 1.0) ** source.zipf_exponent
    birth_day = np.zeros(V)
    n_new = int(round(source.new_item_fraction * V))
    if n_new:
        # the first T items of `order` cover every topic and stay initial, so no topic is ever empty
        new = order[T:][rng.choice(max(0, V - T), size=min(n_new, max(0, V - T)), replace=False)]
        birth_day[new] = rng.uniform(0.0, source.duration_days, size=len(new))
    birth = np.minimum((birth_day / source.period_days).astype(np.int64), P - 1)
    vec = _normalise(topic_vec[topic] + ITEM_NOISE * rng.standard_normal((V, d)) / math.sqrt(d))
    return topic, weight, birth_day, birth, vec


def _decay(source: SyntheticSource, P: int) -> np.ndarray:
    """[P, P]: decay[p, b] = 2^(-(p-b)/h) for b <= p (1 without a half-life), else 0."""
    ages = np.arange(P)[:, None] - np.arange(P)[None, :]
    if source.item_half_life_days is None:
        return (ages >= 0).astype(np.float64)
    half_life = source.item_half_life_days / source.period_days
    return np.where(ages >= 0, np.exp2(-np.maximum(ages, 0) / half_life), 0.0)


def _birth_cdf(decay: np.ndarray, topic: np.ndarray, birth: np.ndarray, weight: np.ndarray, T: int):
    """(W[p, z] the live weight of topic z at period p, [P, T, P] cdf over the birth period of a draw)."""
    P = len(decay)
    mass = np.zeros((T, P))
    np.add.at(mass, (topic, birth), weight)
    by_birth = decay[:, None, :] * mass[None, :, :]  # [P, T, P]
    norm = by_birth.sum(2)
    birth_cdf = np.cumsum(by_birth, 2) / norm[:, :, None]
    birth_cdf[:, :, -1] = 1.0
    return norm, birth_cdf


def _item_groups(topic: np.ndarray, birth: np.ndarray, weight: np.ndarray, P: int):
    """Items sorted by (topic, birth period) group: (group id + within-group weight cdf, 0-based item)."""
    V = len(topic)
    group = topic * P + birth
    entries = np.lexsort((np.arange(V), group))
    g = group[entries]
    cum = np.cumsum(weight[entries])
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, V])
    before = np.repeat(np.r_[0.0, cum][starts], sizes)
    totals = np.repeat(cum[np.r_[starts[1:], V] - 1], sizes) - before
    within = (cum - before) / totals
    within[np.r_[starts[1:], V] - 1] = 1.0
    return g + within, entries


def _action_params(source: SyntheticSource):
    """(action names, log base rates, beta, gamma) of the action softmax."""
    names = list(source.action_rates)
    K = len(names)
    rates = np.array([source.action_rates[a] for a in names], dtype=np.float64)
    # the weakest action falls with affinity (-0.5), the others rise (0.5 .. 1.0, strongest last)
    strength = np.r_[-0.5, np.linspace(0.5, 1.0, K - 1)] if K > 1 else np.zeros(1)
    return (names, np.log(rates / rates.sum()), source.action_affinity * strength,
            source.action_session_slope * strength)


def build_world(source: SyntheticSource) -> World:
    """The latent world: deterministic for the seed (and the world-shaping options)."""
    rng = np.random.default_rng([source.seed, 0x5EED, 1])
    V, d, P = source.num_items, source.latent_dim, _num_periods(source)
    T = min(source.num_topics, V)  # every topic holds at least one item from the start
    base, transition, topic_vec = _topics(rng, source, T, d)
    topic, weight, birth_day, birth, vec = _items(rng, source, topic_vec, P)
    decay = _decay(source, P)
    norm, birth_cdf = _birth_cdf(decay, topic, birth, weight, T)
    group_upper, entries = _item_groups(topic, birth, weight, P)
    names, log_rates, beta, gamma = _action_params(source)
    pad = lambda a, fill: np.r_[fill, a]  # noqa: E731  row 0 = padding
    return World(
        num_items=V, num_topics=T, num_periods=P, period_seconds=source.period_days * 86_400.0,
        start_time=source.start_time, topic_base=base, transition=transition, topic_vec=topic_vec,
        item_topic=pad(topic, -1), item_birth_day=pad(birth_day, 0.0), item_birth=pad(birth, 0),
        item_weight=pad(weight, 0.0), item_vec=np.vstack([np.zeros((1, d)), vec]),
        decay=decay, norm=norm, birth_cdf=birth_cdf, group_upper=group_upper, group_items=entries + 1,
        action_names=names, log_rates=log_rates, beta=beta, gamma=gamma,
    )


# ----------------------------------------------------------------------------- simulation

def _categorical(rng, probs: np.ndarray) -> np.ndarray:
    cum = np.cumsum(probs, 1)
    u = rng.random(len(probs)) * cum[:, -1]
    return np.minimum((cum <= u[:, None]).sum(1), probs.shape[1] - 1)


def _draw_items(world: World, rng, pz, period, seen, rows) -> np.ndarray:
    """One item per row from P(i) ~ pz[z_i] F[p, i] over items not in seen[rows] (exact)."""
    P = world.num_periods
    out = np.zeros(len(rows), np.int64)
    todo = np.arange(len(rows))
    for _ in range(MAX_REDRAWS):
        z = _categorical(rng, pz[todo])
        b = np.minimum((world.birth_cdf[period[todo], z] <= rng.random(len(todo))[:, None]).sum(1), P - 1)
        entry = np.searchsorted(world.group_upper, z * P + b + rng.random(len(todo)), side="right")
        item = world.group_items[np.minimum(entry, world.num_items - 1)]
        fresh = ~seen[rows[todo], item]
        out[todo[fresh]] = item[fresh]
        todo = todo[~fresh]
        if not len(todo):
            return out
    probs = world.next_item_probs(pz[todo], period[todo])
    probs[seen[rows[todo]]] = 0.0
    out[todo] = _categorical(rng, probs)
    return out


def _user_lengths(rng, n, source: SyntheticSource):
    # log-normal with sigma 1: mean = exp(mu + 1/2)
    mu = np.log(source.mean_events_per_user) - 0.5
    lengths = np.rint(rng.lognormal(mu, 1.0, size=n)).astype(np.int64)
    top = max(1, min(source.max_events_per_user, source.num_items // 2))
    return np.clip(lengths, min(source.min_events_per_user, top), top)


def oracle_stride(source: SyntheticSource) -> int:
    return max(1, -(-source.num_users // source.oracle_max_users))


def _ranks(probs: np.ndarray, target_prob: np.ndarray, seen_rows: np.ndarray) -> np.ndarray:
    """Pessimistic rank of each target among items not consumed before it (target included)."""
    probs = np.where(seen_rows, -1.0, probs)
    probs[:, 0] = -1.0
    return (probs >= target_prob[:, None]).sum(1)


class _Block:
    """One block of users being simulated: their draws (one RNG stream), running state and output rows.

    The draws happen in a fixed order (users, then per step: sessions, items, actions) that the
    events depend on: a change of order changes every event of the seed."""

    def __init__(self, world: World, source: SyntheticSource, block: int):
        self.world, self.source = world, source
        first = block * block_users(source)
        n = max(0, min(source.num_users, first + block_users(source)) - first)
        self.rng = np.random.default_rng([source.seed, 0x5EED, 2, block])
        self.alpha = source.interest_concentration * world.num_topics * world.topic_base
        self.user_ids = np.arange(first + 1, first + n + 1, dtype=np.int64)
        self.lengths = _user_lengths(self.rng, n, source)
        self.theta = self._interests(n)
        d = world.item_vec.shape[1]
        self.taste_noise = source.taste_noise * self.rng.standard_normal((n, d)) / math.sqrt(d)
        start = np.floor(self.rng.uniform(0, source.duration_days * 86_400, size=n)).astype(np.int64)
        self.clock = source.start_time + start
        self.oracle_user = ((self.user_ids - 1) % oracle_stride(source) == 0) & (self.lengths >= 3)

        self.offsets = np.r_[0, np.cumsum(self.lengths)]
        total = int(self.offsets[-1])
        self.items = np.zeros(total, np.int64)
        self.stamps = np.zeros(total, np.int64)
        self.first_action = np.zeros(total, np.int64)
        self.second_action = np.full(total, -1, np.int64)
        self.seen = np.zeros((n, world.num_items + 1), dtype=bool)
        self.prev_topic = np.zeros(n, np.int64)
        self.position = np.zeros(n, np.int64)
        self.truth = []

    def _interests(self, k: int) -> np.ndarray:
        """k fresh Dirichlet(alpha) interest vectors (the topic base where every gamma draw is 0)."""
        g = self.rng.standard_gamma(self.alpha, size=(k, self.world.num_topics))
        s = g.sum(1, keepdims=True)
        return np.where(s > 0, g / np.where(s > 0, s, 1.0), self.world.topic_base)

    def active_rows(self):
        """Per step, the users still active: a prefix of the users ordered by length, longest first."""
        by_length = np.argsort(-self.lengths, kind="stable")
        active_counts = np.searchsorted(-self.lengths[by_length], -np.arange(int(self.lengths.max(initial=0))),
                                        side="left")
        for step, k in enumerate(active_counts):
            yield step, by_length[:k]

    def step(self, step: int, rows: np.ndarray) -> None:
        """Every active user's next impression: time, topic, item, actions (and its truth if a target)."""
        new_session = self._advance_clock(step, rows)
        pz = self._topic_probs(rows, new_session)
        period = self.world.period_of(self.clock[rows])
        item = _draw_items(self.world, self.rng, pz, period, self.seen, rows)
        affinity, bits, act, second = self._draw_actions(rows, item)
        self._record_truth(step, rows, dict(
            item=item, pz=pz, period=period, new_session=new_session, affinity=affinity, bits=bits, act=act,
            second=second))
        self.seen[rows, item] = True
        self.prev_topic[rows] = self.world.item_topic[item]
        at = self.offsets[rows] + step
        self.items[at], self.stamps[at], self.first_action[at], self.second_action[at] = (
            item, self.clock[rows], act, second)

    def _advance_clock(self, step: int, rows: np.ndarray) -> np.ndarray:
        """Session ends, time gaps and interest drift; returns which rows start a new session."""
        source, k = self.source, len(rows)
        if step == 0:
            new_session = np.ones(k, dtype=bool)
            gaps = np.zeros(k, np.int64)
        else:
            new_session = self.rng.random(k) < source.session_end_prob
            mu = np.where(new_session, BETWEEN_SESSION_GAP[0], WITHIN_SESSION_GAP[0])
            sigma = np.where(new_session, BETWEEN_SESSION_GAP[1], WITHIN_SESSION_GAP[1])
            gaps = np.maximum(1, np.rint(np.exp(mu + sigma * self.rng.standard_normal(k)))).astype(np.int64)
            drifting = rows[new_session]
            if len(drifting) and source.interest_drift > 0:
                self.theta[drifting] = ((1 - source.interest_drift) * self.theta[drifting]
                                        + source.interest_drift * self._interests(len(drifting)))
        self.clock[rows] += gaps
        self.position[rows] = np.where(new_session, 0, self.position[rows] + 1)
        return new_session

    def _topic_probs(self, rows: np.ndarray, new_session: np.ndarray) -> np.ndarray:
        """pz: interests (and, within a session, the previous item's topic transition), plus exploration."""
        eps, lam = self.source.exploration, self.source.topic_transition
        mix = self.theta[rows]
        cont = ~new_session
        mix[cont] = lam * self.world.transition[self.prev_topic[rows[cont]]] + (1 - lam) * mix[cont]
        return (1 - eps) * mix + eps * self.world.topic_base

    def _draw_actions(self, rows: np.ndarray, item: np.ndarray):
        """(affinity, P(bit k), first action, second action or -1) of each row's impression of `item`."""
        taste = _normalise(self.theta[rows] @ self.world.topic_vec + self.taste_noise[rows])
        affinity = np.einsum("nd,nd->n", taste, self.world.item_vec[item])
        q, m, bits = self.world.action_probs(affinity, self.position[rows], self.source.multi_action_rate)
        act = _categorical(self.rng, q)
        second = np.full(len(rows), -1, np.int64)
        if q.shape[1] > 1:
            multi = np.flatnonzero(self.rng.random(len(rows)) < m)
            rest = q[multi].copy()
            rest[np.arange(len(multi)), act[multi]] = 0.0
            second[multi] = _categorical(self.rng, rest)
        return affinity, bits, act, second

    def _record_truth(self, step: int, rows: np.ndarray, drawn: dict) -> None:
        """The truth for leave-one-out targets: second-to-last (valid) and last (test) events."""
        remaining = self.lengths[rows] - step
        target = self.oracle_user[rows] & (remaining <= 2)
        if not target.any():
            return
        t = np.flatnonzero(target)
        item, act, second = drawn["item"][t], drawn["act"][t], drawn["second"][t]
        seen = self.seen[rows[t]]
        probs = self.world.next_item_probs(drawn["pz"][t], drawn["period"][t])
        p_target = probs[np.arange(len(t)), item]
        mask = (np.int64(1) << act) | np.where(second >= 0, np.int64(1) << np.maximum(second, 0), 0)
        self.truth.append({
            "user_id": self.user_ids[rows[t]], "split": np.where(remaining[t] == 2, 0, 1).astype(np.int8),
            "item_id": item, "timestamp": self.clock[rows[t]], "period": drawn["period"][t],
            "session_start": drawn["new_session"][t], "position": self.position[rows[t]],
            "topic_probs": drawn["pz"][t], "true_prob": p_target / np.where(seen, 0.0, probs).sum(1),
            "affinity": drawn["affinity"][t], "action_probs": drawn["bits"][t], "action_mask": mask,
            "oracle_rank": _ranks(probs, p_target, seen),
        })

    def result(self) -> dict:
        """The block's events, popularity counts, truth rows (by user, split) and oracle users' histories."""
        lengths, offsets, items = self.lengths, self.offsets, self.items
        # popularity baseline counts: the training events (all but the last two of users with >= 3)
        train = np.arange(len(items)) < np.repeat(np.where(lengths >= 3, offsets[1:] - 2, offsets[1:]), lengths)
        counts = np.bincount(items[train], minlength=self.world.num_items + 1).astype(np.int64)
        truth = self.truth
        truth_cols = ({key: np.concatenate([t[key] for t in truth]) for key in truth[0]} if truth else None)
        if truth_cols is not None:  # order by (user, split) whatever the step order
            order = np.lexsort((truth_cols["split"], truth_cols["user_id"]))
            truth_cols = {key: v[order] for key, v in truth_cols.items()}
        ou = np.flatnonzero(self.oracle_user)
        histories = [items[offsets[u]:offsets[u + 1]] for u in ou]
        return {
            "user_id": np.repeat(self.user_ids, lengths), "item_id": items, "timestamp": self.stamps,
            "action": self.first_action, "second_action": self.second_action, "counts": counts,
            "truth": truth_cols,
            "oracle_sequences": (np.concatenate(histories) if histories else np.zeros(0, np.int64),
                                 lengths[ou]),
        }


def simulate_block(world: World, source: SyntheticSource, block: int) -> dict:
    """Events of one block of users (own RNG stream), plus the truth of their eval targets."""
    block_sim = _Block(world, source, block)
    for step, rows in block_sim.active_rows():
        block_sim.step(step, rows)
    return block_sim.result()


def _events_table(world: World, sim: dict) -> pa.Table:
    """One row per action: a second action on an impression is a second row at the same second."""
    n = len(sim["item_id"])
    extra = np.flatnonzero(sim["second_action"] >= 0)
    order = np.argsort(np.concatenate([np.arange(n), extra]), kind="stable")
    names = np.array(world.action_names, dtype=object)
    pick = lambda a: np.concatenate([a, a[extra]])[order]  # noqa: E731
    return pa.table({
        "user_id": pick(sim["user_id"]),
        "item_id": pick(sim["item_id"]),
        "timestamp": pick(sim["timestamp"]),
        "action": pa.array(names[np.concatenate([sim["action"], sim["second_action"][extra]])[order]], pa.string()),
    })


def _truth_table(truth: dict | None, K: int) -> pa.Table:
    def lists(a, width):
        return pa.ListArray.from_arrays(pa.array(np.arange(0, len(a) * width + 1, width, dtype=np.int32)),
                                        pa.array(np.asarray(a, np.float64).reshape(-1)))

    if truth is None:
        truth = {"user_id": np.zeros(0, np.int64), "split": np.zeros(0, np.int8), "item_id": np.zeros(0, np.int64),
                 "timestamp": np.zeros(0, np.int64), "period": np.zeros(0, np.int64),
                 "session_start": np.zeros(0, bool), "position": np.zeros(0, np.int64),
                 "topic_probs": np.zeros((0, 1)), "true_prob": np.zeros(0), "affinity": np.zeros(0),
                 "action_probs": np.zeros((0, K)), "action_mask": np.zeros(0, np.int64),
                 "oracle_rank": np.zeros(0, np.int64)}
    cols = {}
    for key, value in truth.items():
        if key == "split":
            cols[key] = pa.array(np.array(SPLIT_NAMES, dtype=object)[value], pa.string())
        elif key in ("topic_probs", "action_probs"):
            cols[key] = lists(value, value.shape[1] if value.ndim == 2 else 1)
        else:
            cols[key] = pa.array(value)
    return pa.table(cols)


def block_users(source: SyntheticSource) -> int:
    """Users per block: a function of the config only (never of num_shards), so blocks are stable."""
    return int(max(1, min(source.block_users, BLOCK_SEEN_BYTES // (source.num_items + 1))))


def blocks_of_shard(source: SyntheticSource, shard: int) -> range:
    blocks = -(-source.num_users // block_users(source))
    per_shard = -(-blocks // source.num_shards)
    return range(min(blocks, shard * per_shard), min(blocks, (shard + 1) * per_shard))


def generate_shard(source: SyntheticSource, shard: int, out_dir: str | Location, world: World | None = None) -> dict:
    """Write one shard's events and truth; returns its row count and what the oracle summary needs."""
    out = location(out_dir, "data.source.path")
    world = world if world is not None else build_world(source)
    V, K = world.num_items, len(world.action_names)
    events, truths, sequences, lengths = [], [], [], []
    counts = np.zeros(V + 1, np.int64)
    action_counts = np.zeros(K, np.int64)
    impressions = 0
    for block in blocks_of_shard(source, shard):
        sim = simulate_block(world, source, block)
        events.append(_events_table(world, sim))
        counts += sim["counts"]
        impressions += len(sim["item_id"])
        action_counts += np.bincount(sim["action"], minlength=K)
        action_counts += np.bincount(sim["second_action"][sim["second_action"] >= 0], minlength=K)
        if sim["truth"] is not None:
            truths.append(sim["truth"])
        sequences.append(sim["oracle_sequences"][0])
        lengths.append(sim["oracle_sequences"][1])
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                        ("action", pa.string())])
    table = pa.concat_tables(events) if events else schema.empty_table()
    write_table(table, out / EVENTS_DIR / f"part-{shard:05d}.parquet", row_group_size=1 << 20)
    truth = {key: np.concatenate([t[key] for t in truths]) for key in truths[0]} if truths else None
    write_table(_truth_table(truth, K), out / TRUTH_DIR / f"part-{shard:05d}.parquet")
    empty = np.zeros(0, np.int64)
    return {
        "rows": table.num_rows,
        "impressions": impressions,
        "action_counts": action_counts,
        "counts": counts,
        "truth": truth,
        "sequences": np.concatenate(sequences) if sequences else empty,
        "lengths": np.concatenate(lengths) if lengths else empty,
    }


# ----------------------------------------------------------------------------- oracle metrics

def popularity_ranks(counts: np.ndarray, targets: np.ndarray, histories: list) -> np.ndarray:
    """Pessimistic rank of each target when items are ranked by count, history removed."""
    ordered = np.sort(counts[1:])
    c_t = counts[targets]
    at_least = len(ordered) - np.searchsorted(ordered, c_t, side="left")
    sizes = np.array([len(h) for h in histories], dtype=np.int64)
    flat = np.concatenate(histories) if histories else np.zeros(0, np.int64)
    in_history = np.bincount(np.repeat(np.arange(len(targets)), sizes),
                             weights=(counts[flat] >= np.repeat(c_t, sizes)).astype(np.float64),
                             minlength=len(targets))
    return at_least - in_history.astype(np.int64)


def oracle_summary(source: SyntheticSource, world: World, parts: list[dict]) -> dict:
    counts = np.sum([p["counts"] for p in parts], axis=0)
    truths = [p["truth"] for p in parts if p["truth"] is not None]
    summary = {
        "generator_version": GENERATOR_VERSION,
        "split": "leave_one_out",
        "definition": "rank every catalog item by its true next-item probability, the user's whole history "
                      "removed, pessimistic ties; popularity: by training-event count (all but each user's last two)",
        "oracle_users": 0,
        "world": {
            "num_items": world.num_items, "num_topics": world.num_topics, "num_periods": world.num_periods,
            "items_at_start": int((world.item_birth_day[1:] == 0).sum()),
            "new_items": int((world.item_birth_day[1:] > 0).sum()),
            "new_items_per_day": round(float((world.item_birth_day[1:] > 0).sum()) / source.duration_days, 3),
        },
    }
    impressions = sum(p["impressions"] for p in parts)
    action_counts = np.sum([p["action_counts"] for p in parts], axis=0)
    summary["impressions"] = int(impressions)
    summary["action_rates_all_events"] = {
        a: round(float(c) / max(1, impressions), 4) for a, c in zip(world.action_names, action_counts)}
    if not truths:
        return summary
    truth = {key: np.concatenate([t[key] for t in truths]) for key in truths[0]}
    sequences = np.concatenate([p["sequences"] for p in parts])
    lengths = np.concatenate([p["lengths"] for p in parts])
    offsets = np.r_[0, np.cumsum(lengths)]
    summary["oracle_users"] = len(lengths)
    # truth rows are (user, split) ordered, two per oracle user: valid then test
    for code, name in enumerate(SPLIT_NAMES):
        rows = np.flatnonzero(truth["split"] == code)
        stop = offsets[1:] - (2 - code)  # history = events before the target
        histories = [sequences[offsets[u]:stop[u]] for u in range(len(lengths))]
        entry = {
            "count": len(rows),
            "oracle": metrics_from_ranks(truth["oracle_rank"][rows]),
            "popularity": metrics_from_ranks(popularity_ranks(counts, truth["item_id"][rows], histories)),
            "actions": {},
        }
        for k, action in enumerate(world.action_names):
            label = (truth["action_mask"][rows] >> k) & 1
            prob = truth["action_probs"][rows][:, k]
            entry["actions"][action] = {
                "rate": float(label.mean()), "oracle_ne": normalized_entropy(label, prob),
                "oracle_auc": auc(label, prob)}
        summary[name] = entry
    return summary


def read_oracle(source: SyntheticSource) -> dict | None:
    path = output_folder(source) / ORACLE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def oracle_ratio_text(metrics: dict, oracle: dict, split: str = "test", keys=("ndcg@10", "hr@10", "hr@50")) -> str:
    """e.g. 'NDCG@10 0.210 = 3.1x popularity, 62% of oracle' for a model's metrics on a split."""
    ref = oracle.get(split) or {}
    parts = []
    for key in keys:
        if key not in metrics or key not in ref.get("oracle", {}):
            continue
        pop, best = ref["popularity"].get(key), ref["oracle"][key]
        text = f"{key.upper()} {metrics[key]:.4f}"
        if pop:
            text += f" = {metrics[key] / pop:.1f}x popularity"
        if best:
            text += f", {100 * metrics[key] / best:.0f}% of oracle"
        parts.append(text)
    return "; ".join(parts)


# ----------------------------------------------------------------------------- driver

def _write_side_tables(source: SyntheticSource, world: World, out: Location) -> None:
    rng = np.random.default_rng([source.seed, 1 << 31])
    users = {"user_id": np.arange(1, source.num_users + 1, dtype=np.int64)}
    for name, card in CONTEXT_CARDINALITY.items():
        users[name] = rng.integers(0, card, size=source.num_users).astype(np.int32)
    write_table(pa.table(users), out / USERS_FILE)
    item_ids = np.arange(1, source.num_items + 1, dtype=np.int64)
    # a coarse, public category: 8 groups of true topics (the topic itself stays latent)
    category = world.item_topic[1:] * 8 // world.num_topics
    write_table(pa.table({"item_id": item_ids, "genres": [[f"category_{c}"] for c in category]}), out / ITEMS_FILE)
    d = world.item_vec.shape[1]
    write_table(pa.table({
        "item_id": item_ids,
        "topic": pa.array(world.item_topic[1:].astype(np.int32)),
        "birth_day": pa.array(world.item_birth_day[1:]),
        "birth_period": pa.array(world.item_birth[1:].astype(np.int32)),
        "weight": pa.array(world.item_weight[1:]),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(world.item_vec[1:].reshape(-1).astype(np.float32)), d),
    }), out / WORLD_FILE)


def _complete(out: Location) -> bool:
    marker = out / COMPLETE_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("generator_version") == GENERATOR_VERSION
    except ValueError:
        return False


def generate(source: SyntheticSource) -> Path | Location:
    """Generate (once) and return the folder: a Path on a local disk, else its Location (an object
    store's prefix, which workers on any node read). An existing complete folder of this generator is
    reused. Files are written in place and the _COMPLETE marker last, with no rename (object stores
    have none): a folder without the marker is a failed run's (or an older generator's), generated again."""
    from .tasks import run_tasks

    out = output_folder(source)
    if not _complete(out):
        for stale in (COMPLETE_FILE, EVENTS_DIR, TRUTH_DIR):  # a failed run may have written more shards
            (out / stale).delete()
        world = build_world(source)
        _write_side_tables(source, world, out)
        ordered = run_tasks(generate_shard, [{"shard": s} for s in range(source.num_shards)],
                            progress="generate synthetic shards", source=source, out_dir=out, world=world)
        rows = sum(p["rows"] for p in ordered)
        oracle = oracle_summary(source, world, ordered)
        oracle["rows"] = rows
        (out / ORACLE_FILE).write_text(json.dumps(oracle, indent=1))
        (out / COMPLETE_FILE).write_text(json.dumps(
            {"rows": rows, "generator_version": GENERATOR_VERSION, "config": source.model_dump()}, indent=1))
    return out.local_path() if out.is_local else out
