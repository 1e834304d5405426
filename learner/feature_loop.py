"""The feature loop around each step: read the batch's features, fold its labels into the streaming
aggregates, push them to the online store while the model steps, and read the next batch's features ahead.

The order is the point-in-time guarantee: a batch reads its features (:meth:`FeatureLoop.read`) *before* its
own labels are folded (:meth:`FeatureLoop.fold`), and only after the previous batch's push has landed, so
nothing a batch sees includes its own labels and everything it sees includes every earlier batch's.

With several workers each user and item belongs to one worker (``id mod N``): that worker folds the entity's
events from every worker's batch (gathered through the reducer, on the training thread so that every
worker's collectives run in one order) and is the only one to push its rows, so the store holds aggregates
over everything the group trained on and no worker overwrites them with the partial counts of its own
partitions. With one worker this is ``aggregator.update(examples)``.

An online store that goes away (Redis killed or restarting) holds the loop where it is: the store retries
its pushes and lookups (``features.backends``), so :meth:`FeatureLoop.read` returns no features it could
not read, no step is trained meanwhile, and a checkpoint (which waits for the last push) and so the
commit of offsets wait too. The loop resumes by itself when the store answers again, or fails with
``FeatureStoreUnavailable`` after ``features.outage_timeout_s``; :meth:`FeatureLoop.outage_figures` counts it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from features.aggregates import AggregateConfig, Events, StreamAggregator
from learner.distributed import LocalReducer, Reducer
from learner.step import column


class FeatureReader(Protocol):
    def lookup(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray: ...
    # and, when categorical codes are read, ``lookup_batch(user_ids, item_ids)`` -> ``features.store.FeatureBatch``
    def push(self, users: pd.DataFrame, items: pd.DataFrame, before_commit: Callable[[], object] | None = None) -> None: ...
    def flush(self) -> None: ...


class Features(NamedTuple):
    """A batch's features: ``dense`` (B, F) and the categorical ``codes`` the model embeds (field -> (B,) int64,
    -1 where missing)."""

    dense: np.ndarray
    codes: dict[str, np.ndarray]


class FeatureLoop:
    def __init__(self, store: FeatureReader, reducer: Reducer | None = None,
                 aggregates: AggregateConfig | None = None, codes: Sequence[str] = ()) -> None:
        """``codes``: the categorical features to read beside the dense ones (those with a table of their own)."""
        self.store = store
        self.codes = tuple(codes)
        self.reducer: Reducer = reducer or LocalReducer()
        self.aggregator = StreamAggregator(aggregates or AggregateConfig())
        self._pusher = ThreadPoolExecutor(1, thread_name_prefix="moestream-push")
        self._push: Future | None = None
        self._readable: Future | None = None
        """Done once the last push can be read through the store (before its commit: see ``read``)."""
        self._ahead: tuple[np.ndarray, np.ndarray, Features] | None = None
        """Features read ahead for the next step: (user ids, item ids, features)."""
        self.read_ahead = 0
        """Steps whose features had been read ahead on the push thread."""
        self.nonfinite = 0
        """Feature values read as NaN or infinite, replaced by 0."""

    def read(self, examples: pa.Table) -> Features:
        """The examples' features, as the store holds them once the last push has landed. A read ahead is for
        the very next step only: used if it was for exactly these pairs, dropped otherwise.

        It waits until the last push is readable, not until it is committed: the read ahead ran inside the push's
        transaction, so the step trains while the push thread commits (a commit of a thousand new entities writes
        megabytes of B-tree pages). Any other read of the store waits for the commit on the store's lock."""
        readable, self._readable = self._readable, None
        if readable is not None:
            readable.result()
        if self._push is not None and self._push.done():
            self.wait()  # a commit that failed is raised here, by the next read
        ahead, self._ahead = self._ahead, None
        if examples.num_rows == 0:
            return Features(np.zeros((0, 0), dtype=np.float32), {name: np.zeros(0, np.int64) for name in self.codes})
        users, items = column(examples, "user_id", np.int64), column(examples, "item_id", np.int64)
        if ahead is not None and np.array_equal(ahead[0], users) and np.array_equal(ahead[1], items):
            self.read_ahead += 1
            return ahead[2]
        return self._lookup(users, items)

    def _lookup(self, users: np.ndarray, items: np.ndarray) -> Features:
        if not self.codes:
            return Features(self._finite(self.store.lookup(users, items)), {})
        batch = self.store.lookup_batch(users, items)
        return Features(self._finite(batch.dense), {name: batch.ids[name] for name in self.codes})

    def fold(self, examples: pa.Table, upcoming: pa.Table | None = None) -> None:
        """Fold the examples' labels into the aggregates and push the new rows on the push thread; then, on
        that thread, read ``upcoming``'s features (the read the next step would make at its start)."""
        events = Events.of(examples)
        reducer = self.reducer
        if reducer.world_size > 1:
            events = Events.from_matrix(reducer.gather_rows(events.to_matrix()))
            users = events.where(events.user_id % reducer.world_size == reducer.rank)
            items = events.where(events.item_id % reducer.world_size == reducer.rank)
        else:
            users = items = events
        if len(users) or len(items):
            if self._push is not None and self._push.done():
                self.wait()  # raise what the last push raised (its commit included) before queueing another
            self._readable = Future()
            self._push = self._pusher.submit(self._fold_and_push, users, items, upcoming, self._readable)

    def _fold_and_push(self, users: Events, items: Events, upcoming: pa.Table | None, readable: Future) -> None:
        def read_ahead() -> None:  # after this push is readable, as the next step's own read would be
            if upcoming is not None and upcoming.num_rows:
                user_ids, item_ids = column(upcoming, "user_id", np.int64), column(upcoming, "item_id", np.int64)
                self._ahead = (user_ids, item_ids, self._lookup(user_ids, item_ids))
            readable.set_result(None)

        try:
            user_rows, item_rows = self.aggregator.fold(users, items)
            self.store.push(user_rows, item_rows, before_commit=read_ahead)
        except BaseException as exc:
            if not readable.done():
                readable.set_exception(exc)
            raise

    def wait(self) -> None:
        """Until the last push is in the store (raises what it raised)."""
        push, self._push, self._readable = self._push, None, None
        if push is not None:
            push.result()

    def outage_figures(self) -> dict[str, float]:
        """Outages of the online store so far and the seconds it was away (a store without outages: 0)."""
        outages = getattr(self.store, "outages", None)  # OnlineFeatures on Redis; an in-memory store has none
        if outages is None:
            return {"feature_store_outages": 0, "feature_store_down_s": 0.0}
        return {"feature_store_outages": outages.count, "feature_store_down_s": outages.down_s()}

    def seen_ids(self) -> dict[str, np.ndarray]:
        """Every user and item id the aggregates hold (what this worker has folded), once the last push landed."""
        self.wait()
        return self.aggregator.ids()

    def state(self) -> dict[str, np.ndarray]:
        """The aggregates, once the last push landed online and every push is in the offline history (what the
        checkpoint covers is then in the store too; a push or append that failed fails the checkpoint)."""
        self.wait()
        self.store.flush()
        return {f"agg.{k}": v for k, v in self.aggregator.state().items()}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.aggregator.load_state({k[4:]: v for k, v in arrays.items() if k.startswith("agg.")})

    def close(self) -> None:
        """The last push lands, online and in the store's offline history."""
        self.wait()
        self._pusher.shutdown()
        self.store.flush()

    def _finite(self, dense: np.ndarray) -> np.ndarray:
        """Features as read, with any non-finite value (a poisoned source) replaced by 0 and counted."""
        bad = ~np.isfinite(dense)
        if not bad.any():
            return dense
        self.nonfinite += int(bad.sum())
        return np.where(bad, np.float32(0), dense).astype(np.float32, copy=False)
