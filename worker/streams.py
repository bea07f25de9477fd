"""Redis Streams plumbing: a consumer-group reader with crash recovery, an idempotent verdict publisher,
dead letters, and a small synchronous worker loop.

Delivery is at-least-once end to end:

* images are read with ``XREADGROUP`` into the group's pending list (PEL) and stay there until acked;
* entries left pending by a consumer that died are reclaimed with ``XAUTOCLAIM`` once idle for
  ``claim_idle_ms``; an entry delivered more than ``max_deliveries`` times is moved to the dead-letter stream;
* verdicts are written, alerts published and the image acked in ONE atomic Lua script per batch, which first
  checks that the entry is still pending in the group (``XPENDING``): an entry gets its outcome and leaves the
  pending list in the same script, so one that is no longer pending already has its outcome, and a redelivered
  copy is only acked, never published twice (and a verdict is never lost between write and ack). The pending
  list is the idempotency record: it costs no memory per answered image, however long the stream runs.
* the image stream is never capped with MAXLEN (that drops unread entries); :meth:`StreamConsumer.trim_acked`
  removes only entries every group has acked (``XTRIM MINID``), so the stream's length is its backlog.

Sharding: ``shards`` image streams, each with its consumer group, its verdict and dead-letter streams and its
sources' alert state, all under one hash tag (``explainer:images:{2-12}``, ``explainer:verdicts:{2-12}``, ...:
:func:`worker.wire.shard_tag`), so each shard's scripts touch one Redis Cluster slot; a producer picks a shard by
``source`` (:func:`worker.wire.shard_of`), so a source's images stay in order on one shard and its alert state
lives there. On Redis Cluster (``redis+cluster://`` URLs) even one shard is tagged. The worker notes the shard
count it serves at ``<images>:shards`` (:func:`note_shards`), where producers and readers find it
(:func:`served_shards`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgpack
import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, SlotNotCoveredError
from redis.retry import Retry

from pipeline import Fingerprint, ProbeHistory
from worker import wire
from worker.refs import RefFetcher, RefRejected, RefUnavailable

log = logging.getLogger("explainer.streams")

# what a command fails with while Redis (or a cluster's master for the slot) is out of reach: retried, never lost
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError, OSError,
                     ClusterDownError, SlotNotCoveredError)


def is_out_of_memory(exc: BaseException) -> bool:
    """Redis refused a write because it reached ``maxmemory`` under ``noeviction`` (the stream's policy); inside
    a script Redis refuses its first write, before any effect, so a refused publish wrote nothing."""
    return isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc)


@dataclass
class StreamNames:
    """Keys and channels; every stream entry has one field, ``data`` (msgpack, see :mod:`worker.wire`)."""

    images: str = "explainer:images"
    group: str = "explainer"
    verdicts: str = "explainer:verdicts"
    dead: str = "explainer:dead"
    alerts: str = "explainer:alerts"  # pub/sub channel for adversarial verdicts
    all_verdicts_channel: str | None = None  # pub/sub channel for every verdict, when set
    episodes: str = "explainer:episodes"  # alert episodes of the window policy, kept as a stream too
    window_prefix: str = "explainer:window:"  # the window policy's state: <window_prefix><source>, a hash
    probe_prefix: str = "explainer:probe:"  # the query monitor's state: <probe_prefix><source>, a hash

    def shard(self, index: int, count: int) -> StreamNames:
        """The names of shard ``index`` of ``count``: every key carries the shard's hash tag
        (:func:`worker.wire.shard_tag`), so that one shard's keys share a Redis Cluster slot (its Lua scripts touch
        several) and the shards spread over the masters; the group and the channels stay as they are."""
        keys = (self.images, self.verdicts, self.dead, self.episodes, self.window_prefix, self.probe_prefix)
        if any("{" in key or "}" in key for key in keys):
            raise ValueError("sharded stream names must not hold '{' or '}': the shard's hash tag is added to them "
                             f"(a tag of their own would put every shard in one slot): {keys}")
        tag = f"{{{wire.shard_tag(index, count)}}}"
        return replace(self, images=f"{self.images}:{tag}", verdicts=f"{self.verdicts}:{tag}",
                       dead=f"{self.dead}:{tag}", episodes=f"{self.episodes}:{tag}",
                       window_prefix=f"{self.window_prefix.rstrip(':')}:{tag}:",
                       probe_prefix=f"{self.probe_prefix.rstrip(':')}:{tag}:")

    def shards(self, count: int, cluster: bool = False) -> list[StreamNames]:
        """The names of each of ``count`` shards: these names unchanged for one shard on one Redis, else
        :meth:`shard` of each index (on a cluster even one shard is tagged: its scripts need one slot)."""
        if count < 1:
            raise ValueError(f"shards must be at least 1, got {count}")
        return [self] if count == 1 and not cluster else [self.shard(i, count) for i in range(count)]

    @property
    def shard_count_key(self) -> str:
        """Where the worker notes the shard count it serves (a string key), so that producers and readers that
        were not told it read it: ``<images>:shards``."""
        return f"{self.images}:shards"

    @classmethod
    def with_prefix(cls, prefix: str, **kw: Any) -> StreamNames:
        """All names under one prefix, e.g. ``with_prefix("cams")``: ``cams:images``, ``cams:verdicts``, ..."""
        return cls(
            images=f"{prefix}:images",
            group=kw.pop("group", "explainer"),
            verdicts=f"{prefix}:verdicts",
            dead=f"{prefix}:dead",
            alerts=f"{prefix}:alerts",
            episodes=f"{prefix}:episodes",
            window_prefix=f"{prefix}:window:",
            probe_prefix=f"{prefix}:probe:",
            **kw,
        )


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # URL scheme -> the node's scheme


def is_cluster(client: Any) -> bool:
    """Whether ``client`` talks to a Redis Cluster (redis-py's ``RedisCluster``)."""
    return isinstance(client, RedisCluster)


def connect(
    url: str = "redis://127.0.0.1:6379/0",
    *,
    retries: int = 8,
    backoff_base: float = 0.05,
    backoff_cap: float = 5.0,
    health_check_interval: int = 15,
    socket_timeout: float = 30.0,
    socket_connect_timeout: float = 5.0,
    **kwargs: Any,
) -> redis.Redis:
    """A client for ``redis://[:password@]host:port/db`` or ``rediss://`` (TLS; pass ``ssl_ca_certs=...``,
    ``ssl_certfile``/``ssl_keyfile`` for mutual TLS), or redis-py's cluster client for
    ``redis+cluster://[:password@]host:port`` (any node of a Redis Cluster; ``rediss+cluster://`` for TLS).
    Commands are retried on connection errors and timeouts with exponential backoff (``retries`` times,
    ``backoff_base`` doubling up to ``backoff_cap`` seconds); idle connections are health-checked every
    ``health_check_interval`` seconds. Responses stay bytes."""
    parts = urlsplit(url)
    if parts.scheme in CLUSTER_SCHEMES:
        return _connect_cluster(urlunsplit(parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme])), retries=retries,
                                backoff_base=backoff_base, backoff_cap=backoff_cap,
                                health_check_interval=health_check_interval, socket_timeout=socket_timeout,
                                socket_connect_timeout=socket_connect_timeout, **kwargs)
    retry = Retry(
        ExponentialBackoff(cap=backoff_cap, base=backoff_base),
        retries,
        supported_errors=(redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError),
    )
    kwargs.setdefault("client_name", "explainer")
    return redis.Redis.from_url(
        url,
        retry=retry,
        health_check_interval=health_check_interval,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        socket_keepalive=True,
        decode_responses=False,
        **kwargs,
    )


def _connect_cluster(url: str, *, retries: int, backoff_base: float, backoff_cap: float, **kwargs: Any
                     ) -> RedisCluster:
    """redis-py's cluster client from any node's URL: it maps slots to masters, follows MOVED/ASK, and retries a
    command (re-reading the slot map) on connection errors, timeouts and a cluster that is down while a failed
    master is restarted or replaced, ``retries`` times with the same backoff as :func:`connect`."""
    retry = Retry(ExponentialBackoff(cap=backoff_cap, base=backoff_base), retries)
    kwargs.setdefault("client_name", "explainer")
    return RedisCluster.from_url(url, retry=retry, socket_keepalive=True, decode_responses=False, **kwargs)


def socket_timeout_of(client: Any) -> float | None:
    """The read timeout of ``client``'s connections (a plain or a cluster client), None when unset."""
    kwargs = client.nodes_manager.connection_kwargs if is_cluster(client) else \
        client.connection_pool.connection_kwargs
    return kwargs.get("socket_timeout")


PASSWORD_ENV = "EXPLAINER_REDIS_PASSWORD"


def redis_password(password_file: str | Path | None = None) -> str | None:
    """The Redis password: ``password_file``'s content (trailing newline dropped) when given, else the
    ``EXPLAINER_REDIS_PASSWORD`` environment variable, else None. Either keeps it off command lines (``ps``)
    and out of URLs, and takes any characters (a URL needs ``/``, ``#``, ``@``, ``%`` percent-encoded)."""
    if password_file:
        return Path(password_file).read_text().rstrip("\r\n")
    return os.environ.get(PASSWORD_ENV) or None


def connect_with_password(url: str, password_file: str | Path | None = None, **kwargs: Any) -> redis.Redis:
    """:func:`connect` with the password of :func:`redis_password`, when there is one (it overrides a URL's)."""
    if password := redis_password(password_file):
        kwargs["password"] = password
    return connect(url, **kwargs)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (user part and ``?password=``), for logs and consoles."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{user}:***@{host}"
    query = "&".join("password=***" if kv.split("=", 1)[0] == "password" else kv
                     for kv in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _id_tuple(x: bytes | str) -> tuple[int, int]:
    """A stream id as (milliseconds, sequence), for ordering ("5-0" < "10-0", unlike the strings)."""
    ms, _, seq = _s(x).partition("-")
    return int(ms), int(seq or 0)


# KEYS: verdicts, images, episodes, window_1..window_n (each result's source's window hash), probe_1..probe_n
# (its query-monitor hash). ARGV: group, maxlen, alerts, all_channel, alert_k, alert_n,
# alert_idle_s, now, probe_k, probe_n, probe_history, then per result (stream id, verdict bytes, "1" adversarial /
# "0" clean / "e" no decision, source or "", request id, "1" probe / "0" not / "" unmonitored, fingerprint bytes).
# Returns 1 per written verdict, 0 per duplicate (an entry no longer pending in the group: it has its outcome),
# then the number of episodes it opened. A source's windows change only with a verdict written, so a redelivered
# entry never counts twice.
_PUBLISH_LUA = """
local verdicts, images, episodes = KEYS[1], KEYS[2], KEYS[3]
local group, maxlen, alerts, allch = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local k, n, idle, at = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local pk, pn, ph = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local count = (#KEYS - 3) / 2
local out = {}
local opened = 0

-- one k-of-n window of a source (hash ``key``, field ``field``, newest first): push this entry's bit; open an
-- episode (one alert of ``kind`` with the marked entries) at k marked, close it at none
local function window(key, field, openfield, kind, wk, wn, bit, source, rid, sid)
  local packed = redis.call('HGET', key, field)
  local w = packed and cmsgpack.unpack(packed) or {}
  table.insert(w, 1, {bit, rid, sid})
  while #w > wn do table.remove(w) end
  local marked = {}
  for _, e in ipairs(w) do
    if e[1] == 1 then table.insert(marked, {id = e[2], stream_id = e[3]}) end
  end
  local open = redis.call('HGET', key, openfield)
  if #marked >= wk and not open then
    redis.call('HSET', key, openfield, at)
    local alert = cmsgpack.pack({v = 1, kind = kind, source = source, k = wk, n = wn, at = tonumber(at),
                                 entries = marked})
    redis.call('XADD', episodes, 'MAXLEN', '~', maxlen, '*', 'data', alert)
    if alerts ~= '' then redis.call('PUBLISH', alerts, alert) end
    opened = opened + 1
  elseif #marked == 0 and open then
    redis.call('HDEL', key, openfield)
  end
  redis.call('HSET', key, field, cmsgpack.pack(w))
  redis.call('EXPIRE', key, idle)
end

for i = 1, count do
  local a = 11 + 7 * (i - 1)
  local sid, data, adv, source, rid = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local probe, fingerprint = ARGV[a + 6], ARGV[a + 7]
  if #redis.call('XPENDING', images, group, sid, sid, 1) > 0 then
    redis.call('XADD', verdicts, 'MAXLEN', '~', maxlen, '*', 'data', data)
    if k == 0 then
      if adv == '1' and alerts ~= '' then redis.call('PUBLISH', alerts, data) end
    elseif source ~= '' and adv ~= 'e' then
      window(KEYS[3 + i], 'w', 'open', 'episode', k, n, adv == '1' and 1 or 0, source, rid, sid)
    end
    if pk > 0 and source ~= '' and probe ~= '' then
      -- the query monitor: this source's last ``ph`` fingerprints (newest first), and its window of probes
      local key = KEYS[3 + count + i]
      local packed = redis.call('HGET', key, 'f')
      local prints = packed and cmsgpack.unpack(packed) or {}
      table.insert(prints, 1, fingerprint)
      while #prints > ph do table.remove(prints) end
      redis.call('HSET', key, 'f', cmsgpack.pack(prints))
      window(key, 'w', 'open', 'probing', pk, pn, probe == '1' and 1 or 0, source, rid, sid)
    end
    if allch ~= '' then redis.call('PUBLISH', allch, data) end
    out[i] = 1
  else
    out[i] = 0
  end
  redis.call('XACK', images, group, sid)
end
out[count + 1] = opened
return out
"""


# KEYS: dead, images. ARGV: group, maxlen, stream id, dead-letter bytes. Written only while the entry is pending,
# as a verdict is, so one entry never gets both: returns the dead letter's id, or false when the entry already had
# its verdict (or dead letter) and was only acked.
_DEAD_LETTER_LUA = """
local dead, images = KEYS[1], KEYS[2]
local group, maxlen, sid, data = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local id = false
if #redis.call('XPENDING', images, group, sid, sid, 1) > 0 then
  id = redis.call('XADD', dead, 'MAXLEN', '~', maxlen, '*', 'data', data)
end
redis.call('XACK', images, group, sid)
return id
"""

WAITING_SCAN_CAP = 256  # entries a backlog probe reads before Redis 7 reports the group's lag itself
MAX_QUEUE_AGE_S = 7 * 24 * 3600  # an enqueued_at further back is a wrong clock, not a week in the queue


class StreamEvents:
    """What a consumer reports as it works, for metrics (the Serve Ingress exports them to Prometheus); this base
    ignores it all. Consumer threads call it concurrently: an implementation must be thread-safe."""

    def published(self, verdicts: Sequence[dict], written: Sequence[bool]) -> None:
        """A batch's verdicts landed; ``written[i]`` is False for a redelivered entry that already had one."""

    def dead_lettered(self, kind: str) -> None:
        """An entry went to the dead-letter stream; ``kind``: no_data, undecodable, unknown_model, ref or
        max_deliveries."""

    def publish_failed(self, error: str) -> None:
        """Writing a batch's verdicts failed (``error``: the exception's type); they are retried."""

    def fetch_failed(self, count: int) -> None:
        """``count`` images sent by reference could not be fetched now (their store timed out, refused or was
        cooling down); they stay pending and are retried."""


def report(event: Callable[..., None], *args: Any) -> None:
    """Tell a :class:`StreamEvents` hook; a failing metric is logged and never fails the work it reports."""
    try:
        event(*args)
    except Exception:  # noqa: BLE001
        log.exception("a stream events hook failed")


MAX_SHARDS = 256  # image streams: each costs every Ingress replica `consumers` threads and connections
MAX_WINDOW = 256  # images an alert window may span: a source's state is at most this many short entries
MAX_PROBE_HISTORY = 64  # fingerprints the query monitor keeps per source (about 2 KB each)


def _knob(default: int, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class StreamSettings:
    """How a consumer reads the image stream and writes what it decides: one name and one default per knob,
    validated here once. :class:`StreamConsumer`, the Serve Ingress (``AppArgs``, serve.yaml), the standalone
    worker and the bench all build theirs from it."""

    shards: int = _knob(1, "image streams, each with its consumer group and its verdict and dead-letter streams; "
                           "producers pick one by source (worker.wire.shard_of), consumers read every one")
    batch: int = _knob(64, "entries read per XREADGROUP (its COUNT): the images of one stage request")
    block_ms: int = _knob(200, "how long one read waits for new entries, in ms")
    claim_idle_ms: int = _knob(30_000, "reclaim (XAUTOCLAIM) entries idle this long, in ms: their consumer died")
    max_deliveries: int = _knob(5, "then an entry goes to the dead-letter stream")
    verdict_maxlen: int = _knob(100_000, "cap of the verdict stream (MAXLEN ~)")
    dead_maxlen: int = _knob(100_000, "cap of the dead-letter stream (MAXLEN ~)")
    alert_k: int = _knob(0, "the window policy: alert when alert_k of the last alert_n images of one source are "
                            "flagged (0: an alert per flagged image)")
    alert_n: int = _knob(0, "the window policy's window, in images of one source (at most 256)")
    alert_idle_s: int = _knob(3600, "a source's window is forgotten after this many seconds without an image")
    probe_k: int = _knob(3, "the query monitor: a 'probing' alert when probe_k of the last probe_n images of one "
                            "source are small edits of its recent images (pipeline.queries; 0: no monitor)")
    probe_n: int = _knob(100, "the query monitor's window, in images of one source (at most 256)")
    probe_history: int = _knob(32, "the recent images of a source the query monitor compares with (at most 64): "
                                   "about 2.5 KB each for a photo, 0.4 KB for a digit")

    def __post_init__(self) -> None:
        least = {"shards": 1, "batch": 1, "max_deliveries": 1, "verdict_maxlen": 1, "dead_maxlen": 1,
                 "block_ms": 0, "claim_idle_ms": 0, "alert_k": 0, "alert_n": 0, "alert_idle_s": 1, "probe_k": 0,
                 "probe_n": 0, "probe_history": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"stream setting {name} must be an integer ≥ {low}, got {value!r}")
        if self.shards > MAX_SHARDS:
            raise ValueError(f"stream setting shards must be at most {MAX_SHARDS}, got {self.shards}")
        if (self.alert_k == 0) != (self.alert_n == 0) or self.alert_k > self.alert_n or self.alert_n > MAX_WINDOW:
            raise ValueError(f"stream settings alert_k and alert_n: both 0 (an alert per flagged image), or "
                             f"1 ≤ alert_k ≤ alert_n ≤ {MAX_WINDOW}; got {self.alert_k} and {self.alert_n}")
        if self.probe_k > self.probe_n or self.probe_n > MAX_WINDOW or self.probe_history > MAX_PROBE_HISTORY:
            raise ValueError(f"stream settings probe_k, probe_n and probe_history: 0 ≤ probe_k ≤ probe_n ≤ "
                             f"{MAX_WINDOW} and probe_history ≤ {MAX_PROBE_HISTORY}; got {self.probe_k}, "
                             f"{self.probe_n} and {self.probe_history}")

    @property
    def windowed(self) -> bool:
        """Whether alerts follow the window policy (k of the last n images of one source)."""
        return self.alert_k > 0

    @property
    def monitored(self) -> bool:
        """Whether the query monitor runs (pipeline.queries: probing alerts per source)."""
        return self.probe_k > 0

    @classmethod
    def knobs(cls) -> dict[str, tuple[int, str]]:
        """Each knob's (default, help), by name: what entry points turn into their options."""
        return {f.name: (f.default, f.metadata["help"]) for f in dataclass_fields(cls)}

    def given(self) -> dict[str, int]:
        """The knobs set to other than their default (what a config needs to say)."""
        return {name: getattr(self, name) for name, (default, _) in self.knobs().items()
                if getattr(self, name) != default}


class StreamConsumer:
    """One consumer of the image stream's consumer group, plus the verdict/dead-letter writers."""

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames | None = None,
        consumer: str = "worker-1",
        settings: StreamSettings | None = None,
        events: StreamEvents | None = None,
        read_lock: threading.Lock | None = None,
        **knobs: int,
    ) -> None:
        """``settings`` (default :class:`StreamSettings`), with any of its knobs given by name replacing it.
        ``read_lock``: one lock shared by the consumers of one process, so that one of them at a time waits on
        the stream (:meth:`read`)."""
        self.settings = replace(settings or StreamSettings(), **knobs)
        block_ms = self.settings.block_ms
        sock_timeout = socket_timeout_of(client)
        if sock_timeout is not None and block_ms / 1000 >= sock_timeout:
            raise ValueError(
                f"block_ms={block_ms} must be shorter than the client's socket_timeout={sock_timeout}s"
            )
        self.client = client
        self.names = names or StreamNames()
        self.consumer = consumer
        self.events = events or StreamEvents()
        self.read_lock = read_lock
        self._claim_cursor = "0-0"
        self._publish_script = client.register_script(_PUBLISH_LUA)
        self._dead_letter_script = client.register_script(_DEAD_LETTER_LUA)
        self.stats = {
            "read": 0, "reclaimed": 0, "published": 0, "duplicates": 0, "dead": 0, "trimmed": 0, "connection_errors": 0,
            "episodes": 0,
        }

    # -- setup ----------------------------------------------------------------------------------------------

    def ensure_group(self, start_id: str = "0") -> bool:
        """Create the group (and the stream) if missing; True when created. ``start_id`` "0" also serves
        entries added before the group existed; "$" only new ones."""
        try:
            self.client.xgroup_create(self.names.images, self.names.group, id=start_id, mkstream=True)
            return True
        except redis.ResponseError as e:
            if "BUSYGROUP" in str(e):
                return False
            raise

    # -- reading --------------------------------------------------------------------------------------------

    def reclaim(self) -> list[tuple[str, bytes | None]]:
        """Take over one entry idle in the PEL for ``claim_idle_ms`` (its consumer died or hung), or none.

        One at a time: a consumer that died may have died *of* one entry of its batch (a model that crashes the
        process on some input), and claiming the batch together would deliver its innocent batch-mates with it
        until all of them passed ``max_deliveries``. Alone, each reclaimed entry succeeds or fails on its own,
        and only the one that keeps failing is dead-lettered. Entries already delivered more than
        ``max_deliveries`` times are dead-lettered as they are met (at most ``count`` per call)."""
        n = self.names
        for _ in range(self.settings.batch):
            resp = self.client.xautoclaim(n.images, n.group, self.consumer, self.settings.claim_idle_ms,
                                          start_id=self._claim_cursor, count=1)
            self._claim_cursor = _s(resp[0]) if resp and resp[0] else "0-0"
            entries = list(resp[1]) if resp else []
            claimed = [(_s(sid), fields) for sid, fields in entries if sid is not None and fields is not None]
            if len(claimed) < len(entries):
                self._ack_deleted({sid for sid, _ in claimed})
            if not claimed:
                if self._claim_cursor == "0-0" or not entries:
                    return []
                continue  # a deleted entry: look further
            sid, fields = claimed[0]
            info = self.client.xpending_range(n.images, n.group, min=sid, max=sid, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else self.settings.max_deliveries + 1
            raw = fields.get(b"data", fields.get("data"))
            if deliveries > self.settings.max_deliveries:
                self.dead_letter(
                    sid, raw,
                    f"delivered {deliveries} times, over max_deliveries={self.settings.max_deliveries}"
                    " (the worker kept failing or dying on it)",
                    kind="max_deliveries", deliveries=deliveries,
                )
                continue
            self.stats["reclaimed"] += 1
            log.warning("%s reclaimed stale entry %s (delivery %d)", self.consumer, sid, deliveries)
            return [(sid, raw)]
        return []

    def _ack_deleted(self, keep: set[str]) -> None:
        """Ack entries pending with this consumer whose stream entry no longer exists (trimmed or XDEL'd while
        pending). Redis 7 drops them from the PEL itself; Redis 6.2's XAUTOCLAIM returns them as bare nils."""
        n = self.names
        pend = self.client.xpending_range(
            n.images, n.group, min="-", max="+", count=max(1000, 4 * self.settings.batch),
            consumername=self.consumer
        )
        cands = [_s(p["message_id"]) for p in pend if _s(p["message_id"]) not in keep]
        if not cands:
            return
        with self.client.pipeline(transaction=False) as p:
            for sid in cands:
                p.xrange(n.images, min=sid, max=sid, count=1)
            exists = p.execute()
        gone = [sid for sid, e in zip(cands, exists, strict=True) if not e]
        if gone:
            self.client.xack(n.images, n.group, *gone)
            log.warning("acked %d pending entries that were deleted from %s", len(gone), n.images)

    def read(self, block_ms: int | None = None, count: int | None = None) -> list[tuple[str, bytes | None]]:
        """Up to ``count`` entries as (stream id, data bytes or None when the entry has no ``data`` field): a
        stale pending entry alone when there is one (see :meth:`reclaim`: it is processed as a batch of its own),
        else new ones (blocking up to ``block_ms``)."""
        out = self.reclaim()
        if not out:
            block = self.settings.block_ms if block_ms is None else block_ms
            out = self._read_new_leading(block, min(count or self.settings.batch, self.settings.batch))
        self.stats["read"] += len(out)
        return out

    def _read_new_leading(self, block: int, count: int) -> list[tuple[str, bytes | None]]:
        """New entries, read by one consumer of the process at a time (``read_lock``): the others wait for their
        turn instead of on the stream, so a few images that land together go to one consumer as one batch, and
        several batches run at once only when images keep coming while a batch is in flight. A blocked read
        returns as soon as the first entry lands, often the first of a producer's round trip: the rest of it is
        taken at once, without blocking, rather than left to the next consumer. Returns nothing when the turn
        does not come within the read's own wait (so that the caller's loop can see a stop request)."""
        lock = self.read_lock
        if lock is not None and not lock.acquire(timeout=max(block, 50) / 1000):
            return []
        try:
            out = self._read_new(count, block)
            if 0 < len(out) < count:
                out += self._read_new(count - len(out), None)
            return out
        finally:
            if lock is not None:
                lock.release()

    def _read_new(self, count: int, block: int | None) -> list[tuple[str, bytes | None]]:
        """Up to ``count`` new entries (XREADGROUP ">"), blocking up to ``block`` ms (None or 0: not at all)."""
        resp = self.client.xreadgroup(self.names.group, self.consumer, {self.names.images: ">"}, count=count,
                                      block=block or None)
        items = resp.items() if isinstance(resp, dict) else (resp or [])
        out = []
        for _stream, entries in items:
            for sid, fields in entries:
                if sid is None:
                    continue
                fields = fields or {}
                out.append((_s(sid), fields.get(b"data", fields.get("data"))))
        return out

    # -- writing --------------------------------------------------------------------------------------------

    def publish(self, results: Sequence[tuple[str, dict]],
                prints: Mapping[str, Fingerprint] | None = None) -> list[bool]:
        """Write one verdict per (image stream id, verdict dict), publish alerts, and ack the images, all in
        one atomic script. ``prints``: the fingerprint of each monitored entry's image, by stream id (the query
        monitor: :meth:`probes`). Only entries pending in the group (read and not yet acked) get a verdict.
        Returns, per result, True if written now, False if that entry was no longer pending: it already had its
        outcome (a redelivered copy, only acked)."""
        if not results:
            return []
        n, st = self.names, self.settings
        prints = prints or {}
        probes = self.probes(results, prints) if st.monitored and prints else {}
        args: list[Any] = [n.group, st.verdict_maxlen, n.alerts or "", n.all_verdicts_channel or "",
                           st.alert_k, st.alert_n, st.alert_idle_s, repr(time.time()), st.probe_k, st.probe_n,
                           st.probe_history]
        windows, monitors = [], []
        for sid, verdict in results:
            source = verdict.get("source") or ""
            windows.append(f"{n.window_prefix}{source}")
            monitors.append(f"{n.probe_prefix}{source}")
            flagged = verdict.get("is_adversarial")
            probe = probes.get(sid)
            # "e": no decision (an error verdict), which leaves a source's alert window as it was
            args += [sid, wire.encode_verdict(verdict), "e" if flagged is None else "1" if flagged else "0", source,
                     verdict["id"], "" if probe is None else "1" if probe else "0",
                     prints[sid].to_bytes() if probe is not None else ""]
        keys = [n.verdicts, n.images, n.episodes, *windows, *monitors]
        try:
            *flags, opened = self._publish_script(keys=keys, args=args)
            written = [bool(x) for x in flags]
        except Exception as exc:
            report(self.events.publish_failed, "OOM" if is_out_of_memory(exc) else type(exc).__name__)
            raise
        report(self.events.published, [v for _, v in results], written)
        self.stats["published"] += sum(written)
        self.stats["duplicates"] += len(written) - sum(written)
        self.stats["episodes"] += int(opened)
        return written

    def probes(self, results: Sequence[tuple[str, dict]], prints: Mapping[str, Fingerprint]) -> dict[str, bool]:
        """Whether each monitored entry (a source, and a fingerprint in ``prints``) probes: is a small edit of one
        of its source's recent images (pipeline.queries), those in Redis and those earlier in this batch. One
        round trip reads every source's history."""
        sources = list(dict.fromkeys(v.get("source") for sid, v in results if v.get("source") and sid in prints))
        if not sources:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for source in sources:
            pipe.hget(f"{self.names.probe_prefix}{source}", "f")
        history: dict[str, ProbeHistory] = {}
        for source, packed in zip(sources, pipe.execute(), strict=True):
            kept = []
            for raw in msgpack.unpackb(packed, raw=True) if packed else []:
                try:
                    kept.append(Fingerprint.from_bytes(raw))
                except ValueError:  # another version's layout: it compares with nothing
                    continue
            history[source] = ProbeHistory(self.settings.probe_history, prints=kept)
        out = {}
        for sid, verdict in results:
            source = verdict.get("source")
            if not source or sid not in prints:
                continue
            out[sid] = history[source].probes(prints[sid])
            history[source].push(prints[sid])
        return out

    def dead_letter(self, stream_id: str, raw: bytes | None, reason: str, kind: str = "other",
                    **extra: Any) -> str | None:
        """Move one entry to the dead-letter stream (reason + payload truncated to a limit) and ack it, in one
        atomic script that writes it only while the entry is pending: an entry whose verdict is already written (a
        slow consumer published it) is only acked, and a verdict published later for a dead-lettered entry is a
        duplicate. Returns the dead letter's id, or None when the entry already had its outcome. ``kind`` names
        the reason's class (no_data, undecodable, unknown_model, ref, max_deliveries) for metrics and the record."""
        n = self.names
        data = wire.encode_dead_letter(
            stream_id, raw, reason, consumer=self.consumer, images=n.images, at=time.time(), kind=kind, **extra
        )
        dead_id = self._dead_letter_script(keys=[n.dead, n.images],
                                           args=[n.group, self.settings.dead_maxlen, stream_id, data])
        if not dead_id:
            self.stats["duplicates"] += 1
            log.info("%s already has its verdict: acked, not dead-lettered", stream_id)
            return None
        self.stats["dead"] += 1
        report(self.events.dead_lettered, kind)
        log.warning("dead-lettered %s: %s", stream_id, reason)
        return _s(dead_id)

    # -- inspection -----------------------------------------------------------------------------------------

    def pending_count(self) -> int:
        """Entries delivered to the group but not yet acked."""
        info = self.client.xpending(self.names.images, self.names.group)
        return int(info["pending"]) if isinstance(info, dict) else int(info[0])

    def backlog(self, scan_cap: int = WAITING_SCAN_CAP) -> tuple[int, int]:
        """(pending, waiting): entries delivered to the group but not yet acked, and entries not yet delivered
        to it. ``waiting`` is the group's ``lag`` where Redis reports one (7.0 and later); before 7.0, the entries
        after the group's last-delivered id, counted by a range read of at most ``scan_cap`` entries (so it
        saturates there: run Redis 7 where the exact figure matters, e.g. for autoscaling a large cluster)."""
        n = self.names
        try:
            groups = self.client.xinfo_groups(n.images)
            length = int(self.client.xlen(n.images))
        except redis.ResponseError:  # no stream yet
            return 0, 0
        group = next((g for g in groups if _s(g["name"]) == n.group), None)
        if group is None:
            return 0, length
        pending = int(group["pending"])
        lag = group.get("lag")
        if lag is not None:
            return pending, int(lag)
        if length == 0:
            return pending, 0
        last = _s(group["last-delivered-id"])
        return pending, len(self.client.xrange(n.images, min=f"({last}", max="+", count=scan_cap))

    # -- retention ------------------------------------------------------------------------------------------

    def oldest_needed_id(self) -> str | None:
        """The oldest image-stream id some consumer group still needs (its oldest pending entry, else its
        last-delivered entry, kept conservatively); None when the stream or its groups do not exist yet (then
        every entry is unread and nothing may be trimmed)."""
        n = self.names
        try:
            groups = self.client.xinfo_groups(n.images)
        except redis.ResponseError:  # no such stream
            return None
        if not groups:
            return None
        keep: tuple[int, int] | None = None
        for g in groups:
            need = _id_tuple(g["last-delivered-id"])
            if int(g["pending"]) > 0:
                summary = self.client.xpending(n.images, g["name"])
                if summary.get("min"):
                    need = min(need, _id_tuple(summary["min"]))
            keep = need if keep is None else min(keep, need)
        return f"{keep[0]}-{keep[1]}" if keep else None

    def trim_acked(self) -> int:
        """Delete image entries that every consumer group has read and acked (``XTRIM MINID ~``), so the image
        stream holds only its backlog (unread or pending entries, plus at most one radix-tree node of acked
        ones). Never removes an entry a group still needs: unread and pending entries are kept, always.
        Returns how many entries were removed. (A group created later with start id "0" will not see the
        entries trimmed before it existed; XGROUP SETID backwards is not honoured either.)"""
        keep = self.oldest_needed_id()
        if keep is None or keep == "0-0":
            return 0
        removed = int(self.client.xtrim(self.names.images, minid=keep, approximate=True))
        self.stats["trimmed"] += removed
        return removed


def note_shards(client: redis.Redis, names: StreamNames, shards: int) -> None:
    """Note the shard count this worker serves where producers and readers look (``names.shard_count_key``); a
    different count already noted there is logged loudly: two deployments disagree, and images pushed by the other
    count go to streams one of them never reads. Best effort: a Redis that is down or refuses it (ACL) is logged."""
    try:
        old = client.set(names.shard_count_key, str(shards), get=True)
    except (*CONNECTION_ERRORS, redis.ResponseError) as exc:  # a note: the stream is read without it
        log.warning("could not note the shard count at %s: %s", names.shard_count_key, exc)
        return
    if old is not None and _s(old) != str(shards):
        log.error("%s said %s shards, this worker serves %d: producers that read the old count push to streams "
                  "this worker does not read", names.shard_count_key, _s(old), shards)


def served_shards(client: redis.Redis, names: StreamNames, given: int | None = None) -> int:
    """``given`` when set, else the shard count a worker noted (:func:`note_shards`), else 1."""
    if given is not None:
        return StreamSettings(shards=given).shards
    noted = client.get(names.shard_count_key)
    return StreamSettings(shards=int(noted)).shards if noted is not None else 1


def total_backlog(consumers: Iterable[StreamConsumer]) -> tuple[int, int]:
    """(pending, waiting) summed over the shards ``consumers`` read (one consumer per shard)."""
    pending = waiting = 0
    for consumer in consumers:
        p, w = consumer.backlog()
        pending, waiting = pending + p, waiting + w
    return pending, waiting


DetectFn = Callable[[list[wire.Request]], list[dict]]


class StreamWorker:
    """read → decode (bad entries to the dead letters) → ``detect_fn`` (one call per batch) → publish."""

    def __init__(
        self, consumer: StreamConsumer, detect_fn: DetectFn, *, max_backoff_s: float = 10.0,
        trim_interval_s: float | None = 5.0, models: Iterable[str] | None = None,
        call_batch: Callable[[str], int] | None = None, fetcher: RefFetcher | None = None,
    ) -> None:
        self.consumer = consumer
        # fetches the images sent by reference (``ref``), from the URLs its allow list names (none by default)
        self.fetcher = fetcher or RefFetcher()
        self.detect_fn = detect_fn
        # the detectors ``detect_fn`` serves, by name: a request naming another goes to the dead letters with the
        # reason (None: every request is handed to ``detect_fn``)
        self.models = None if models is None else frozenset(models)
        # images one call of a model should take (pipeline.images_per_call): a read takes at most that many of
        # the model the last read held, so that a photo's latency is that of a call of 16 photos, not of 256
        self.call_batch = call_batch
        self._count = consumer.settings.batch
        if call_batch is not None and self.models:
            self._count = min(self._count, *(call_batch(m) for m in self.models))
        self.max_backoff_s = max_backoff_s
        self.trim_interval_s = trim_interval_s  # run() trims acked image entries this often (None: never)
        self._last_trim = 0.0
        self._unpublished: list[tuple[str, dict]] = []  # a batch whose publish failed; retried first
        self._unpublished_prints: dict[str, Fingerprint] = {}  # its images' fingerprints (the query monitor)
        # why the last publish failed while its verdicts wait (None: publishing works): /healthz says "degraded"
        self.degraded: str | None = None
        self._busy_since: float | None = None  # monotonic start of the detect_fn call in progress, if any

    @property
    def unpublished(self) -> int:
        """Verdicts computed but not yet landed in Redis (a publish failed); :meth:`run` retries them first."""
        return len(self._unpublished)

    def run_once(self, block_ms: int | None = None) -> int:
        """Process one batch; returns the number of entries handled (verdicts + dead letters). Exceptions
        from ``detect_fn`` propagate and leave the batch pending, to be reclaimed and retried later."""
        handled = 0
        if self._unpublished:
            self._publish(self._unpublished, self._unpublished_prints)
            handled, self._unpublished, self._unpublished_prints = len(self._unpublished), [], {}
        entries = self.consumer.read(block_ms, self._count)
        if not entries:
            return handled
        t_read = time.time()
        reqs: list[wire.Request] = []
        sids: list[str] = []
        for sid, raw in entries:
            if raw is None:
                self.consumer.dead_letter(sid, None, "stream entry has no 'data' field", kind="no_data")
                handled += 1
                continue
            try:
                req = wire.decode_request(raw)
            except wire.WireError as e:
                self.consumer.dead_letter(sid, raw, f"undecodable request: {e.reason}", kind="undecodable")
                handled += 1
                continue
            if self.models is not None and req.model not in self.models:
                self.consumer.dead_letter(sid, raw, f"unknown model {req.model!r}: this worker serves "
                                          f"{', '.join(sorted(self.models))}", kind="unknown_model")
                handled += 1
                continue
            reqs.append(req)
            sids.append(sid)
        if any(req.ref is not None for req in reqs):
            sids, reqs, dead = self._fetch(sids, reqs, dict(entries))
            handled += dead
        if not reqs:
            return handled
        if self.call_batch is not None:
            self._count = min(self.consumer.settings.batch, *(self.call_batch(r.model) for r in reqs))
        sids, reqs, verdicts = self._detect(sids, reqs)
        now = time.time()
        results = []
        prints = {sid: Fingerprint.of(req.image) for sid, req in zip(sids, reqs, strict=True)
                  if req.source is not None} if self.consumer.settings.monitored else {}
        for sid, req, v in zip(sids, reqs, verdicts, strict=True):
            v = dict(v)
            v.setdefault("v", wire.VERSION)
            v.setdefault("id", req.id)
            v.setdefault("model", req.model)
            if req.source is not None:
                v["source"] = req.source
            v["stream_id"] = sid
            # a producer's clock: trusted only within MAX_QUEUE_AGE_S before now (else the read time stands in)
            known = req.enqueued_at is not None and now - MAX_QUEUE_AGE_S <= req.enqueued_at <= now
            start = req.enqueued_at if known else t_read
            v["latency_ms"] = round((now - start) * 1000.0, 3)
            # where it went: waiting in the stream (enqueue → read), then the detection (read → verdict); the
            # write is the verdict stream entry's id (Redis's clock at XADD) less done_at
            v["queued_ms"] = round(max(0.0, t_read - start) * 1000.0, 3)
            v["done_at"] = now
            results.append((sid, v))
        try:
            self._publish(results, prints)
        except CONNECTION_ERRORS:
            self._unpublished, self._unpublished_prints = results, prints  # publish them once Redis is back
            raise
        except redis.ResponseError as e:
            if is_out_of_memory(e):  # Redis is full: keep the verdicts, read nothing more until they land
                self._unpublished, self._unpublished_prints = results, prints
            raise
        return handled + len(results)

    def _fetch(self, sids: list[str], reqs: list[wire.Request], raw: Mapping[str, bytes | None]
               ) -> tuple[list[str], list[wire.Request], int]:
        """The batch with the images sent by reference fetched (all at once) and decoded: one the fetcher refuses
        (not allowed, missing, too big, not what its digest says) or that does not decode goes to the dead letters
        with the reason; one that cannot be fetched now (a timeout, an unreachable server) stays pending, to be
        retried when reclaimed (and dead-lettered after ``max_deliveries``). Returns the rest and the number of
        entries dead-lettered; raises :class:`RefUnavailable` when nothing of the batch is left but images that
        cannot be fetched now, so that :meth:`run` backs off rather than read again at once."""
        got = iter(self.fetcher.fetch_many([(r.ref.url, r.ref.size, r.ref.sha256) for r in reqs if r.ref]))
        keep_sids, keep, dead, waiting = [], [], 0, []
        for sid, req in zip(sids, reqs, strict=True):
            if req.ref is not None:
                payload = next(got)  # bytes, RefRejected or RefUnavailable (fetch_many raises nothing)
                if isinstance(payload, RefUnavailable):
                    log.warning("could not fetch the image of %s now (%s): left pending", sid, payload)
                    waiting.append(payload)
                    continue
                if isinstance(payload, RefRejected):
                    self.consumer.dead_letter(sid, raw[sid], f"reference refused: {payload.reason}", kind="ref")
                    dead += 1
                    continue
                try:
                    req = wire.with_fetched(req, payload)
                except wire.WireError as e:
                    self.consumer.dead_letter(sid, raw[sid], f"undecodable request: {e.reason}", kind="undecodable")
                    dead += 1
                    continue
            keep_sids.append(sid)
            keep.append(req)
        if waiting:
            report(self.consumer.events.fetch_failed, len(waiting))
            if not keep and not dead:
                raise waiting[0]  # nothing to do but wait for the store: run() backs off instead of spinning
        return keep_sids, keep, dead

    def _publish(self, results: list[tuple[str, dict]], prints: Mapping[str, Fingerprint]) -> None:
        """Publish, and keep :attr:`degraded` saying whether publishing works."""
        try:
            self.consumer.publish(results, prints)
        except CONNECTION_ERRORS as e:
            self.degraded = f"redis unreachable ({type(e).__name__}): {len(results)} verdicts wait to be published"
            raise
        except redis.ResponseError as e:
            if is_out_of_memory(e):
                self.degraded = (f"redis out of memory (maxmemory reached): {len(results)} verdicts wait to be "
                                 "published, no new entries are read")
            raise
        self.degraded = None

    def busy_for(self) -> float:
        """Seconds the ``detect_fn`` call in progress has been running (0 when none is): a stuck stage shows here.
        Each call counts on its own, so a batch retried image by image is not one long call."""
        started = self._busy_since
        return 0.0 if started is None else time.monotonic() - started

    def _call(self, reqs: list[wire.Request]) -> list[dict]:
        self._busy_since = time.monotonic()
        try:
            verdicts = self.detect_fn(reqs)
        finally:
            self._busy_since = None
        if len(verdicts) != len(reqs):
            raise RuntimeError(f"detect_fn returned {len(verdicts)} verdicts for {len(reqs)} requests")
        return verdicts

    def _detect(self, sids: list[str], reqs: list[wire.Request]):
        """``detect_fn`` on the whole batch; if it raises, one request at a time so that only the requests
        that fail stay pending (to be retried, then dead-lettered after ``max_deliveries``)."""
        try:
            return sids, reqs, self._call(reqs)
        except Exception:
            if len(reqs) == 1:
                raise
            log.exception("detect_fn failed on a batch of %d; retrying one by one", len(reqs))
        ok: tuple[list, list, list] = ([], [], [])
        last: Exception | None = None
        for sid, req in zip(sids, reqs, strict=True):
            try:
                v = self._call([req])[0]
            except Exception as e:  # left pending: reclaimed and retried later
                log.warning("detect_fn failed on %s (%s): left pending", sid, e)
                last = e
                continue
            for lst, x in zip(ok, (sid, req, v), strict=True):
                lst.append(x)
        if not ok[0] and last is not None:
            raise last
        return ok

    def run(self, stop_event: threading.Event, on_batch: Callable[[int], None] | None = None) -> None:
        """Loop until ``stop_event`` is set; the batch in flight is finished (and published) first. Connection
        loss is retried with exponential backoff; a lost consumer group (Redis restarted without its data) is
        recreated; other errors are logged and retried after a backoff (their entries stay pending). Refused
        credentials (``redis.AuthenticationError``) are not retried: they are raised."""
        backoff = 0.1
        group_ready = False
        while not stop_event.is_set() or self._unpublished:
            try:
                if not group_ready:
                    self.consumer.ensure_group()
                    group_ready = True
                n = self.run_once()
                backoff = 0.1
                if on_batch and n:
                    on_batch(n)
                self._maybe_trim()
            except redis.AuthenticationError:
                log.error("redis refused the credentials (wrong or missing password): stopping this consumer")
                raise  # a configuration error: retrying with the same password cannot succeed
            except CONNECTION_ERRORS as e:
                self.consumer.stats["connection_errors"] += 1
                log.warning("redis unavailable (%s); retrying in %.1fs", e, backoff)
                if not self._back_off(stop_event, backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):
                    group_ready = False
                    continue
                if is_out_of_memory(e):
                    log.warning("redis is out of memory; %d verdicts kept, retrying in %.1fs", self.unpublished,
                                backoff)
                else:
                    log.exception("redis error; retrying in %.1fs", backoff)
                if not self._back_off(stop_event, backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)
            except RefUnavailable as e:
                log.warning("no image of the batch could be fetched (%s): they stay pending; retrying in %.1fs", e,
                            backoff)
                if not self._back_off(stop_event, backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)
            except Exception:
                log.exception("batch failed; its entries stay pending and will be retried")
                if not self._back_off(stop_event, backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff_s)

    def _back_off(self, stop_event: threading.Event, backoff: float) -> bool:
        """Wait ``backoff`` seconds before the next try; False when the loop should end instead.

        While running, a stop request cuts the wait short. Once stopping, only unpublished verdicts keep the
        loop alive: they are retried with a real sleep (the stop event would return at once and spin), and
        abandoned once the backoff has reached its cap (their entries stay pending, to be reclaimed)."""
        if not stop_event.is_set():
            stop_event.wait(backoff)
            return True
        if self._unpublished and backoff >= self.max_backoff_s:
            log.error("stopping with %d unpublished verdicts (they stay pending in redis)", len(self._unpublished))
            return False
        time.sleep(backoff)
        return True

    def _maybe_trim(self) -> None:
        if self.trim_interval_s is None or time.monotonic() - self._last_trim < self.trim_interval_s:
            return
        self._last_trim = time.monotonic()
        removed = self.consumer.trim_acked()
        if removed:
            log.debug("trimmed %d acked entries from %s", removed, self.consumer.names.images)


def drain(worker: StreamWorker, expected: int, timeout_s: float = 60.0, block_ms: int = 100) -> int:
    """Run ``worker`` until ``expected`` entries are handled or ``timeout_s`` passes (tests, scripts)."""
    done, deadline = 0, time.monotonic() + timeout_s
    while done < expected and time.monotonic() < deadline:
        done += worker.run_once(block_ms=block_ms)
    return done


def iter_stream(
    client: redis.Redis, stream: str, start: str = "-", count: int = 1000
) -> Iterable[tuple[str, bytes]]:
    """(id, data) of every entry of a stream, oldest first (inspection helper)."""
    last = start
    while True:
        entries = client.xrange(stream, min=last, max="+", count=count)
        if last != start:
            entries = entries[1:]
        if not entries:
            return
        for sid, fields in entries:
            yield _s(sid), fields.get(b"data")
        last = _s(entries[-1][0])
