# -*- test-case-name: tests.e2e.test_shared_circuits -*-
"""
Circuit breakers shared by every proxy instance, through the rate limiter's
Redis: failures are counted fleet-wide, an open circuit is skipped by every
instance, and after the cooldown exactly one request of the whole fleet
probes it.

Each instance keeps its own L{CircuitBoard} (the request path asks it,
synchronously, which upstream is available) and this service keeps the
boards in step:

  - every failure or success an instance sees is sent to Redis, where one
    Lua script counts it and opens or closes the circuit; the state that
    comes back is adopted at once;
  - every C{SYNC_INTERVAL} seconds the instance reads the circuits that are
    not closed and adopts them, so it skips what the others opened;
  - the half-open probe is claimed with C{SET NX} (expiring after the
    cooldown, in case the prober dies): whoever loses the claim does not
    send.

While Redis is unreachable each instance falls back to its own board,
which keeps counting on its own: breakers degrade to per-instance, never
to none. The connection is a L{RedisLink} of its own, with the rate
limiter's URL and call deadline.

Key layout: C{llmproxy:cb:<provider>|<upstream>|<model>} hashes
(C{failures}, C{open_until}), the index hash C{llmproxy:cb:open} (field:
the circuit, value: C{open_until}) and C{llmproxy:cb:probe:<circuit>}.
No key holds a credential.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.circuits import CircuitBoard, CircuitKey
from llmproxy.config import RateLimitConfig
from llmproxy.redislink import RedisLink

log = Logger(namespace="llmproxy.circuits")

PREFIX = "llmproxy:cb:"
INDEX = PREFIX + "open"
SYNC_INTERVAL = 0.5
"""Seconds between two reads of the fleet's open circuits."""
PROBE_HOLD_SECONDS = 60.0
"""The longest a claimed probe keeps others off a circuit if its instance
dies before reporting how the probe went."""

FAIL = """
-- KEYS: circuit, index; ARGV: field, now, threshold, cooldown, half_open
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local now = tonumber(ARGV[2])
local expired = open_until > 0 and open_until <= now
if failures >= tonumber(ARGV[3]) or ARGV[5] == '1' or expired then
  open_until = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'open_until', open_until)
  redis.call('HSET', KEYS[2], ARGV[1], open_until)
  redis.call('DEL', KEYS[1] .. ':probe')
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) * 1000) * 10)
return tostring(open_until)
"""

SUCCEED = """
-- KEYS: circuit, index; ARGV: field
redis.call('DEL', KEYS[1], KEYS[1] .. ':probe')
redis.call('HDEL', KEYS[2], ARGV[1])
return 0
"""


SYNC = """
-- KEYS: index
return redis.call('HGETALL', KEYS[1])
"""

CLAIM = """
-- KEYS: probe; ARGV: milliseconds
return redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
"""


def circuit_field(key: CircuitKey) -> str:
    return "|".join(key)


class SharedCircuits(RedisLink):
    """
    Keeps a L{CircuitBoard} in step with every other instance's, through
    the rate limiter's Redis.
    """

    warning_format = (
        "circuit breakers: Redis {operation} failed ({error}); each instance keeps its own"
        " ({suppressed} more failures since the last warning)"
    )

    def __init__(self, config: RateLimitConfig, board: CircuitBoard, reactor: IReactorTime) -> None:
        super().__init__(config, reactor, reactor, poolsize=1)
        self._board = board
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._board.share(self)
        self._loop = LoopingCall(self.sync)
        self._loop.clock = self._reactor
        self._loop.start(SYNC_INTERVAL, now=False).addErrback(
            lambda f: log.failure("circuit sync stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        self._board.share(None)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    # -- what the board tells the fleet ----------------------------------------

    def failed(self, key: CircuitKey, threshold: int, cooldown: float, half_open: bool) -> None:
        now = self._reactor.seconds()
        field = circuit_field(key)
        args = [field, repr(now), str(threshold), repr(cooldown), "1" if half_open else "0"]
        self.call(FAIL, [PREFIX + field, INDEX], args).addCallbacks(
            lambda until: self._board.adopt(key, float(until)),
            self._failed,
            errbackArgs=("failure",),
        )

    def succeeded(self, key: CircuitKey) -> None:
        field = circuit_field(key)
        self.call(SUCCEED, [PREFIX + field, INDEX], [field]).addErrback(self._failed, "success")

    def claim_probe(self, key: CircuitKey, cooldown: float) -> Deferred[bool]:
        """
        Claim the fleet's one half-open probe of a circuit; C{True} if this
        instance may send it (also when Redis cannot be asked: then each
        instance probes on its own).
        """
        name = PREFIX + circuit_field(key) + ":probe"
        # The claim ends when the probe does (success or failure clear it);
        # its expiry only frees a circuit whose prober died.
        hold = max(cooldown, PROBE_HOLD_SECONDS)
        asked = self.call(CLAIM, [name], [str(int(hold * 1000))])

        def failed(failure: Failure) -> bool:
            self._failed(failure, "probe claim")
            return True

        return asked.addCallbacks(lambda reply: bool(reply), failed)

    # -- what the fleet tells the board -----------------------------------------

    def sync(self) -> Deferred[None]:
        """
        Adopt the circuits any instance has opened.
        """

        def adopt(flat: list[Any]) -> None:
            opened = {}
            for field, until in zip(flat[::2], flat[1::2], strict=True):
                text = field.decode() if isinstance(field, bytes) else str(field)
                parts = text.split("|")
                if len(parts) == 3:
                    opened[(parts[0], parts[1], parts[2])] = float(until)
            self._board.adopt_all(opened)

        return self.call(SYNC, [INDEX], []).addCallbacks(adopt, self._failed, errbackArgs=("sync",))

    def _failed(self, failure: Failure, operation: str) -> None:
        self.backend_error(operation, failure, count=False)
