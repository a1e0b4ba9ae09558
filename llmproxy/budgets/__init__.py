# -*- test-case-name: llmproxy.test.test_budgets -*-
"""
Budgets: spending caps per proxy key and per user, per UTC day and month,
reserved at their worst case before a request is forwarded and settled at
its real cost after (see docs/keys-and-budgets.md).

  - L{policy}: scopes, periods, holds, the store interface;
  - L{memory} and L{redis_store}: where spend is kept (beside the rate
    limiter's backend);
  - L{rebuild}: the memory store's spend, read back from the cost records;
  - L{remote}: a group's workers sharing the memory store in the master;
  - L{book}: the budgets of one configuration, as admission uses them;
  - L{alerts}: the log line and the webhook when a fraction is crossed.

Nothing here knows HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from llmproxy.budgets.alerts import Alert, AlertSender
from llmproxy.budgets.book import BudgetBook, Plan, SpendWatch, Unpriced, budget_caps
from llmproxy.budgets.memory import MemorySpendStore, Tallies
from llmproxy.budgets.policy import (
    BudgetReservation,
    Hold,
    ISpendStore,
    Shortfall,
    SpendDecision,
    Spent,
    nanos_to_usd,
    period_end,
)
from llmproxy.budgets.rebuild import spend_from_records
from llmproxy.budgets.redis_store import RedisSpendStore
from llmproxy.budgets.remote import RemoteSpendStore
from llmproxy.config import AuthConfig, Config, RateLimitConfig

__all__ = [
    "Alert",
    "AlertSender",
    "BudgetBook",
    "BudgetReservation",
    "Hold",
    "ISpendStore",
    "MemorySpend",
    "MemorySpendStore",
    "Plan",
    "RedisSpendStore",
    "RemoteSpendStore",
    "Shortfall",
    "SpendDecision",
    "SpendWatch",
    "Spent",
    "Unpriced",
    "budget_caps",
    "nanos_to_usd",
    "period_end",
    "reconfigure_spend_store",
    "spend_services",
    "spend_store_for",
    "tracks_spend",
]

log = Logger(namespace="llmproxy.budgets")

ThreadRunner = Callable[[Callable[[], Tallies]], Deferred[Tallies]]
"""Runs a blocking read off the reactor thread (the rebuild)."""

MemorySpend = Callable[[RateLimitConfig], ISpendStore]
"""
Builds the spend store of the C{memory} backend in a worker of a group: the
master's store seen through L{llmproxy.budgets.remote} (a process of its
own keeps a L{MemorySpendStore}).
"""


def tracks_spend(auth: AuthConfig) -> bool:
    """
    Whether a configuration counts spend: it has proxy keys in use, or a
    user with a budget.
    """
    return bool((auth.mode != "passthrough" and auth.keys) or auth.budgets.per_user)


def counted_scopes(config: Config) -> tuple[set[str], set[str]]:
    """
    The key ids and the users whose spend is counted.
    """
    return {key.id for key in config.auth.keys}, set(config.auth.budgets.per_user)


def _records_path(config: Config) -> str | None:
    """
    The cost-record file to rebuild spend from: the first transport's (the
    others hold the same records).
    """
    tracking = config.features.cost_tracking
    if tracking.enabled and tracking.transports:
        return tracking.transports[0].path
    return None


def spend_store_for(
    config: Config,
    reactor: Any,
    run_in_thread: ThreadRunner,
    metrics_hook: Callable[[], object] | None = None,
    memory: MemorySpend | None = None,
) -> ISpendStore | None:
    """
    The spend store C{config} asks for, beside the rate limiter's backend
    (C{features.rate_limiting.backend}, whether or not limits are on), or
    L{None} when it counts no spend. A memory store starts rebuilding its
    spend from the cost records at once, in a thread.

    @param memory: builds the C{memory} backend's store (see
        L{MemorySpend}); by default a L{MemorySpendStore} here.
    """
    if not tracks_spend(config.auth):
        return None
    rates = config.features.rate_limiting
    if rates.backend == "redis":
        return RedisSpendStore(rates, reactor, metrics_hook)
    if memory is not None:
        return memory(rates)
    store = MemorySpendStore()
    path = _records_path(config)
    capped = any(key.budget for key in config.auth.keys) or config.auth.budgets.per_user
    if path is None and capped:
        log.warn(
            "Budgets are counted in memory and no cost-record file is configured: spend "
            "starts from zero at every start (enable features.cost_tracking, or use the "
            "redis backend)"
        )
    if path is None:
        return store
    keys, users = counted_scopes(config)
    store.rebuilding(
        run_in_thread(partial(spend_from_records, path, keys, users, reactor.seconds()))
    )
    return store


def reconfigure_spend_store(
    current: ISpendStore | None,
    old: Config,
    new: Config,
    reactor: Any,
    run_in_thread: ThreadRunner,
    metrics_hook: Callable[[], object] | None = None,
    memory: MemorySpend | None = None,
) -> ISpendStore | None:
    """
    The spend store after a reload: the current one while the backend (and
    its Redis URL) stays, so no spend is forgotten; a new one otherwise
    (the caller then swaps the services of L{spend_services}).
    """
    if not tracks_spend(new.auth):
        return None
    old_rates, new_rates = old.features.rate_limiting, new.features.rate_limiting
    kept: object = current  # (mypy-zope: an implementer is never "in" ISpendStore | None)
    if kept is not None and old_rates.backend == new_rates.backend:
        if isinstance(kept, MemorySpendStore):
            return kept
        if isinstance(kept, RemoteSpendStore):
            kept.reconfigure(new_rates)
            return kept
        if isinstance(kept, RedisSpendStore) and old_rates.redis.url == new_rates.redis.url:
            kept.reconfigure(new_rates)
            return kept
    return spend_store_for(new, reactor, run_in_thread, metrics_hook, memory)


def spend_services(store: object) -> list[IService]:
    """
    The services a spend store (or L{None}) needs running: a Redis store's
    connection.
    """
    if isinstance(store, RedisSpendStore):
        return [store]
    return []
