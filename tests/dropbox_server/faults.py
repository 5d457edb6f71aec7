"""Fault injection for the Dropbox test server (test infrastructure only).

One job: decide, deterministically from a seed, what goes wrong with each request — rate limits,
5xx, dropped connections, latency, bandwidth caps, "fail the Nth call of route X", commit
contention — and provide the per-connection throttle. The HTTP layer asks `FaultInjector.decide`
once per request and obeys the returned `Decision`.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

# Actions a Decision can carry (besides "none").
RATE_LIMIT = "429"              # 429 too_many_requests
WRITE_LIMIT = "429_write"       # 429 too_many_write_operations
ERROR_500 = "500"
ERROR_503 = "503"
DROP_MID_BODY = "drop_mid_body"                # request never applied
DROP_BEFORE_RESPONSE = "drop_before_response"  # request applied, answer lost
STATUS = "status"               # a FailRule with an explicit HTTP status / error

APPEND_BATCH = "files/upload_session/append_batch"

# Routes that change the namespace: Dropbox serialises these per namespace (the "namespace lock").
COMMIT_ROUTES = frozenset({
    "files/upload",
    "files/upload_session/finish",
    "files/upload_session/finish_batch",
    "files/upload_session/finish_batch_v2",
    "files/create_folder_v2",
    "files/delete_v2",
})

# Routes that move file data; the data-transport-limit switch (403) applies to these.
UPLOAD_ROUTES = frozenset({
    "files/upload",
    "files/upload_session/start",
    "files/upload_session/append",
    "files/upload_session/append_v2",
    "files/upload_session/finish",
    "files/upload_session/start_batch",
    "files/upload_session/finish_batch",
    "files/upload_session/finish_batch_v2",
})


@dataclass(frozen=True)
class FailRule:
    """Fail calls number `n` .. `n + times - 1` (1-based, counted from when the rule was
    installed) of `route` (URL form without "/2/", e.g. "files/upload_session/append_v2", or
    "oauth2/token").

    `status` is an HTTP status (400, 401, 403, 409, 422, 429, 500, 503, ...) or one of
    "drop_mid_body" / "drop_before_response". `error` is the raw Stone-JSON error for 401/403/409
    (e.g. {".tag": "path", "path": {".tag": "not_found"}}) or the rate-limit reason tag for 429
    ("too_many_requests" / "too_many_write_operations"); `retry_after` overrides the config's.

    `at_commit`: the request is applied up to its commit and only the commit is refused (with
    `status` / `error`); meant for `files/upload_session/finish`. A refused finish
    then keeps its closing bytes in the session, closed, as Dropbox documents for a failed
    commit (see routes._finish_one); without it the request is refused before anything applies.
    """

    route: str
    n: int = 1
    status: Union[int, str] = 500
    error: Any = None
    retry_after: Optional[int] = None
    times: int = 1
    at_commit: bool = False


@dataclass(frozen=True)
class FaultConfig:
    """What to break. Probabilities are per request and mutually exclusive (at most one random
    fault per request), drawn from `random.Random(seed)` in request-arrival order.

    Random faults apply to API routes (`/2/...`) only, or to `routes` when given; the token
    endpoint is only broken by an explicit FailRule.
    """

    seed: int = 0
    p_rate_limit: float = 0.0          # 429 too_many_requests
    p_write_limit: float = 0.0         # 429 too_many_write_operations
    retry_after_s: int = 1             # Retry-After for every 429 (0 allowed)
    p_500: float = 0.0
    p_503: float = 0.0
    p_drop_mid_body: float = 0.0       # connection closed while the request body arrives
    p_drop_before_response: float = 0.0  # request fully applied, connection closed, no answer
    latency_s: float = 0.0             # added before each request is handled
    bandwidth_bps: Optional[int] = None  # per-connection cap, both directions (bytes/s)
    # One uplink shared by every connection: request bodies (client -> server) of all
    # connections together cross at most this many bytes/s, on top of each one's own cap
    # (SharedUplink). Responses are not counted: a lab's uplink, not its downlink.
    uplink_bps: Optional[int] = None
    fail_nth: tuple = ()               # FailRule instances
    routes: Optional[frozenset] = None  # restrict random faults to these routes
    max_concurrent_commits_per_namespace: Optional[int] = None  # excess → 429 write ops
    commit_hold_s: float = 0.0         # how long each commit holds its namespace slot
    insufficient_space: bool = False   # every commit fails with insufficient_space
    transport_limit: bool = False      # upload routes answer 403 invalid_account_type/feature
    # Silent data corruption: a commit to one of these paths (lower case, full path from the
    # top of the tree) stores the bytes with one byte flipped, and its metadata carries the
    # content hash of what was stored — so only a client that compares hashes notices.
    corrupt_stored_paths: frozenset = frozenset()
    # Every files/upload_session/append_batch is refused with this HTTP status (400, 413, 431, ...;
    # plain text) before anything is applied, as a server that does not take it would answer.
    refuse_append_batch: Optional[int] = None

    def __post_init__(self):
        # Accept any iterable of FailRule (or of dicts with FailRule's fields, e.g. from JSON).
        rules = tuple(r if isinstance(r, FailRule) else FailRule(**r) for r in self.fail_nth)
        object.__setattr__(self, "fail_nth", rules)
        if self.routes is not None:
            object.__setattr__(self, "routes", frozenset(self.routes))
        object.__setattr__(self, "corrupt_stored_paths",
                           frozenset(p.lower() for p in self.corrupt_stored_paths))


@dataclass
class Decision:
    action: Optional[str] = None
    status: Optional[int] = None
    error: Any = None
    retry_after: int = 1
    drop_fraction: float = 0.5     # where in the body a mid-body drop happens
    latency_s: float = 0.0
    transport_limit: bool = False
    label: str = ""                # what the request log records
    at_commit: bool = False        # the route runs; only its commit answers with this fault

    @property
    def before_body(self) -> bool:
        """Faults answered without applying the request (the body is drained first)."""
        return self.action in (RATE_LIMIT, WRITE_LIMIT, ERROR_500, ERROR_503, STATUS) and not self.at_commit


class FaultInjector:
    """Holds the active FaultConfig, its RNG, FailRule counters and commit slots."""

    def __init__(self, config: Optional[FaultConfig] = None):
        self._lock = threading.Lock()
        self._active_commits: dict[str, int] = {}
        self.set(config or FaultConfig())

    @property
    def config(self) -> FaultConfig:
        return self._config

    def set(self, config: FaultConfig) -> None:
        if not isinstance(config, FaultConfig):
            raise TypeError("expected FaultConfig, got %r" % (config,))
        with self._lock:
            self._config = config
            self._rng = random.Random(config.seed)
            self._route_calls: dict[str, int] = {}

    def decide(self, route: str, api_route: bool) -> Decision:
        with self._lock:
            cfg = self._config
            count = self._route_calls.get(route, 0) + 1
            self._route_calls[route] = count
            # Always draw both numbers so the sequence depends only on request order.
            u, frac = self._rng.random(), self._rng.random()
            d = Decision(retry_after=cfg.retry_after_s, latency_s=cfg.latency_s,
                         drop_fraction=0.05 + 0.9 * frac)
            d.transport_limit = cfg.transport_limit and route in UPLOAD_ROUTES
            if cfg.refuse_append_batch is not None and route == APPEND_BATCH:
                d.action, d.status = STATUS, int(cfg.refuse_append_batch)
                d.error = "append_batch is refused by this server (a test switch)"
                d.label = "refuse_append_batch"
                return d
            for rule in cfg.fail_nth:
                if _route_key(rule.route) == route and rule.n <= count < rule.n + rule.times:
                    _apply_rule(d, rule, cfg)
                    d.label = "fail_nth:%s#%d" % (route, count)
                    return d
            # Random faults: every API route by default, or exactly the listed routes.
            if (route not in cfg.routes) if cfg.routes is not None else not api_route:
                return d
            edge = 0.0
            for action, p in ((RATE_LIMIT, cfg.p_rate_limit), (WRITE_LIMIT, cfg.p_write_limit),
                              (ERROR_500, cfg.p_500), (ERROR_503, cfg.p_503),
                              (DROP_MID_BODY, cfg.p_drop_mid_body),
                              (DROP_BEFORE_RESPONSE, cfg.p_drop_before_response)):
                edge += p
                if u < edge:
                    d.action = action
                    d.label = action
                    break
            return d

    # -- namespace commit slots ------------------------------------------------------------

    def acquire_commit(self, namespace: str) -> bool:
        """Take a commit slot for `namespace`; False when the configured limit is reached."""
        with self._lock:
            limit = self._config.max_concurrent_commits_per_namespace
            active = self._active_commits.get(namespace, 0)
            if limit is not None and active >= limit:
                return False
            self._active_commits[namespace] = active + 1
            return True

    def release_commit(self, namespace: str) -> None:
        with self._lock:
            self._active_commits[namespace] = max(0, self._active_commits.get(namespace, 1) - 1)


def _route_key(route: str) -> str:
    route = route.strip("/")
    return route[2:] if route.startswith("2/") else route


def _apply_rule(d: Decision, rule: FailRule, cfg: FaultConfig) -> None:
    if rule.retry_after is not None:
        d.retry_after = rule.retry_after
    d.at_commit = rule.at_commit and rule.status not in (DROP_MID_BODY, DROP_BEFORE_RESPONSE)
    if rule.status in (DROP_MID_BODY, DROP_BEFORE_RESPONSE):
        d.action = rule.status
        return
    status = int(rule.status)
    if status == 429:
        write = rule.error in ("too_many_write_operations", {".tag": "too_many_write_operations"})
        d.action = WRITE_LIMIT if write else RATE_LIMIT
        return
    d.action = STATUS
    d.status = status
    d.error = rule.error


class Hold:
    """A barrier: the first `count` requests to any of `routes` wait on arrival (before their
    body is read) until `release()`; later ones pass. Lets a test keep a client mid-transfer
    for as long as it needs, instead of racing a slow bandwidth cap."""

    def __init__(self, routes, count: int = 1):
        self.routes = frozenset(_route_key(r) for r in routes)
        self._left = count
        self._held = 0
        self._released = False
        self._cond = threading.Condition()

    def enter(self, route: str) -> bool:
        """Called for every request: blocks a matching one until release(). True if it waited."""
        with self._cond:
            if self._released or self._left <= 0 or route not in self.routes:
                return False
            self._left -= 1
            self._held += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._released)
            return True

    def wait_held(self, n: int = 1, timeout: float = 120.0) -> bool:
        """Wait until `n` requests are being (or have been) held; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._held >= n, timeout=timeout)

    @property
    def held(self) -> int:
        return self._held

    def release(self) -> None:
        with self._cond:
            self._released = True
            self._cond.notify_all()


class SharedUplink:
    """The uplink every connection shares (FaultConfig.uplink_bps): one token bucket for the
    request bodies of all connections, on top of each connection's own cap (Throttle).

    The bucket is a timeline: each slice of a body, as it is read, reserves `nbytes / rate`
    seconds of the link after those reserved before it, and its reader sleeps until the
    reservation ends before the slice is handed on (hashed, stored). Slices are served in the
    order they arrive, so the connections sending at once share the rate about equally, and
    the bytes handed on from time t0 to t never exceed `rate * (t - t0) + rate * BURST_S`
    however the threads are scheduled: the ceiling that benchmarks compare with. A model of a
    link, not of TCP: no slow start, no loss; the kernel's socket buffers still take in a few
    MiB per connection ahead of the model.

    Accounting (for tests and benchmarks): `bytes` through the uplink since the server started,
    and `reserved_seconds`, the link time those bytes took at the rate in force when each
    slice arrived (bytes / rate while the rate did not change)."""

    BURST_S = 0.05  # an idle link lets this much time's worth of bytes through at once

    def __init__(self, rate_source):
        self._rate_source = rate_source
        self._lock = threading.Lock()
        self._next = 0.0  # time.monotonic() at which the reserved slices have all crossed
        self.bytes = 0
        self.reserved_seconds = 0.0

    def chunk_size(self, default: int) -> int:
        rate = self._rate_source()
        if not rate:
            return default
        # Slices of at most 1/100 s of the whole link: fine enough for many connections to
        # interleave, coarse enough that Python's per-slice cost stays small.
        return max(16 * 1024, min(default, int(rate) // 100))

    def spend(self, nbytes: int) -> None:
        rate = self._rate_source()
        with self._lock:
            self.bytes += nbytes
            if not rate:
                return
            now = time.monotonic()
            start = max(self._next, now - self.BURST_S)
            self._next = start + nbytes / rate
            self.reserved_seconds += nbytes / rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)


class UplinkThrottle:
    """What a connection's request body is read through: its own cap (Throttle) and then the
    shared uplink's. After a wait for the uplink the connection's own bucket has refilled, so
    the two waits do not add up: a body crosses at the lower of the two rates."""

    def __init__(self, connection: "Throttle", uplink: SharedUplink):
        self._connection, self._uplink = connection, uplink

    def chunk_size(self, default: int) -> int:
        return self._connection.chunk_size(self._uplink.chunk_size(default))

    def spend(self, nbytes: int) -> None:
        self._connection.spend(nbytes)
        self._uplink.spend(nbytes)


class Throttle:
    """Per-connection token bucket. The rate is read from a callable on every use so a
    runtime change of `bandwidth_bps` takes effect on connections already open."""

    def __init__(self, rate_source):
        self._rate_source = rate_source
        self._allowance = 0.0
        self._last = time.monotonic()

    def chunk_size(self, default: int) -> int:
        rate = self._rate_source()
        if not rate:
            return default
        # Small slices keep the achieved rate smooth (about 20 slices per second).
        return max(1024, min(default, int(rate) // 20))

    def spend(self, nbytes: int) -> None:
        rate = self._rate_source()
        now = time.monotonic()
        if not rate:
            self._last = now
            self._allowance = 0.0
            return
        # Burst of at most 1/20 s worth of bytes, so a cap is felt from the first slice.
        burst = rate / 20.0
        self._allowance = min(burst, self._allowance + (now - self._last) * rate)
        self._last = now
        self._allowance -= nbytes
        if self._allowance < 0:
            wait = -self._allowance / rate
            time.sleep(wait)
            self._last = time.monotonic()
            self._allowance = 0.0

