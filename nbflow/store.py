"""Every Redis key name and every Lua script nbflow uses, in one place.

Layout under ``prefix`` (spec section 4; the first three are the seed's)::

    {p}:{id}:state        hash  status, createdAt, updatedAt, error, output, plus the
                                run bookkeeping (each only while it has a value): owner
                                (token of the run advancing it), gen, waitType, stepsDone,
                                retention, finishedAt and hardStop (a pause that no
                                worker heard: the scripts apply it themselves); childDone
                                (a child ended while the run went on: its park re-queues),
                                rollback (JSON report of the rollbacks an errored run ran)
    {p}:{id}:steps        hash  step key ("name#count") -> step entry (JSON, see below)
    {p}:{id}:metadata     hash  workflowName, payload (JSON), currentStep; a child also
                                parent, parentStep (the parent's step key), parentGen (the
                                parent's gen when it started it), parentT0 (that step's start)
    {p}:{id}:history      list  JSON events that no other key records: retries, failures,
                                waits, wake-ups, events sent/received, lifecycle calls
                                (``history()`` adds created/started/finished/complete from
                                the state and the step entries, so they are stored once)
    {p}:{id}:events:{t}   list  buffered events of type t, first in first out
    {p}:{id}:evtypes      set   the types that have an event buffer (so deletes need no scan)
    {p}:{id}:children     hash  child instance id -> the parent's step key that started it
                                (``step.run_workflow``: termination cascades, restarts reset)
    {p}:{id}:logs         hash  what the workflow's code printed or logged (SPEC 8.3): step
                                key -> its lines, one JSON object a line ({"t","s","l"}),
                                bounded (a first line {"dropped":N} counts what was cut);
                                "#n" -> lines ``run`` wrote between steps after reaching the
                                step of order n (``records.log_rows`` reads them)
    {p}:{id}:progress     hash  step key -> its last reported progress (SPEC 8.4,
                                ``records.progress_json``); "@last" -> the newest of them
                                with its step key "k" (what a status card shows)
    {p}:{id}:done         pubsub channel: a message when the instance finishes (``wait()``):
                          its final status, then a space and the output or error JSON
                          when that is at most 4 KB
    {p}:stop:{worker}     pubsub channel: "id ack" asks that worker to start no new step
                          of id; it answers by pushing to the list {p}:ack:{nonce}
    {p}:ready:{wf}        zset  queued instances of workflow wf -> time queued (finds lost
                                dispatches: see ``orphans``; one per workflow because each
                                workflow has its own RQ queue, ``nbflow.routing``)
    {p}:limits:{wf}       hash  concurrency, rate, period (seconds): a workflow's limits,
                                as last registered with some (spec 10.2, ``nbflow.limits``)
    {p}:running:{scope}   set   instances holding a slot of scope (a workflow, or
                                "wf:key" with a concurrency key); state field ``slot``
    {p}:held:{scope}      zset  queued instances over a limit -> priority * 1e10 + time
                                held (started ones 10 priorities ahead); state ``held``
    {p}:starts:{scope}    zset  starts within the rate window (expires by itself)
    {p}:heldscopes        set   scopes with held instances (the sweep looks at them)
    {p}:ratewake          zset  scope -> when its rate window frees a start (wake_due)
    {p}:go:{wf}           list  held instances admitted when a slot freed (state ``pass``:
                                their slot is reserved); workers BLPOP it first
    {p}:serving:{wf}      zset  workers that run workflow wf -> epoch until which their
                                claim holds (renewed by their heartbeat, removed when they
                                stop): what ``info()["waiting_for"]`` reads
    {p}:timers            zset  waiting instances -> epoch when their sleep/timeout/retry is due
    {p}:leases            zset  running instances -> epoch when their runner's lease expires
    {p}:expiry            zset  finished instances -> epoch when retention deletes them
    {p}:index:wf:{name}   zset  instances of a workflow -> creation epoch (newest first)
    {p}:index:status:{s}  zset  instances in status s -> creation epoch; every instance is
                                in exactly one, so merging them lists all instances
    {p}:schedules         zset  schedule name -> when the firing loop looks at it next: its
                                next tick (epoch), a claim's expiry while a housekeeper
                                fires it, +inf while paused (``nbflow.schedules``)
    {p}:schedule:{name}   hash  workflow, cron, timezone, overlap, params (JSON), retention,
                                paused, nextTick, lastTick, lastInstance, claim (token of
                                the housekeeper firing it), counters fired / skipped /
                                missed / triggered / backfilled, createdAt, updatedAt
    {p}:schedule:{name}:history  list  JSON events of the schedule (newest last, capped)
    {p}:fp:{wf}:{version} hash  step key -> the callback fingerprint a run of workflow wf
                                with class version `version` found on replay, where it
                                differed from the recorded one (``steps()``'s ``stale``
                                for callbacks not found by name; written rarely, never
                                scanned)

The metadata hash also holds ``version``, the workflow code version at creation.
    {p}:artifacts         hash  artifact URL -> how many references Redis holds to it
                                (``nbflow.artifacts``; what ``nbflow gc`` keeps)
    {p}:{id}:artifacts    hash  the same, for the references of one instance (only
                                while it has any), so retention needs no scan

A reference to an artifact sits where the value would: a step entry's ``v`` (and
its URL as ``"r"`` right after ``"s"``, so the scripts find it with an anchored
match and a step without one pays nothing), the ``output`` field, or an event's
``payload``.  The scripts that write or drop references count them in the two
hashes above and return the URLs no reference names any more; the caller deletes
those files after the script (Redis state first, files after).
    {p}:stepcount         hash  workflow name -> steps done by its last completed instance
                                (what a running one shows as "3/7 steps")
    {p}:req:{rid}         string  the first reply of the state-changing call with request id
                                rid (msgpack), kept ``REQUEST_TTL`` seconds so a retry of the
                                call answers the same and changes nothing (see below)

A step entry is compact JSON whose first field is fixed so Lua can read it without
decoding the (possibly large) result; ``nbflow.records`` writes and reads it and its
docstring lists the fields (``t0`` is the start in seconds since the instance's
creation).

Every status change happens inside one of the scripts below, so a pause, a
terminate, a step completion and a lease expiry that meet at the same moment
are applied one after the other, never interleaved.  Scripts build key names
from the prefix they are given: nbflow targets a single Redis (not Cluster).

Exactly once (spec 12).  redis-py resends a command whose reply was lost (the
connection dropped after Redis ran it: ``Retry``/``retry_on_error`` in
``nbflow.server``), and a resent script would run twice.  So every state-changing
call made through the retrying client carries a request id, made once per call
(``Keys.request()``: ``{p}:req:{uuid4}``); the resend carries the same bytes, so
the same id.  Scripts named in ``ONCE`` are wrapped (``_ONCE_HEAD``/``_ONCE_TAIL``):
given the request key as ``KEYS[1]`` they store their reply there on the first
run and, on a resend, return it without running again.  A call without the key runs as
always, so the wrapper costs nothing where it is not asked for.  RQ jobs pushed
with a call are RQ's own commands, captured from its pipeline (so the job hash is
what ``rq`` tools read), carried in the call's own ``KEYS`` after the request key:
the wrapper runs them only on the first run, and only if it changed something (not
on a resend, not when the call was refused).  Jobs pushed alone go through the
``jobs_once`` script with a request key of their own.  Either way a resent
transaction pushes no second job.

How a new state-changing call opts in (fork, schedules, routed queues):

1. add its script's name to ``ONCE``;
2. call it with a fresh key: ``scripts.NAME(keys=[keys.request()], args=[...])``,
   or ``scripts.execute([(NAME, args)], extra, once=keys.request())`` when it goes
   with RQ jobs (``extra(pipe)`` enqueues them on ``pipe``: any queue, any number);
3. enqueue jobs decided by a reply (ids the script returns) with
   ``Backend.enqueue`` without a pipe: it takes a request key of its own.

The worker's step writes (``ScriptStream``) are never resent: a lost connection
there fails the calls owed (the run stops; its lease hands the instance on, and
only what was in flight runs again), so they need no request id and pay nothing.
The claim, which goes through the retrying client, knows itself by its token
instead (a resent claim reads again and writes nothing).
"""

from __future__ import annotations

import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
import redis

from nbflow.records import FINAL_STATUSES, STATUSES  # noqa: F401  (statuses the scripts set)

#: How long a claim or a step write keeps an instance leased to its run (``{p}:leases``);
#: the worker's heartbeat renews leases of runs in progress every third of this.
LEASE_SECONDS = 30.0
#: How often a call that met an empty script cache (a Redis restart, SCRIPT FLUSH) loads
#: the scripts and goes again before giving up.
NOSCRIPT_ATTEMPTS = 5

#: How long the first reply of a state-changing call is kept for its retries
#: (``{p}:req:{rid}``); redis-py's retries of one call span a few seconds, this
#: also covers a client that resends after a Redis restart or a long stall.
REQUEST_TTL = 900


def clock() -> tuple[float, str]:
    """Now, as epoch seconds and as the ISO 8601 UTC text stored in state
    (millisecond precision, ``Z``: short, and what any tool parses)."""
    t = time.time()
    second = int(t)
    if second != _second[0]:  # strftime once a second, not on every write
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return t, f"{_second[1]}.{int(t % 1 * 1000):03d}Z"


_second: list[Any] = [-1, ""]  # the last whole second clock() formatted, and its text


class Keys:
    """Key names for one prefix; the only place that spells them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.timers = f"{prefix}:timers"
        self.leases = f"{prefix}:leases"
        self.expiry = f"{prefix}:expiry"
        self.schedules = f"{prefix}:schedules"
        self.stepcount = f"{prefix}:stepcount"

    def state(self, iid: str) -> str:
        return f"{self.prefix}:{iid}:state"

    def steps(self, iid: str) -> str:
        return f"{self.prefix}:{iid}:steps"

    def metadata(self, iid: str) -> str:
        return f"{self.prefix}:{iid}:metadata"

    def history(self, iid: str) -> str:
        return f"{self.prefix}:{iid}:history"

    def events(self, iid: str, event_type: str) -> str:
        return f"{self.prefix}:{iid}:events:{event_type}"

    def limits(self, workflow: str) -> str:
        """The stored limits of a workflow (spec 10.2): concurrency, rate, period."""
        return f"{self.prefix}:limits:{workflow}"

    def go(self, workflow: str) -> str:
        """Held instances admitted when a slot freed, for workers to BLPOP (ids)."""
        return f"{self.prefix}:go:{workflow}"

    def listen(self) -> str:
        """The set of the extra keys workers BLPOP, as ``{workflow}:go`` (a workflow
        with limits) and ``{workflow}:p{n}`` (a priority used at least once): every
        workflow's queue of priority 5 is always listened to, these only once in use."""
        return f"{self.prefix}:listen"

    def ready(self, workflow: str) -> str:
        return f"{self.prefix}:ready:{workflow}"

    def serving(self, workflow: str) -> str:
        return f"{self.prefix}:serving:{workflow}"

    def by_workflow(self, name: str) -> str:
        return f"{self.prefix}:index:wf:{name}"

    def by_status(self, status: str) -> str:
        return f"{self.prefix}:index:status:{status}"

    def done(self, iid: str) -> str:
        return f"{self.prefix}:{iid}:done"

    def stop_channel(self, worker: str) -> str:
        return f"{self.prefix}:stop:{worker}"

    def ack(self, nonce: str) -> str:
        return f"{self.prefix}:ack:{nonce}"

    def schedule(self, name: str) -> str:
        return f"{self.prefix}:schedule:{name}"

    def schedule_history(self, name: str) -> str:
        return f"{self.prefix}:schedule:{name}:history"

    def fingerprints(self, workflow: str, version: str) -> str:
        return f"{self.prefix}:fp:{workflow}:{version}"

    @property
    def artifacts(self) -> str:
        """URL -> number of references (``nbflow gc`` keeps what is here)."""
        return f"{self.prefix}:artifacts"

    def instance_artifacts(self, iid: str) -> str:
        return f"{self.prefix}:{iid}:artifacts"

    def logs(self, iid: str) -> str:
        return f"{self.prefix}:{iid}:logs"

    def progress(self, iid: str) -> str:
        return f"{self.prefix}:{iid}:progress"

    def request(self, rid: str | None = None) -> str:
        """The key recording the reply of the call with request id ``rid`` (default: a
        fresh uuid4), so a resent call is answered without running twice."""
        return f"{self.prefix}:req:{rid or uuid.uuid4().hex}"


# Shared Lua prelude: key helpers and the one function that changes a status
# (it also keeps the per-status index in step).
_PRELUDE = r"""
local P = ARGV[1]
-- A script body returns unchanged(reply) when it changed nothing; the exactly-once
-- wrapper (_ONCE_HEAD) then keeps no reply (elsewhere it is the reply as it is).
local once_keep = true
local function unchanged(reply)
  once_keep = false
  return reply
end
-- Runs RQ's captured commands in t from index i on, each as its argument count and
-- its arguments (``Scripts.captured``): the jobs a call pushes.
local function run_commands(t, i)
  while i <= #t do
    local n = tonumber(t[i])
    redis.call(unpack(t, i + 1, i + n))
    i = i + n + 1
  end
end
local KNOWN = {queued = 1, running = 1, waiting = 1, waitingForPause = 1, paused = 1,
               complete = 1, errored = 1, terminated = 1}
-- A stored number as a finite Lua number, or nil when it holds anything else.
local function finite(v)
  local n = v and tonumber(v)
  if n and n == n and n > -math.huge and n < math.huge then return n end
  return nil
end
local function k_state(id) return P .. ':' .. id .. ':state' end
local function k_steps(id) return P .. ':' .. id .. ':steps' end
local function k_meta(id) return P .. ':' .. id .. ':metadata' end
local function k_hist(id) return P .. ':' .. id .. ':history' end
local function k_logs(id) return P .. ':' .. id .. ':logs' end
local function k_prog(id) return P .. ':' .. id .. ':progress' end
local function hist(id, now, ev, extra)
  local e = '{"t":' .. now .. ',"ev":"' .. ev .. '"'
  if extra and extra ~= '' then e = e .. ',' .. extra end
  redis.call('RPUSH', k_hist(id), e .. '}')
end
local function set_status(id, new, now_iso, created)
  local st = k_state(id)
  local old = redis.call('HGET', st, 'status')
  if old then
    created = redis.call('ZSCORE', P .. ':index:status:' .. old, id) or created
    redis.call('ZREM', P .. ':index:status:' .. old, id)
  end
  redis.call('ZADD', P .. ':index:status:' .. new, created or '0', id)
  redis.call('HSET', st, 'status', new, 'updatedAt', now_iso)
  if new ~= 'waitingForPause' then redis.call('HDEL', st, 'hardStop') end
end
-- Limits (spec 10.2, ``nbflow.limits``).  A workflow registered with limits has
-- {p}:limits:{wf}; its instances count per scope: the workflow, or "wf:key" with a
-- concurrency key.  An instance holding a slot is in {p}:running:{scope} and has
-- `slot` in its state; one over a limit waits, still queued, in {p}:held:{scope}
-- (`held` in its state), ordered by priority then time; `pump` admits held ones
-- while the limits allow, reserving their slot (`pass`) and pushing them on the
-- list {p}:go:{wf}, which workers BLPOP before their workflow's RQ queues.
local function limits_of(wf)
  return redis.call('HMGET', P .. ':limits:' .. wf, 'concurrency', 'rate', 'period')
end
local function scope_wf(scope) return string.match(scope, '^([^:]+)') end
local function lua_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
-- Takes a slot (and a start of the rate window) for id if the limits allow: true;
-- else false and, when the rate window is what is full, when it frees.
local function admit(id, scope, lim, now, rated)
  local conc, rate = tonumber(lim[1]), tonumber(lim[2])
  local run = P .. ':running:' .. scope
  if conc and redis.call('SCARD', run) >= conc then return false, nil end
  if rate and not rated then
    local starts = P .. ':starts:' .. scope
    local period = tonumber(lim[3])
    redis.call('ZREMRANGEBYSCORE', starts, '-inf', string.format('%.6f', now - period))
    if redis.call('ZCARD', starts) >= rate then
      local first = redis.call('ZRANGE', starts, 0, 0, 'WITHSCORES')
      return false, tonumber(first[2]) + period
    end
    redis.call('ZADD', starts, string.format('%.6f', now), id .. '@' .. string.format('%.6f', now))
    redis.call('PEXPIRE', starts, math.ceil(period * 1000) + 1000)
    redis.call('HSET', k_state(id), 'rated', '1')
  end
  if conc then
    redis.call('SADD', run, id)
    redis.call('HSET', k_state(id), 'slot', scope)
  end
  return true, nil
end
local function rate_wake(scope, due)
  redis.call('ZADD', P .. ':ratewake', 'LT', string.format('%.6f', due), scope)
end
-- Admits held instances of scope, first first, while the limits allow.
local function pump(scope, lim, now)
  local held = P .. ':held:' .. scope
  local wf = scope_wf(scope)
  while true do
    local head = redis.call('ZRANGE', held, 0, 0)[1]
    if not head then
      redis.call('SREM', P .. ':heldscopes', scope)
      return
    end
    local st = k_state(head)
    local ok, due = admit(head, scope, lim, now, redis.call('HGET', st, 'rated'))
    if not ok then
      if due then rate_wake(scope, due) end
      return
    end
    redis.call('ZREM', held, head)
    redis.call('HDEL', st, 'held')
    redis.call('HSET', st, 'pass', '1')
    redis.call('ZADD', P .. ':ready:' .. wf, string.format('%.6f', now), head)
    redis.call('RPUSH', P .. ':go:' .. wf, head)
    redis.call('SADD', P .. ':listen', wf .. ':go')
  end
end
-- An instance leaves `running` (or a held/admitted one leaves `queued`): its slot
-- goes to the next held instance, in this same script.
local function unlimit(id, slot, held)
  local st = k_state(id)
  if held then
    redis.call('ZREM', P .. ':held:' .. held, id)
    redis.call('HDEL', st, 'held')
  end
  if slot then
    redis.call('SREM', P .. ':running:' .. slot, id)
    redis.call('HDEL', st, 'slot', 'pass')
    pump(slot, limits_of(scope_wf(slot)), lua_now())
  end
end
local function release(id)
  local st = k_state(id)
  redis.call('HDEL', st, 'owner')
  redis.call('ZREM', P .. ':leases', id)
  local lim = redis.call('HMGET', st, 'slot', 'held')
  if lim[1] or lim[2] then unlimit(id, lim[1], lim[2]) end
end
-- The claim of an instance of a workflow with limits: nil when it may start (its
-- slot taken), 'held' when it waits in its scope's held set (the worker moves on).
-- An instance that ran before goes ahead of held ones that never started.
local function limit_claim(id, wf, lim, now, started)
  local st = k_state(id)
  local f = redis.call('HMGET', st, 'pass', 'rated')
  if f[1] then
    redis.call('HDEL', st, 'pass')
    return nil
  end
  local m = redis.call('HMGET', k_meta(id), 'concurrencyKey', 'priority')
  local scope = wf
  if m[1] then scope = wf .. ':' .. m[1] end
  local held = P .. ':held:' .. scope
  if redis.call('ZCARD', held) == 0 then
    local ok, due = admit(id, scope, lim, now, f[2])
    if ok then return nil end
    if due then rate_wake(scope, due) end
  end
  local prio = tonumber(m[2] or '5')
  if started then prio = prio - 10 end
  redis.call('ZADD', held, string.format('%.6f', prio * 1e10 + now), id)
  redis.call('HSET', st, 'held', scope)
  redis.call('ZREM', P .. ':ready:' .. wf, id)
  redis.call('SADD', P .. ':heldscopes', scope)
  pump(scope, lim, now)
  return 'held'
end
-- The workflow of an instance: its RQ queue and its `ready` zset are named for it.
local function wf_of(id)
  return redis.call('HGET', k_meta(id), 'workflowName') or ''
end
-- Queues the instance (`wf`: its workflow when the caller knows it); returns the
-- workflow, whose RQ queue the caller enqueues it on.
-- A new instance's state, metadata and place in its workflow's index (create,
-- create_opts); false, writing nothing, when the id exists.  Its status is the
-- caller's to set.
local function new_instance(id, payload, now, now_iso, wf, retention, version)
  local st = k_state(id)
  if redis.call('EXISTS', st) == 1 then return false end
  redis.call('HSET', st, 'createdAt', now_iso)
  if retention ~= '' then redis.call('HSET', st, 'retention', retention) end
  redis.call('HSET', k_meta(id), 'workflowName', wf, 'payload', payload, 'currentStep', '',
             'version', version)
  redis.call('ZADD', P .. ':index:wf:' .. wf, now, id)
  return true
end
local function make_queued(id, now, now_iso, wf)
  wf = wf or wf_of(id)
  set_status(id, 'queued', now_iso, now)
  redis.call('ZADD', P .. ':ready:' .. wf, now, id)
  return wf
end
-- `value` (output or error JSON) rides along on the done message when small, so
-- a waiter has the final status without reading it again.
local function finish_bookkeeping(id, now, status, value)
  local st = k_state(id)
  local msg = status
  if value and #value <= 4096 then msg = status .. ' ' .. value end
  redis.call('PUBLISH', P .. ':' .. id .. ':done', msg)
  redis.call('HDEL', st, 'waitType')
  redis.call('ZREM', P .. ':ready:' .. wf_of(id), id)
  redis.call('ZREM', P .. ':timers', id)
  local ret = finite(redis.call('HGET', st, 'retention'))
  if ret then  -- (an unreadable retention keeps the instance: see corrupt_end)
    redis.call('HSET', st, 'finishedAt', now)
    redis.call('ZADD', P .. ':expiry', now + ret, id)
  end
end
-- A field that holds what nbflow never writes (hand-edited or damaged) ends its
-- instance errored with a message naming it, and the script returns 'corrupt'
-- instead of raising: a script error would fail every instance sharing the call's
-- pipeline or RQ job.  Fields the engine rewrites anyway (updatedAt, finishedAt,
-- gen, waitType, owner) are repaired instead, where they are read at all.
local function retention_ok(id)
  local r = redis.call('HGET', k_state(id), 'retention')
  return not r or (finite(r) ~= nil and finite(r) >= 0)
end
local function corrupt_end(id, field, now, now_iso)
  local st = k_state(id)
  local raw = redis.call('HGET', st, field)
  local shown = 'nothing (it is missing)'
  if raw then shown = cjson.encode((string.gsub(string.sub(raw, 1, 60), '[^%w%p ]', '?'))) end
  local msg = 'field ' .. field .. ' of ' .. st .. ' holds ' .. shown ..
              ', which nbflow did not write; fix or delete the field, or delete the instance'
  local err = cjson.encode({name = 'WorkflowError', message = msg})
  local created
  local old = redis.call('HGET', st, 'status')
  if old and not KNOWN[old] then  -- its index entry is under the status it had before
    for s in pairs(KNOWN) do
      created = created or redis.call('ZSCORE', P .. ':index:status:' .. s, id)
      redis.call('ZREM', P .. ':index:status:' .. s, id)
    end
  end
  set_status(id, 'errored', now_iso, created)
  release(id)
  redis.call('HSET', st, 'error', err)
  finish_bookkeeping(id, now, 'errored', err)
  hist(id, now, 'errored', '"error":' .. err)
  return 'corrupt'
end
-- HINCRBY stepsDone, or false when it holds no integer (nothing written then).
local function count_step(st)
  local r = redis.pcall('HINCRBY', st, 'stepsDone', 1)
  return type(r) ~= 'table' or not r.err
end
-- Checks that the caller's run still owns the instance: returns 'running' or
-- 'waitingForPause' when it does, else why not ('lost', 'unknown', a status).
local function check_owner(id, token, now, now_iso)
  local got = redis.call('HMGET', k_state(id), 'status', 'owner')
  if not got[1] then return 'unknown' end
  if not KNOWN[got[1]] then
    -- (side writes such as logs and progress pass no time: they only refuse)
    if now then return corrupt_end(id, 'status', now, now_iso) end
    return 'corrupt'
  end
  if got[2] ~= token then return 'lost' end
  return got[1]
end
local function pause_now(id, now, now_iso)
  set_status(id, 'paused', now_iso)
  release(id)
  hist(id, now, 'paused', '')
end
-- As check_owner, and applies a pause that was asked for: returns 'running'
-- when the run may go on, else why it must stop.
local function owned(id, token, now, now_iso)
  local why = check_owner(id, token, now, now_iso)
  if why == 'waitingForPause' then
    pause_now(id, now, now_iso)
    return 'paused'
  end
  return why
end
-- Tells the worker advancing the instance, if any, to start no new step of it
-- (pause, terminate, restart): a message on that worker's stop channel, which it
-- answers on the list `ack` once it will start none.  Returns how many heard it.
local function tell_owner(id, ack)
  local owner = redis.call('HGET', k_state(id), 'owner')
  if not owner or not ack or ack == '' then return 0 end
  local wid = string.match(owner, '^(.+)/')
  if not wid then return 0 end
  return redis.call('PUBLISH', P .. ':stop:' .. wid, id .. ' ' .. ack)
end
local function entry_status(entry)
  if not entry then return nil end
  return string.match(entry, '^{"s":"(%a+)"')
end
-- Artifact references (see the module docstring): anchored matches, so a value
-- without one costs one failed comparison near its start.
local function entry_ref(entry)
  if not entry then return nil end
  return string.match(entry, '^{"s":"%a+","r":"([^"]+)"')
end
local function value_ref(value)
  if not value then return nil end
  return string.match(value, '^{"%$nbflow":"artifact","url":"([^"]+)"')
end
local function event_ref(ev)
  if not ev then return nil end
  return string.match(ev, '^{"type":"[%w_-]+","payload":{"%$nbflow":"artifact","url":"([^"]+)"')
end
local function ref_add(id, url)
  if not url then return end
  redis.call('HINCRBY', P .. ':' .. id .. ':artifacts', url, 1)
  redis.call('HINCRBY', P .. ':artifacts', url, 1)
end
-- one reference of instance `id` to `url` is gone; `gone` collects the URLs that
-- no reference names any more (their files are deleted by the caller)
local function ref_drop(id, url, gone)
  if not url then return end
  local mine = P .. ':' .. id .. ':artifacts'
  if redis.call('HINCRBY', mine, url, -1) <= 0 then redis.call('HDEL', mine, url) end
  local all = P .. ':artifacts'
  if redis.call('HINCRBY', all, url, -1) <= 0 then
    redis.call('HDEL', all, url)
    gone[#gone + 1] = url
  end
end
-- every reference of instance `id` is gone (it is being deleted)
local function refs_drop_all(id, gone)
  local mine = P .. ':' .. id .. ':artifacts'
  local held = redis.call('HGETALL', mine)
  local all = P .. ':artifacts'
  for i = 1, #held, 2 do
    if redis.call('HINCRBY', all, held[i], -tonumber(held[i + 1])) <= 0 then
      redis.call('HDEL', all, held[i])
      gone[#gone + 1] = held[i]
    end
  end
  redis.call('DEL', mine)
end
"""

# ARGV: prefix, now, now_iso, workflowName, retention ('' = keep), code version, then
# id, payload pairs. Returns one flag per id: 1 created, 0 already existed.
_CREATE = r"""
local now, now_iso, wf, retention, version = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local out, made = {}, 0
for i = 7, #ARGV, 2 do
  local id = ARGV[i]
  if new_instance(id, ARGV[i + 1], now, now_iso, wf, retention, version) then
    make_queued(id, now, now_iso, wf)
    out[#out + 1] = 1
    made = made + 1
  else
    out[#out + 1] = 0
  end
end
if made == 0 then return unchanged(out) end
return out
"""

# ARGV: as create, but groups of five after the version: id, payload, concurrency key
# ('' = none), priority ('' = 5), start time (epoch, '' = now).  Create with the options
# of spec 10.2 (``nbflow.limits``): the key and priority go into the metadata; an
# instance with a start time is `waiting` on {p}:timers until then (no RQ job: the
# housekeeper's wake_due queues it).  Returns one flag per id, as create.
_CREATE_OPTS = r"""
local now, now_iso, wf, retention, version = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local out, made = {}, 0
for i = 7, #ARGV, 5 do
  local id, ckey, prio, at = ARGV[i], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if new_instance(id, ARGV[i + 1], now, now_iso, wf, retention, version) then
    local meta = k_meta(id)
    if ckey ~= '' then redis.call('HSET', meta, 'concurrencyKey', ckey) end
    if prio ~= '' then redis.call('HSET', meta, 'priority', prio) end
    if at ~= '' then
      set_status(id, 'waiting', now_iso, now)
      redis.call('ZADD', P .. ':timers', at, id)
      hist(id, now, 'waiting', '"until":' .. at .. ',"start":true')
    else
      make_queued(id, now, now_iso, wf)
    end
    out[#out + 1] = 1
    made = made + 1
  else
    out[#out + 1] = 0
  end
end
if made == 0 then return unchanged(out) end
return out
"""

# ARGV: prefix, workflow, concurrency ('' = none), rate limit ('' = none), period
# seconds.  Replaces the stored limits of a workflow (none at all: deletes them),
# then admits held instances the new limits allow, in every scope of the workflow.
_SET_LIMITS = r"""
local wf, conc, rate, period = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = P .. ':limits:' .. wf
redis.call('DEL', key)
if conc ~= '' then redis.call('HSET', key, 'concurrency', conc) end
if rate ~= '' then redis.call('HSET', key, 'rate', rate, 'period', period) end
if conc ~= '' or rate ~= '' then redis.call('SADD', P .. ':listen', wf .. ':go') end
local lim = limits_of(wf)
local now = lua_now()
for _, scope in ipairs(redis.call('SMEMBERS', P .. ':heldscopes')) do
  if scope_wf(scope) == wf then pump(scope, lim, now) end
end
return 1
"""

# ARGV: prefix, now, limit.  The housekeeper's sweep: admits held instances whose slot
# is free (a limit raised, a slot freed by a script that had no reply to hand it on).
_PUMP_HELD = r"""
local now = tonumber(ARGV[2])
for _, scope in ipairs(redis.call('SRANDMEMBER', P .. ':heldscopes', tonumber(ARGV[3]))) do
  pump(scope, limits_of(scope_wf(scope)), now)
end
return 1
"""

# ARGV: prefix, source id, new id, now, now_iso, from_key ('' = every completed step),
# payload JSON ('' = the source's), retention ('' = keep), version ('' = the source's).
# A new queued instance of the source's workflow holding copies of the source's
# completed steps that started before from_key (by their order field), their start
# times kept (moved relative to the new creation time). The source is not touched.
# Returns {'ok', copied} or {'bad', 'unknown'} / {'exists'} / {'nostep', from_key}.
_FORK = r"""
local src, id, now, now_iso = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local from_key, payload, retention, version = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
if redis.call('EXISTS', k_state(src)) == 0 then return unchanged({'bad', 'unknown'}) end
if redis.call('EXISTS', k_state(id)) == 1 then return unchanged({'exists'}) end
local sk = k_steps(src)
local cut = nil
if from_key ~= '' then
  local target = redis.call('HGET', sk, from_key)
  if not target then return unchanged({'nostep', from_key}) end
  cut = tonumber(string.match(target, '"i":(%d+)'))
end
local meta = redis.call('HMGET', k_meta(src), 'workflowName', 'payload', 'version')
local wf = meta[1] or ''
if payload == '' then payload = meta[2] or 'null' end
if version == '' then version = meta[3] or '' end
local created = tonumber(redis.call('ZSCORE', P .. ':index:wf:' .. wf, src) or now)
local shift = created - tonumber(now)
local all = redis.call('HGETALL', sk)
local copied = 0
local dst = k_steps(id)
for i = 1, #all, 2 do
  local e = all[i + 1]
  local idx = tonumber(string.match(e, '"i":(%d+)'))
  if entry_status(e) == 'complete' and (cut == nil or idx < cut) then
    -- t0 comes before the result in an entry, so the first match is the field
    e = string.gsub(e, '"t0":(%-?[%d%.]+)', function(t)
      return '"t0":' .. string.format('%.3f', tonumber(t) + shift)
    end, 1)
    redis.call('HSET', dst, all[i], e)
    ref_add(id, entry_ref(e))  -- the copy refers to the same artifact file
    copied = copied + 1
  end
end
local st = k_state(id)
redis.call('HSET', st, 'createdAt', now_iso)
if copied > 0 then redis.call('HSET', st, 'stepsDone', copied) end
if retention ~= '' then redis.call('HSET', st, 'retention', retention) end
redis.call('HSET', k_meta(id), 'workflowName', wf, 'payload', payload, 'currentStep', '',
           'version', version)
redis.call('ZADD', P .. ':index:wf:' .. wf, now, id)
make_queued(id, now, now_iso)
hist(id, now, 'forked', '"from":' .. cjson.encode(src) .. ',"step":' .. cjson.encode(from_key))
return {'ok', copied}
"""

# ARGV: prefix, fingerprints key, step key, fingerprint (see Keys.fingerprints).
_NOTE_FINGERPRINT = "return redis.call('HSET', ARGV[2], ARGV[3], ARGV[4])"

# The claim of one instance (scripts claim and claim_job): {'ok', workflowName,
# payload, createdAt, steps...} or {status}.  The token is new for every claim, so
# finding it as the owner means this is the same claim resent (its reply was lost):
# it answers as the first time, writing nothing (a pause asked for meanwhile is the
# run's to apply, as ever).
_CLAIM_FUNCTIONS = r"""
local function claim_one(id, token, now, now_iso, lease)
  local st = k_state(id)
  local status = redis.call('HGET', st, 'status')
  if status ~= 'queued' then
    if status and not KNOWN[status] then return {corrupt_end(id, 'status', now, now_iso)} end
    if (status ~= 'running' and status ~= 'waitingForPause')
       or redis.call('HGET', st, 'owner') ~= token then
      return {status or 'unknown'}
    end
  end
  -- every read first: a failing read (a key of the wrong type) must abort the
  -- claim before anything is written, since Redis does not undo a failed script
  local meta = redis.call('HMGET', k_meta(id), 'workflowName', 'payload')
  local out = {'ok', meta[1] or '', meta[2] or '', redis.call('HGET', st, 'createdAt') or ''}
  local steps = redis.call('HGETALL', k_steps(id))
  for i = 1, #steps do out[#out + 1] = steps[i] end
  if status ~= 'queued' then return out end
  -- limits (spec 10.2): one HMGET for a workflow without them
  local lim = limits_of(out[2])
  if lim[1] or lim[2] then
    local why = limit_claim(id, out[2], lim, tonumber(now), #steps > 0)
    if why then return {why} end
  end
  set_status(id, 'running', now_iso)
  redis.call('HSET', st, 'owner', token)
  redis.call('HDEL', st, 'waitType', 'childDone')
  redis.call('ZREM', P .. ':ready:' .. out[2], id)
  redis.call('ZREM', P .. ':timers', id)
  redis.call('ZADD', P .. ':leases', lease, id)
  return out
end
"""

# ARGV: prefix, id, token, now, now_iso, lease_until.  Returns what claim_one does.
_CLAIM = "return claim_one(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])"

# ARGV: prefix, job key, job id, worker key, token base, now, now_iso, lease_until.
# A worker's first call for an RQ job it popped (``runner.take_job``): takes the job
# (the ids in its meta, written by ``Backend.enqueue``), deletes its hash, marks the
# worker busy and claims the job's first instance with token base .. ':0', all in
# the one round trip that used to only read the job.  Returns {meta JSON, the
# claim's reply} ({meta, {'error', message}} when a read of the claim failed: the
# job is taken all the same), {'prefix', theirs} for a job of another prefix,
# {'none'} for a job without nbflow's meta (the worker reads it the old way) and
# {'gone'} for no job at all.  The meta stays on the worker's hash while it runs
# the job, so a resend after a lost reply finds it there and claims with the
# same token (which claim_one knows as its own).
_CLAIM_JOB = r"""
local job, jid, worker, base = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local meta = redis.call('HGET', job, 'meta')
if meta then
  -- (a job of someone else's, with a meta of its own, is read the old way)
  local ok, taken = pcall(cjson.decode, meta)
  if not ok or type(taken) ~= 'table' or type(taken.nbflow) ~= 'string'
     or type(taken.ids) ~= 'table' or #taken.ids == 0 then
    return {'none'}
  end
  if taken.nbflow ~= P then return {'prefix', taken.nbflow} end
  redis.call('DEL', job)
  redis.call('HSET', worker, 'state', 'busy', 'current_job', jid, 'nbflow_job', meta)
elseif redis.call('HGET', worker, 'current_job') == jid then
  meta = redis.call('HGET', worker, 'nbflow_job')
  if not meta then return {'gone'} end
elseif redis.call('EXISTS', job) == 1 then
  return {'none'}
else
  return {'gone'}
end
local ids = cjson.decode(meta).ids
local ok, claim = pcall(claim_one, ids[1], base .. ':0', ARGV[6], ARGV[7], ARGV[8])
if not ok then
  if type(claim) == 'table' then claim = claim.err end
  claim = {'error', tostring(claim)}
end
return {meta, claim}
"""

# Child workflows (``step.run_workflow``, spec 10.1): how a child's end reaches its
# parent, and how terminate/restart cascade.  Before the step functions, since
# finish_run calls notify_parent.
_CHILD_FUNCTIONS = r"""
local function is_final(s) return s == 'complete' or s == 'errored' or s == 'terminated' end
local function k_children(id) return P .. ':' .. id .. ':children' end
-- The parent's step entry for a child that ended: its pending entry
-- ('{"s":"waiting","k":"workflow",...}', see nbflow.compose) with the outcome added:
-- the child's output, or its error (a terminated child: InvalidStateError).
local function child_entry(cur, cid, status, value, t0, now)
  local rest = string.sub(cur, 15, -2)
  local d = string.format('%.3f', math.max(0, tonumber(now) - (tonumber(t0) or tonumber(now))))
  if status == 'complete' then
    return '{"s":"complete"' .. rest .. ',"d":' .. d .. ',"v":' .. (value or 'null') .. '}'
  end
  if status == 'terminated' or not value then
    value = cjson.encode({name = 'InvalidStateError',
                          message = "child instance '" .. cid .. "' was " .. status})
  end
  return '{"s":"errored"' .. rest .. ',"d":' .. d .. ',"e":' .. value .. '}'
end
-- Stores a child's outcome in the parent's step entry if that still waits for it.
local function record_child(pid, pkey, cid, status, value, t0, now, now_iso)
  local sk = k_steps(pid)
  local cur = redis.call('HGET', sk, pkey)
  if entry_status(cur) ~= 'waiting' then return false end
  redis.call('HSET', sk, pkey, child_entry(cur, cid, status, value, t0, now))
  if status == 'complete' then redis.call('HINCRBY', k_state(pid), 'stepsDone', 1) end
  redis.call('HSET', k_state(pid), 'updatedAt', now_iso)
  return true
end
-- An instance became final: if it is a child of the parent's current generation, its
-- outcome goes into the parent's step entry, and a waiting parent is queued (returns
-- its id: the caller enqueues its RQ job); a parent still running gets `childDone`,
-- so its park re-queues it instead of waiting for an end that already came.
local function notify_parent(id, status, value, now, now_iso)
  local m = redis.call('HMGET', k_meta(id), 'parent', 'parentStep', 'parentGen', 'parentT0')
  if not m[1] then return nil end
  local pid = m[1]
  local pst = k_state(pid)
  local p = redis.call('HMGET', pst, 'status', 'gen')
  if not p[1] or is_final(p[1]) or (p[2] or '0') ~= (m[3] or '0') then return nil end
  -- (history() shows the child's end from the entry: "workflow.finished")
  if not record_child(pid, m[2], id, status, value, m[4], now, now_iso) then return nil end
  if p[1] == 'waiting' then
    redis.call('HDEL', pst, 'waitType')
    redis.call('ZREM', P .. ':timers', pid)
    make_queued(pid, now, now_iso)
    return pid
  end
  if p[1] == 'running' or p[1] == 'waitingForPause' then
    redis.call('HSET', pst, 'childDone', '1')
  end
  return nil
end
-- Ends an instance as terminated (the caller checked it is not final); returns how
-- many workers were told to stop its run (see tell_owner).
-- (`gone` collects the artifacts its buffered events referred to and no one else does)
local function terminate_instance(id, now, now_iso, ack, gone)
  local heard = tell_owner(id, ack)
  set_status(id, 'terminated', now_iso)
  release(id)
  finish_bookkeeping(id, now, 'terminated')
  redis.call('HSET', k_meta(id), 'currentStep', '')
  local types = P .. ':' .. id .. ':evtypes'
  local arts = redis.call('EXISTS', P .. ':' .. id .. ':artifacts') == 1
  for _, t in ipairs(redis.call('SMEMBERS', types)) do
    local ek = P .. ':' .. id .. ':events:' .. t
    if arts then
      for _, ev in ipairs(redis.call('LRANGE', ek, 0, -1)) do ref_drop(id, event_ref(ev), gone) end
    end
    redis.call('DEL', ek)
  end
  redis.call('DEL', types)
  hist(id, now, 'terminated', '')
  return heard
end
-- Terminates the non-final descendants of root (children, their children, ...);
-- with dropped_only, only those under children whose step in root is gone (a restart).
local function terminate_descendants(root, now, now_iso, ack, dropped_only, gone)
  local stack, seen = {root}, {[root] = true}
  while #stack > 0 do
    local cur = table.remove(stack)
    local kids = redis.call('HGETALL', k_children(cur))
    for i = 1, #kids, 2 do
      local cid, key = kids[i], kids[i + 1]
      local take = not seen[cid]
      if take and dropped_only and cur == root then
        take = redis.call('HEXISTS', k_steps(root), key) == 0
      end
      if take then
        seen[cid] = true
        local s = redis.call('HGET', k_state(cid), 'status')
        if s and not is_final(s) then terminate_instance(cid, now, now_iso, ack, gone) end
        stack[#stack + 1] = cid
      end
    end
  end
end
"""

# The step protocol's two writes, as functions so one script can do both (a
# step's result and the next step's start go out as one call).
#   step_start  ARGV[o..o+7]: id, token, now, now_iso, key, entry, step name, history
#     records that a step attempt starts, unless its entry is already final; it
#     is sent without waiting (pipelined), so the attempt is already under way:
#     under waitingForPause it is recorded too (whether a new step may start is
#     the worker's stop handshake, see tell_owner and nbflow.worker.StopListener)
#   step_finish ARGV[o..o+8]: id, token, now, now_iso, key, entry, final (1/0), event, history
#     stores a step's outcome (final, or a retry/wait record); a final entry is
#     never overwritten, so a late duplicate from a lost run changes nothing.
#     A pause the worker heard of is applied by its `checkpoint` call once all
#     the run's running steps are stored (parallel branches finish one by one);
#     only a pause no worker heard of (hardStop) is applied here
# Leases are renewed by the worker's heartbeat, not by every step.
_STEP_FUNCTIONS = r"""
local function step_start(o, checked)
  local id, token, now, now_iso = ARGV[o], ARGV[o + 1], ARGV[o + 2], ARGV[o + 3]
  local key, entry, name = ARGV[o + 4], ARGV[o + 5], ARGV[o + 6]
  if not checked then  -- (step_next: its step_finish just found the run owned)
    local why = check_owner(id, token, now, now_iso)
    if why == 'waitingForPause' and redis.call('HEXISTS', k_state(id), 'hardStop') == 1 then
      pause_now(id, now, now_iso)
      return 'paused'
    end
    if why ~= 'running' and why ~= 'waitingForPause' then return why end
  end
  local sk = k_steps(id)
  local s = entry_status(redis.call('HGET', sk, key))
  if s == 'complete' or s == 'errored' then return 'final' end
  redis.call('HSET', sk, key, entry)
  redis.call('HSET', k_meta(id), 'currentStep', name)
  return 'ok'
end
local function step_finish(o)
  local id, token, now, now_iso = ARGV[o], ARGV[o + 1], ARGV[o + 2], ARGV[o + 3]
  local key, entry, final, ev = ARGV[o + 4], ARGV[o + 5], ARGV[o + 6], ARGV[o + 7]
  local st = k_state(id)
  local status = check_owner(id, token, now, now_iso)
  if status ~= 'running' and status ~= 'waitingForPause' then return status end
  local sk = k_steps(id)
  local s = entry_status(redis.call('HGET', sk, key))
  if s == 'complete' or s == 'errored' then return 'final' end
  redis.call('HSET', sk, key, entry)
  if final == '1' and entry_status(entry) == 'complete' then
    if not count_step(st) then return corrupt_end(id, 'stepsDone', now, now_iso) end
    ref_add(id, entry_ref(entry))
  end
  redis.call('HSET', st, 'updatedAt', now_iso)
  if ev ~= 'step.finished' and ev ~= 'slept' then hist(id, now, ev, ARGV[o + 8]) end
  -- a pause the worker heard of is applied by its checkpoint, once every step of
  -- the run already running is stored; one it did not hear of, here
  if status == 'waitingForPause' and redis.call('HEXISTS', st, 'hardStop') == 1 then
    pause_now(id, now, now_iso)
    return 'paused'
  end
  return 'ok'
end
--   finish_run ARGV[o..o+6]: id, token, now, now_iso, outcome, value JSON, history
local function finish_run(o)
  local id, token, now, now_iso = ARGV[o], ARGV[o + 1], ARGV[o + 2], ARGV[o + 3]
  local outcome, value = ARGV[o + 4], ARGV[o + 5]
  local why = owned(id, token, now, now_iso)
  if why ~= 'running' then return why end
  if not retention_ok(id) then return corrupt_end(id, 'retention', now, now_iso) end
  local st = k_state(id)
  set_status(id, outcome, now_iso)
  release(id)
  if outcome == 'complete' then
    redis.call('HSET', st, 'output', value)
    ref_add(id, value_ref(value))
    local wf = redis.call('HGET', k_meta(id), 'workflowName')
    if wf then
      redis.call('HSET', P .. ':stepcount', wf, redis.call('HGET', st, 'stepsDone') or 0)
    end
  else
    redis.call('HSET', st, 'error', value)
  end
  redis.call('HSET', k_meta(id), 'currentStep', '')
  finish_bookkeeping(id, now, outcome, value)
  if outcome ~= 'complete' then hist(id, now, outcome, ARGV[o + 6]) end
  local woke = notify_parent(id, outcome, value, now, now_iso)
  if woke then return outcome .. ' ' .. woke end
  return outcome
end
"""
_STEP_START = "return step_start(2, false)"
_STEP_FINISH = "return step_finish(2)"
# ARGV: prefix, the 9 step_finish values, the 8 step_start values.
_STEP_NEXT = r"""
local f = step_finish(2)
return {f, step_start(11, f == 'ok')}
"""
# ARGV: prefix, id, token, now, now_iso. Where a run stands after a stop request:
# 'running' (go on: it was resumed meanwhile) or why it must stop; applies a
# pause that waits for no step any more.
_CHECKPOINT = "return owned(ARGV[2], ARGV[3], ARGV[4], ARGV[5])"

# ARGV: prefix, id, token, now, now_iso, wake_at ('' = none), wait types (",a,b," or ''),
# history, then key, entry pairs (pending entries recording each wait's deadline,
# so a replay waits only what is left). The run stops until a timer (sleep, event
# timeout, retry) or an event wakes it. An event that arrived since the run looked
# for it re-queues the instance at once instead, so no wake-up is ever lost.
_SUSPEND = r"""
local id, token, now, now_iso = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local wake_at, types = ARGV[6], ARGV[7]
local st = k_state(id)
local status = check_owner(id, token, now, now_iso)
if status ~= 'running' and status ~= 'waitingForPause' then return status end
local sk = k_steps(id)
for i = 9, #ARGV, 2 do
  local s = entry_status(redis.call('HGET', sk, ARGV[i]))
  if s ~= 'complete' and s ~= 'errored' then redis.call('HSET', sk, ARGV[i], ARGV[i + 1]) end
end
if status == 'waitingForPause' then
  pause_now(id, now, now_iso)
  return 'paused'
end
release(id)
if redis.call('HDEL', st, 'childDone') == 1 then  -- a child ended while the run went on
  make_queued(id, now, now_iso)
  return 'queued'
end
for t in string.gmatch(types, '[^,]+') do
  if redis.call('LLEN', P .. ':' .. id .. ':events:' .. t) > 0 then
    make_queued(id, now, now_iso)
    return 'queued'
  end
end
set_status(id, 'waiting', now_iso)
if ARGV[9] then
  redis.call('HSET', k_meta(id), 'currentStep', string.match(ARGV[9], '^(.*)#%d+$') or ARGV[9])
end
if types ~= '' then redis.call('HSET', st, 'waitType', types) end
if wake_at ~= '' then redis.call('ZADD', P .. ':timers', wake_at, id) end
hist(id, now, 'waiting', ARGV[8])
return 'waiting'
"""

# ARGV: prefix, id, token, now, now_iso, key, type, index, t0 (since creation), t0 epoch,
# position in the run ('' = none). Takes the oldest buffered event of the type into the
# step's entry, if any.
_TAKE_EVENT = r"""
local id, token, now, now_iso = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key, etype, idx, t0, t0_epoch = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local why = owned(id, token, now, now_iso)
if why ~= 'running' then return {why} end
local sk = k_steps(id)
local cur = redis.call('HGET', sk, key)
local s = entry_status(cur)
if s == 'complete' or s == 'errored' then return {'final', cur} end
local ev = redis.call('LPOP', P .. ':' .. id .. ':events:' .. etype)
if not ev then return {'none'} end
local st = k_state(id)
local d = string.format('%.3f', tonumber(now) - tonumber(t0_epoch))
local pos = ''
if ARGV[11] and ARGV[11] ~= '' then pos = ',"n":' .. ARGV[11] end
-- an artifact payload moves from the buffer into the entry: still one reference
local url = event_ref(ev)
local r = url and (',"r":"' .. url .. '"') or ''
local e = '{"s":"complete"' .. r .. ',"k":"event","i":' .. idx .. pos .. ',"t0":' .. t0 ..
          ',"d":' .. d .. ',"ty":"' .. etype .. '","v":' .. ev .. '}'
redis.call('HSET', sk, key, e)
if not count_step(st) then return {corrupt_end(id, 'stepsDone', now, now_iso)} end
redis.call('HSET', st, 'updatedAt', now_iso)
return {'event', e}
"""

# ARGV: prefix, id, type, event JSON, now, now_iso.
_SEND_EVENT = r"""
local id, etype, ev, now, now_iso = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local st = k_state(id)
local status = redis.call('HGET', st, 'status')
if not status then return unchanged('unknown') end
if status == 'complete' or status == 'errored' or status == 'terminated' then
  return unchanged(status)
end
redis.call('RPUSH', P .. ':' .. id .. ':events:' .. etype, ev)
redis.call('SADD', P .. ':' .. id .. ':evtypes', etype)
ref_add(id, event_ref(ev))
hist(id, now, 'event.sent', '"type":"' .. etype .. '"')
local waits = redis.call('HGET', st, 'waitType')
if status == 'waiting' and waits and (string.find(waits, ',' .. etype .. ',', 1, true)
                                       or not string.match(waits, '^,.+,$')) then
  redis.call('HDEL', st, 'waitType')
  redis.call('ZREM', P .. ':timers', id)
  make_queued(id, now, now_iso)
  return 'woken'
end
return 'buffered'
"""

# ARGV: prefix, now, now_iso, limit. Wakes waiting instances whose timer is due.
# Returns id, workflow, id, workflow, ...: each goes on its workflow's queue.
_WAKE_DUE = r"""
local now, now_iso = ARGV[2], ARGV[3]
local due = redis.call('ZRANGEBYSCORE', P .. ':timers', '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, id in ipairs(due) do
  redis.call('ZREM', P .. ':timers', id)
  local status = redis.call('HGET', k_state(id), 'status')
  if status == 'waiting' then
    redis.call('HDEL', k_state(id), 'waitType')
    local wf = make_queued(id, now, now_iso)
    hist(id, now, 'woke', '')
    out[#out + 1] = id
    out[#out + 1] = wf
  elseif status and not KNOWN[status] then
    corrupt_end(id, 'status', now, now_iso)
  end
end
-- held instances whose rate window has freed (spec 10.2): admitted onto {p}:go:{wf}
local rw = redis.call('ZRANGEBYSCORE', P .. ':ratewake', '-inf', now, 'LIMIT', 0, 100)
for _, scope in ipairs(rw) do
  redis.call('ZREM', P .. ':ratewake', scope)
  pump(scope, limits_of(scope_wf(scope)), tonumber(now))
end
if #out == 0 then return unchanged(out) end
return out
"""

# ARGV: prefix, now, now_iso, limit. Takes back instances whose runner stopped
# renewing its lease (a dead worker): running -> queued, waitingForPause -> paused.
# Returns id, workflow, ... of those queued again.
_REAP = r"""
local now, now_iso = ARGV[2], ARGV[3]
local dead = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, id in ipairs(dead) do
  local status = redis.call('HGET', k_state(id), 'status')
  release(id)
  if status == 'running' then
    local wf = make_queued(id, now, now_iso)
    hist(id, now, 'recovered', '')
    out[#out + 1] = id
    out[#out + 1] = wf
  elseif status == 'waitingForPause' then
    set_status(id, 'paused', now_iso)
  elseif status and not KNOWN[status] then
    corrupt_end(id, 'status', now, now_iso)
  end
end
if #out == 0 then return unchanged(out) end
return out
"""

# ARGV: prefix, older_than, now, limit, then workflow, rq queue keys pairs (the keys
# separated by spaces: its RQ queues of every priority and its {p}:go list).  For each
# workflow whose queues are all empty, its queued instances older than `older_than` have
# lost their job: hand them out again.  (A workflow whose queue is not empty waits
# for a worker that has it: its jobs are there.)  Returns id, workflow, ...
_ORPHANS = r"""
local out = {}
local limit = tonumber(ARGV[4])
for i = 5, #ARGV, 2 do
  local wf = ARGV[i]
  local empty = true
  for qk in string.gmatch(ARGV[i + 1], '%S+') do
    if empty and redis.call('LLEN', qk) > 0 then empty = false end
  end
  if empty then
    local ready = P .. ':ready:' .. wf
    local ids = redis.call('ZRANGEBYSCORE', ready, '-inf', ARGV[2], 'LIMIT', 0, limit)
    for _, id in ipairs(ids) do
      redis.call('ZADD', ready, ARGV[3], id)
      out[#out + 1] = id
      out[#out + 1] = wf
    end
  end
end
if #out == 0 then return unchanged(out) end
return out
"""

# ARGV: prefix, token, lease_until, id... Renews the leases the caller still owns.
_HEARTBEAT = r"""
local token, lease = ARGV[2], ARGV[3]
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', k_state(id), 'owner') == token then
    redis.call('ZADD', P .. ':leases', 'XX', lease, id)
  end
end
return 1
"""

# ARGV: prefix, id, token, now, now_iso, outcome, value JSON, history.
# Ends a run: complete/errored; a pause asked for meanwhile wins (paused, the
# output is recomputed from stored steps on resume).  See finish_run.
_FINISH = "return finish_run(2)"
# ARGV: prefix, the 9 step_finish values, the 7 finish_run values: a run's last
# step result and its end in one call.
_STEP_FINISH_THEN_FINISH = r"""
local f = step_finish(2)
if f ~= 'ok' then return f end
return finish_run(11)
"""

# ARGV: prefix, id, now, now_iso, error JSON. Ends an instance whose stored state
# cannot be read (damaged or hand-edited keys), whoever holds it: errored, with a
# message that says so, instead of failing every run for ever.
_FAIL = r"""
local id, now, now_iso, err = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local st = k_state(id)
local status = redis.call('HGET', st, 'status')
if not status then return 'unknown' end
if status == 'complete' or status == 'errored' or status == 'terminated' then return status end
set_status(id, 'errored', now_iso)
release(id)
redis.call('HSET', st, 'error', err)
finish_bookkeeping(id, now, 'errored', err)
hist(id, now, 'errored', '"error":' .. err)
local woke = notify_parent(id, 'errored', err, now, now_iso)
if woke then return 'errored ' .. woke end
return 'errored'
"""

# ARGV: prefix, id, token, now, now_iso. Gives an instance back to the queue
# (its worker is stopping); it goes on where it stopped on another run.
_RELEASE = r"""
local id, token, now, now_iso = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local why = owned(id, token, now, now_iso)
if why ~= 'running' then return why end
release(id)
make_queued(id, now, now_iso)
return 'queued'
"""

# ARGV: prefix, now, now_iso, then id, token pairs. Gives back the instances that the
# given runs still own (a worker that cannot run them, or a process shutting down):
# queued again where they stopped, the run's later writes refused (its token is
# gone).  Returns id, workflow, ... of those given back, to enqueue on their queues.
_HAND_BACK = r"""
local now, now_iso = ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if owned(id, ARGV[i + 1], now, now_iso) == 'running' then
    release(id)
    out[#out + 1] = id
    out[#out + 1] = make_queued(id, now, now_iso)
    hist(id, now, 'handed.back', '')
  end
end
return out
"""

# Lifecycle calls. ARGV: prefix, id, now, now_iso[, extra], ack key. Each returns
# {'ok', new_status, heard} or {'bad', current_status} (or {'bad', 'unknown'});
# `heard` counts the workers told to stop the instance's run (see tell_owner).
_PAUSE = r"""
local id, now, now_iso, ack = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local status = redis.call('HGET', k_state(id), 'status')
if not status then return unchanged({'bad', 'unknown'}) end
local new
if status == 'queued' or status == 'waiting' then
  new = 'paused'
  release(id)  -- (a held instance leaves its held set; a reserved slot goes on)
  redis.call('ZREM', P .. ':ready:' .. wf_of(id), id)
  redis.call('ZREM', P .. ':timers', id)
  redis.call('HDEL', k_state(id), 'waitType')
elseif status == 'running' then
  new = 'waitingForPause'
else
  return unchanged({'bad', status})
end
set_status(id, new, now_iso)
if new == 'paused' then hist(id, now, 'paused', '') else hist(id, now, 'pause.requested', '') end
local heard = 0
if new == 'waitingForPause' then
  heard = tell_owner(id, ack)
  -- no worker heard it (none holds the run, or its listener is away): the
  -- scripts enforce the pause themselves at the next start or finish
  if heard == 0 then redis.call('HSET', k_state(id), 'hardStop', '1') end
end
return {'ok', new, heard}
"""

# ARGV: prefix, id. A pause whose worker did not confirm it in time: the scripts
# apply it at the run's next start or finish.
_HARDEN = r"""
if redis.call('HGET', k_state(ARGV[2]), 'status') == 'waitingForPause' then
  redis.call('HSET', k_state(ARGV[2]), 'hardStop', '1')
end
return 1
"""

_RESUME = r"""
local id, now, now_iso = ARGV[2], ARGV[3], ARGV[4]
local status = redis.call('HGET', k_state(id), 'status')
if not status then return unchanged({'bad', 'unknown'}) end
local new
if status == 'paused' then
  new = 'queued'
  make_queued(id, now, now_iso)
elseif status == 'waitingForPause' then
  new = 'running'
  set_status(id, new, now_iso)
else
  return unchanged({'bad', status})
end
hist(id, now, 'resumed', '')
return {'ok', new}
"""

_TERMINATE = r"""
local id, now, now_iso, ack = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local st = k_state(id)
local status = redis.call('HGET', st, 'status')
if not status then return unchanged({'bad', 'unknown'}) end
if status == 'complete' or status == 'errored' or status == 'terminated' then
  return unchanged({'bad', status})
end
local gone = {}
local heard = terminate_instance(id, now, now_iso, ack, gone)
terminate_descendants(id, now, now_iso, ack, false, gone)
local out = {'ok', 'terminated', heard, notify_parent(id, 'terminated', nil, now, now_iso) or ''}
for _, url in ipairs(gone) do out[#out + 1] = url end
return out
"""

# ARGV: prefix, id, now, now_iso, from_key ('' = all), ack key. Keeps the entries of
# the steps that started before from_key (by their order field) and drops the rest.
_RESTART = r"""
local id, now, now_iso, from_key, ack = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local st = k_state(id)
local status = redis.call('HGET', st, 'status')
if not status then return unchanged({'bad', 'unknown'}) end
local sk = k_steps(id)
local done = 0
local gone = {}
local arts = redis.call('EXISTS', P .. ':' .. id .. ':artifacts') == 1
local lk, pk = k_logs(id), k_prog(id)
if from_key == '' then
  if arts then
    local all = redis.call('HVALS', sk)
    for i = 1, #all do ref_drop(id, entry_ref(all[i]), gone) end
  end
  redis.call('DEL', sk, lk, pk)
else
  local target = redis.call('HGET', sk, from_key)
  if not target then return unchanged({'nostep', from_key}) end
  local cut = tonumber(string.match(target, '"i":(%d+)'))
  if not cut then return {'badstep', from_key} end
  local all = redis.call('HGETALL', sk)
  for i = 1, #all, 2 do
    local s = entry_status(all[i + 1])
    local idx = tonumber(string.match(all[i + 1], '"i":(%d+)'))
    -- an entry nbflow cannot read is dropped: that step runs again
    if not idx or idx >= cut or (s ~= 'complete' and s ~= 'errored') then
      if arts then ref_drop(id, entry_ref(all[i + 1]), gone) end
      redis.call('HDEL', sk, all[i])
      redis.call('HDEL', lk, all[i])
      redis.call('HDEL', pk, all[i], '@last')
    elseif s == 'complete' then
      done = done + 1
    end
  end
  -- what run() wrote between steps after the cut is written again by the new run
  for _, f in ipairs(redis.call('HKEYS', lk)) do
    local at = string.match(f, '^#(%-?%d+)$')
    if at and tonumber(at) >= cut then redis.call('HDEL', lk, f) end
  end
end
if arts then ref_drop(id, value_ref(redis.call('HGET', st, 'output')), gone) end
terminate_descendants(id, now, now_iso, ack, true, gone)
local heard = tell_owner(id, ack)
release(id)
local gen = redis.pcall('HINCRBY', st, 'gen', 1)
if type(gen) == 'table' and gen.err then redis.call('HSET', st, 'gen', 1) end
if done > 0 then
  redis.call('HSET', st, 'stepsDone', done)
else
  redis.call('HDEL', st, 'stepsDone')
end
redis.call('HDEL', st, 'error', 'output', 'finishedAt', 'waitType', 'rollback', 'childDone')
redis.call('HSET', k_meta(id), 'currentStep', '')
redis.call('ZREM', P .. ':timers', id)
redis.call('ZREM', P .. ':expiry', id)
make_queued(id, now, now_iso)
hist(id, now, 'restarted', '"from":' .. cjson.encode(from_key))
local out = {'ok', 'queued', heard, ''}
for _, url in ipairs(gone) do out[#out + 1] = url end
return out
"""

# ARGV: prefix, now, limit. Deletes finished instances whose retention ran out.
# Returns {how many, URL of each artifact no reference names any more...}.
_PURGE = r"""
local ids = redis.call('ZRANGEBYSCORE', P .. ':expiry', '-inf', ARGV[2],
                      'LIMIT', 0, tonumber(ARGV[3]))
local gone = {}
for _, id in ipairs(ids) do
  refs_drop_all(id, gone)
  local st = k_state(id)
  local status = redis.call('HGET', st, 'status')
  local wf = redis.call('HGET', k_meta(id), 'workflowName')
  if status then redis.call('ZREM', P .. ':index:status:' .. status, id) end
  if wf then redis.call('ZREM', P .. ':index:wf:' .. wf, id) end
  local types = P .. ':' .. id .. ':evtypes'
  for _, t in ipairs(redis.call('SMEMBERS', types)) do
    redis.call('DEL', P .. ':' .. id .. ':events:' .. t)
  end
  redis.call('DEL', st, k_steps(id), k_meta(id), k_hist(id), types, k_logs(id), k_prog(id),
             P .. ':' .. id .. ':children')
  redis.call('ZREM', P .. ':expiry', id)
  if wf then redis.call('ZREM', P .. ':ready:' .. wf, id) end
end
local out = {#ids}
for _, url in ipairs(gone) do out[#out + 1] = url end
return out
"""

# ARGV: prefix, id, token, now, now_iso, key, step name, child id, workflow, payload,
# pending entry, t0 epoch, retention ('' = keep), code version.  ``step.run_workflow``: starts the
# child (recording parent, step and generation in its metadata) and the parent's
# pending step entry in one go.  Returns {'created'}, {'wait'} (this run's child
# exists already: a replay, or a crash after it started), {'final', entry} (the
# child has ended), {'cycle'} (the child would be the parent or one of its
# ancestors), {'exists'} (that id belongs to another instance), or {why}.
# A child left from before the parent was restarted is started afresh, same id.
_START_CHILD = r"""
local id, token, now, now_iso = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key, name, cid, wf, payload = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local pending, t0, retention, version = ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local why = owned(id, token, now, now_iso)
if why ~= 'running' then return {why} end
local sk = k_steps(id)
local cur = redis.call('HGET', sk, key)
local s = entry_status(cur)
if s == 'complete' or s == 'errored' then return {'final', cur} end
local up, depth = id, 0
while up and depth < 1000 do
  if up == cid then return {'cycle'} end
  up = redis.call('HGET', k_meta(up), 'parent')
  depth = depth + 1
end
local gen = redis.call('HGET', k_state(id), 'gen') or '0'
local cst, cmeta = k_state(cid), k_meta(cid)
local cstatus = redis.call('HGET', cst, 'status')
if cstatus then
  local m = redis.call('HMGET', cmeta, 'parent', 'parentStep', 'parentGen', 'parentT0',
                       'workflowName')
  if m[1] ~= id or m[2] ~= key then return {'exists'} end
  if (m[3] or '0') == gen then
    if s ~= 'waiting' then redis.call('HSET', sk, key, pending) end
    if is_final(cstatus) then
      local o = redis.call('HMGET', cst, 'output', 'error')
      local value = o[2]
      if cstatus == 'complete' then value = o[1] end
      record_child(id, key, cid, cstatus, value, m[4], now, now_iso)
      return {'final', redis.call('HGET', sk, key)}
    end
    return {'wait'}
  end
  -- started by an earlier generation of the parent: run it afresh, as restart() would
  redis.call('DEL', k_steps(cid))
  local types = P .. ':' .. cid .. ':evtypes'
  for _, t in ipairs(redis.call('SMEMBERS', types)) do
    redis.call('DEL', P .. ':' .. cid .. ':events:' .. t)
  end
  redis.call('DEL', types)
  release(cid)
  redis.call('HINCRBY', cst, 'gen', 1)
  redis.call('HDEL', cst, 'error', 'output', 'finishedAt', 'waitType', 'stepsDone', 'rollback',
             'childDone', 'hardStop')
  redis.call('ZREM', P .. ':timers', cid)
  redis.call('ZREM', P .. ':expiry', cid)
  if m[5] and m[5] ~= wf then
    redis.call('ZREM', P .. ':index:wf:' .. m[5], cid)
    redis.call('ZADD', P .. ':index:wf:' .. wf, now, cid)
  end
  hist(cid, now, 'restarted', '"by":"parent"')
else
  redis.call('HSET', cst, 'createdAt', now_iso)
  if retention ~= '' then redis.call('HSET', cst, 'retention', retention) end
  redis.call('ZADD', P .. ':index:wf:' .. wf, now, cid)
end
redis.call('HSET', cmeta, 'workflowName', wf, 'payload', payload, 'currentStep', '',
           'parent', id, 'parentStep', key, 'parentGen', gen, 'parentT0', t0,
           'version', version)
make_queued(cid, now, now_iso)
redis.call('HSET', k_children(id), cid, key)
redis.call('HSET', sk, key, pending)
redis.call('HSET', k_meta(id), 'currentStep', name)
return {'created'}
"""

# ARGV: prefix, id, token, now, now_iso, report JSON.  What the rollbacks of an errored
# run did ({"status", "steps"}, spec 10.4), stored just before its finish.
_ROLLBACK_REPORT = r"""
local why = check_owner(ARGV[2], ARGV[3])
if why ~= 'running' and why ~= 'waitingForPause' then return why end
redis.call('HSET', k_state(ARGV[2]), 'rollback', ARGV[6])
return 'ok'
"""

# ARGV: prefix, id, token, limit (bytes per field), then field, dropped, lines triples
# (``nbflow.capture.RunLog.take``).  Appends a run's captured lines to the instance's log,
# each field kept to `limit` bytes: the oldest lines go, and a first line
# {"dropped":N} counts them.  Sent in the same pipelined write as the step record it
# goes with; a run that no longer owns the instance appends nothing.
_LOG_APPEND = r"""
local id, token, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
local why = check_owner(id, token)
if why ~= 'running' and why ~= 'waitingForPause' then return why end
local lk = k_logs(id)
for i = 5, #ARGV, 3 do
  local field, dropped, body = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local cur = redis.call('HGET', lk, field)
  if cur then
    local n = string.match(cur, '^{"dropped":(%d+)}')
    if n then
      dropped = dropped + tonumber(n)
      local nl = string.find(cur, '\n', 1, true)
      cur = nl and string.sub(cur, nl + 1) or ''
    end
    if cur ~= '' then body = cur .. '\n' .. body end
  end
  if #body > limit then
    -- cut whole lines from the front: up to the first newline past the excess
    local nl = string.find(body, '\n', #body - limit, true)
    if nl then
      local _, cut = string.gsub(string.sub(body, 1, nl), '\n', '')
      dropped = dropped + cut
      body = string.sub(body, nl + 1)
    end
  end
  if dropped > 0 then body = '{"dropped":' .. dropped .. '}\n' .. body end
  redis.call('HSET', lk, field, body)
end
return 'ok'
"""

# ARGV: prefix, id, token, then key, seq, progress JSON triples.  Stores the steps'
# latest progress (SPEC 8.4); a value older (by seq) than the stored one is ignored,
# since the worker's background flusher and the run's own writes use two connections.
_PROGRESS = r"""
local id, token = ARGV[2], ARGV[3]
local why = check_owner(id, token)
if why ~= 'running' and why ~= 'waitingForPause' then return why end
local pk = k_prog(id)
local last = redis.call('HGET', pk, '@last')
local top = last and tonumber(string.match(last, '^{"q":(%d+)')) or -1
local newest
for i = 4, #ARGV, 3 do
  local cur = redis.call('HGET', pk, ARGV[i])
  local q, seq = cur and tonumber(string.match(cur, '^{"q":(%d+)')), tonumber(ARGV[i + 1])
  if not q or q < seq then
    redis.call('HSET', pk, ARGV[i], ARGV[i + 2])
    if seq > top then top, newest = seq, i end
  end
end
if newest then  -- what a card shows: the newest report, with its step key
  local v = string.sub(ARGV[newest + 2], 1, -2) .. ',"k":' .. cjson.encode(ARGV[newest]) .. '}'
  redis.call('HSET', pk, '@last', v)
end
return 'ok'
"""

# KEYS[1]: a request key of the push's own (optional); ARGV: prefix, then RQ's
# commands, each as its argument count and its arguments.  Pushes RQ jobs once per
# request (jobs that go with a call ride in that call's KEYS instead: ``_ONCE_TAIL``).
# Returns 1 if it pushed, 0 if not.
_JOBS_ONCE = r"""
local req = KEYS[1]
if req and not redis.call('SET', req, '1', 'NX', 'EX', REQUEST_TTL) then return 0 end
run_commands(ARGV, 2)
return 1
"""

# The exactly-once wrapper of the scripts named in ONCE (see the module docstring):
# with a request key as KEYS[1], the first run's reply is stored there and a resend
# gets it back without running again; without one the script runs as it is.
# A body returns ``unchanged(reply)`` when it changed nothing (a refusal, a sweep that
# found nothing): no key is kept then (a refused call leaves nothing behind), and a
# resend runs again, harmlessly, and finds the same.
_ONCE_HEAD = r"""
local function once_body()
"""
_ONCE_TAIL = r"""
end
local req = KEYS[1]
if not req then return once_body() end
local seen = redis.call('GET', req)
if seen then return cmsgpack.unpack(seen) end
local reply = once_body()
if once_keep then
  redis.call('SET', req, cmsgpack.pack(reply), 'EX', REQUEST_TTL)
  -- the call's RQ jobs (``Scripts.execute``): RQ's commands in KEYS[2..], each as its
  -- argument count and its arguments, pushed by this first run only, and only when
  -- it changed something (a resend or a refusal pushes none)
  run_commands(KEYS, 2)
end
return reply
"""

#: Scripts that take a request key (``KEYS[1]``) and answer a resend from it.  The
#: hot path's step scripts are not here: they are never resent (``ScriptStream``).
#: Their bodies may return ``unchanged(reply)`` (see ``_ONCE_HEAD``).
ONCE = frozenset(
    {
        "create",
        "create_opts",
        "fork",
        "schedule_put",
        "schedule_trigger",
        "schedule_backfill",
        "schedule_pause",
        "schedule_resume",
        "schedule_delete",
        "send_event",
        "pause",
        "resume",
        "terminate",
        "restart",
        "wake_due",
        "reap",
        "orphans",
    }
)


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEFINES = re.compile(r"^local\s+(?:function\s+([A-Za-z_]\w*)|([\w\s,]+?)\s*=)", re.M)


def _definitions(library: str) -> list[tuple[frozenset[str], str, frozenset[str]]]:
    """The library's top-level definitions in order, each as (the names it defines, its
    text with the comment above it, the words it uses).  Every top-level line of the
    library is a ``local`` definition, its ``end``, or a comment; anything indented
    continues the definition above."""
    chunks: list[list[str]] = []
    comment: list[str] = []
    for line in library.splitlines(keepends=True):
        if line.startswith("--"):
            comment.append(line)
        elif line.startswith("local"):
            chunks.append([*comment, line])
            comment = []
        elif chunks:
            chunks[-1].append(line)
    out = []
    for lines in chunks:
        text = "".join(lines)
        m = _DEFINES.search(text)
        if m is None:
            raise ValueError(f"not a definition: {text[:60]!r}")
        names = m.group(1) or m.group(2)
        defined = frozenset(n.strip() for n in names.split(","))
        out.append((defined, text, frozenset(_WORD.findall(text)) - defined))
    return out


_LIBRARY = _definitions(_PRELUDE + _CHILD_FUNCTIONS + _STEP_FUNCTIONS + _CLAIM_FUNCTIONS)


def _source(name: str, body: str) -> str:
    """A script's full text: the shared definitions it uses, then its body (wrapped if in
    ONCE).

    Only what the body uses, directly or through another definition, goes in: Redis
    runs a script's whole text on every call, and the ~50 shared functions cost about
    10 us a call to define (a step pays that twice), against about 1 us for the few a
    script needs.  Definitions refer only to earlier ones, so one pass from the last
    back finds them all; a word that merely looks like a name costs an unused
    definition, never a missing one."""
    if name in ONCE:
        body = _ONCE_HEAD + body + _ONCE_TAIL
    needed = set(_WORD.findall(body))
    kept: list[str] = []
    for defined, text, uses in reversed(_LIBRARY):
        if defined & needed:
            kept.append(text)
            needed |= uses
    text = "".join(reversed(kept)) + body
    return text.replace("REQUEST_TTL", str(REQUEST_TTL))


_SOURCES = {
    "create": _CREATE,
    "create_opts": _CREATE_OPTS,
    "set_limits": _SET_LIMITS,
    "pump_held": _PUMP_HELD,
    "fork": _FORK,
    "note_fingerprint": _NOTE_FINGERPRINT,
    "claim": _CLAIM,
    "claim_job": _CLAIM_JOB,
    "step_start": _STEP_START,
    "step_finish": _STEP_FINISH,
    "step_next": _STEP_NEXT,
    "checkpoint": _CHECKPOINT,
    "suspend": _SUSPEND,
    "take_event": _TAKE_EVENT,
    "send_event": _SEND_EVENT,
    "wake_due": _WAKE_DUE,
    "reap": _REAP,
    "orphans": _ORPHANS,
    "heartbeat": _HEARTBEAT,
    "finish": _FINISH,
    "step_finish_then_finish": _STEP_FINISH_THEN_FINISH,
    "release": _RELEASE,
    "hand_back": _HAND_BACK,
    "fail": _FAIL,
    "pause": _PAUSE,
    "harden": _HARDEN,
    "resume": _RESUME,
    "terminate": _TERMINATE,
    "restart": _RESTART,
    "purge": _PURGE,
    "start_child": _START_CHILD,
    "rollback_report": _ROLLBACK_REPORT,
    "log_append": _LOG_APPEND,
    "progress": _PROGRESS,
    "jobs_once": _JOBS_ONCE,
}


# -- schedules (``nbflow.schedules``) --------------------------------------------------
# A tick is fired by whichever housekeeper claims it: `schedule_due` hands each due
# schedule to one caller (a claim token, and its score moved to the claim's expiry, so
# other housekeepers skip it meanwhile); `schedule_fire` then advances the schedule to
# its next tick and creates the tick's instance, in one script, only while the claim
# holds (a pause, update or delete in between drops the claim).  The instance is written
# by the very `create` script above (wrapped as a function), so a scheduled instance is
# created exactly as `Workflow.create` creates one; the caller sends the RQ job in the
# same MULTI/EXEC.  Its id is derived from the tick, so even a claim that expired
# (a housekeeper stalled for CLAIM_SECONDS) cannot create a second instance.
_SCHEDULE_FUNCTIONS = (
    r"""
local function k_sched(name) return P .. ':schedule:' .. name end
local function sched_hist(name, now, ev, extra)
  local e = '{"t":' .. now .. ',"ev":"' .. ev .. '"'
  if extra and extra ~= '' then e = e .. ',' .. extra end
  local hk = k_sched(name) .. ':history'
  redis.call('RPUSH', hk, e .. '}')
  redis.call('LTRIM', hk, -200, -1)
end
local function create_script(ARGV)
"""
    + _CREATE
    + r"""
end
-- creates instance `iid` of the schedule's workflow with its params: 1, or 0 if it exists
-- (create's "changed nothing" is about that one id, not the calling script: kept as it was)
local function sched_create(key, iid, now, now_iso)
  local f = redis.call('HMGET', key, 'workflow', 'params', 'retention', 'version')
  local keep = once_keep
  local args = {P, now, now_iso, f[1], f[3] or '', f[4] or '', iid, f[2] or 'null'}
  local made = create_script(args)[1]
  once_keep = keep
  return made
end
"""
)

# ARGV: prefix, name, workflow, cron, timezone, overlap, params, retention, next_tick,
# now, now_iso, version (of the workflow's class where it is scheduled, for its
# instances' metadata).  Creates or updates a schedule; an update that keeps cron and time zone
# keeps the tick it waits for (re-running a notebook cell loses no tick).  A paused
# schedule stays paused.  Returns 'created' or 'updated'.
_SCHEDULE_PUT = r"""
local name, wf, cron, tz, overlap = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local params, retention, nxt, now, now_iso = ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local version = ARGV[12] or ''
local key = k_sched(name)
local old = redis.call('HMGET', key, 'cron', 'timezone', 'nextTick', 'paused')
local result = 'created'
if old[1] then
  result = 'updated'
  if old[1] == cron and old[2] == tz and old[3] then nxt = old[3] end
else
  redis.call('HSET', key, 'createdAt', now_iso, 'paused', '0', 'fired', 0, 'skipped', 0,
             'missed', 0, 'triggered', 0, 'backfilled', 0)
end
redis.call('HSET', key, 'workflow', wf, 'cron', cron, 'timezone', tz, 'overlap', overlap,
           'params', params, 'retention', retention, 'nextTick', nxt, 'updatedAt', now_iso,
           'version', version)
redis.call('HDEL', key, 'claim')
if old[4] == '1' then
  redis.call('ZADD', P .. ':schedules', '+inf', name)
else
  redis.call('ZADD', P .. ':schedules', nxt, name)
end
sched_hist(name, now, result, '"cron":' .. cjson.encode(cron) .. ',"timezone":' .. cjson.encode(tz))
return result
"""

# ARGV: prefix, now, token, claim_until, limit.  Claims the schedules whose tick is due
# for the caller and returns {earliest score or '', {name, workflow, cron, timezone,
# overlap, nextTick, lastInstance, its status}, ...}.  With no schedule at all it reads
# two empty keys: what every housekeeper pays for schedules nobody uses.
_SCHEDULE_DUE = r"""
local now, token, claim_until, limit = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local zk = P .. ':schedules'
local due = redis.call('ZRANGEBYSCORE', zk, '-inf', now, 'LIMIT', 0, limit)
local out = {''}
for _, name in ipairs(due) do
  local key = k_sched(name)
  local f = redis.call('HMGET', key, 'workflow', 'cron', 'timezone', 'overlap', 'nextTick',
                       'lastInstance', 'paused')
  if not f[1] or not f[5] then
    redis.call('ZREM', zk, name)
  elseif f[7] == '1' then
    redis.call('ZADD', zk, '+inf', name)
  else
    redis.call('ZADD', zk, claim_until, name)
    redis.call('HSET', key, 'claim', token)
    local last = ''
    if f[6] then last = redis.call('HGET', k_state(f[6]), 'status') or '' end
    out[#out + 1] = {name, f[1], f[2], f[3], f[4], f[5], f[6] or '', last}
  end
end
local first = redis.call('ZRANGE', zk, 0, 0, 'WITHSCORES')
if first[2] then out[1] = first[2] end
return out
"""

# ARGV: prefix, name, token, action ('fire' | 'miss'), tick, next_tick, instance id, now,
# now_iso, may_create ('1' when the caller sends the RQ job in the same transaction).
# While the caller's claim holds: 'miss' records a tick nobody fired in time; 'fire'
# skips the tick if overlap is 'skip' and the last instance is not finished, else
# creates the tick's instance (or finds it made already, by a backfill).  Either way
# the schedule moves on to next_tick.  Returns 'created', 'exists', 'skipped',
# 'missed', 'lost' (no claim: nothing written) or 'retry' (it would create, but
# may_create is '0': nothing written).
_SCHEDULE_FIRE = r"""
local name, token, action, tick, nxt, iid = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local now, now_iso, may_create = ARGV[8], ARGV[9], ARGV[10]
local key = k_sched(name)
local f = redis.call('HMGET', key, 'claim', 'overlap', 'lastInstance')
if f[1] ~= token then return 'lost' end
local result
if action == 'miss' then
  redis.call('HINCRBY', key, 'missed', 1)
  sched_hist(name, now, 'missed', '"tick":' .. tick .. ',"next":' .. nxt)
  result = 'missed'
else
  local blocked = false
  if f[2] == 'skip' and f[3] then
    local s = redis.call('HGET', k_state(f[3]), 'status')
    blocked = s and s ~= 'complete' and s ~= 'errored' and s ~= 'terminated'
  end
  if blocked then
    redis.call('HINCRBY', key, 'skipped', 1)
    sched_hist(name, now, 'skipped', '"tick":' .. tick .. ',"running":' .. cjson.encode(f[3]))
    result = 'skipped'
  elseif may_create ~= '1' then
    return 'retry'
  else
    local made = sched_create(key, iid, now, now_iso)
    local extra = ''
    if made == 1 then
      result = 'created'
      redis.call('HINCRBY', key, 'fired', 1)
    else
      result = 'exists'
      extra = ',"existed":true'
    end
    redis.call('HSET', key, 'lastTick', tick, 'lastInstance', iid)
    sched_hist(name, now, 'fired', '"tick":' .. tick .. ',"instance":"' .. iid .. '"' .. extra)
  end
end
redis.call('HSET', key, 'nextTick', nxt)
redis.call('HDEL', key, 'claim')
redis.call('ZADD', P .. ':schedules', nxt, name)
return result
"""

# ARGV: prefix, name, instance id, now, now_iso.  One instance now (`trigger()`).
# Returns 'created', 'exists' (that id is taken) or 'unknown' (no such schedule).
_SCHEDULE_TRIGGER = r"""
local name, iid, now, now_iso = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = k_sched(name)
if redis.call('EXISTS', key) == 0 then return unchanged('unknown') end
if sched_create(key, iid, now, now_iso) ~= 1 then return unchanged('exists') end
redis.call('HINCRBY', key, 'triggered', 1)
redis.call('HSET', key, 'lastInstance', iid)
sched_hist(name, now, 'triggered', '"instance":"' .. iid .. '"')
return 'created'
"""

# ARGV: prefix, name, now, now_iso, then instance ids.  Creates the instances of past
# ticks (`backfill()`): {'ok', flag per id (1 created, 0 existed)} or {'unknown'}.
_SCHEDULE_BACKFILL = r"""
local name, now, now_iso = ARGV[2], ARGV[3], ARGV[4]
local key = k_sched(name)
if redis.call('EXISTS', key) == 0 then return unchanged({'unknown'}) end
local flags, made = {}, 0
for i = 5, #ARGV do
  flags[#flags + 1] = sched_create(key, ARGV[i], now, now_iso)
  made = made + flags[#flags]
end
redis.call('HINCRBY', key, 'backfilled', made)
sched_hist(name, now, 'backfilled', '"created":' .. made)
return {'ok', flags}
"""

# ARGV: prefix, name, now. Returns 'paused' or 'unknown'.
_SCHEDULE_PAUSE = r"""
local name, now = ARGV[2], ARGV[3]
local key = k_sched(name)
if redis.call('EXISTS', key) == 0 then return 'unknown' end
if redis.call('HGET', key, 'paused') ~= '1' then
  redis.call('HSET', key, 'paused', '1')
  redis.call('HDEL', key, 'claim')
  redis.call('ZADD', P .. ':schedules', '+inf', name)
  sched_hist(name, now, 'paused', '')
end
return 'paused'
"""

# ARGV: prefix, name, next_tick, now.  A paused schedule waits for its next tick from
# now on (the ticks it slept through are not made up).  Returns 'active' or 'unknown'.
_SCHEDULE_RESUME = r"""
local name, nxt, now = ARGV[2], ARGV[3], ARGV[4]
local key = k_sched(name)
if redis.call('EXISTS', key) == 0 then return 'unknown' end
if redis.call('HGET', key, 'paused') == '1' then
  redis.call('HSET', key, 'paused', '0', 'nextTick', nxt)
  redis.call('HDEL', key, 'claim')
  redis.call('ZADD', P .. ':schedules', nxt, name)
  sched_hist(name, now, 'resumed', '')
end
return 'active'
"""

# ARGV: prefix, name. Returns 1 if it existed. Its instances are left alone.
_SCHEDULE_DELETE = r"""
local key = k_sched(ARGV[2])
redis.call('ZREM', P .. ':schedules', ARGV[2])
return redis.call('DEL', key, key .. ':history') > 0 and 1 or 0
"""

_SCHEDULE_SOURCES = {
    "schedule_put": _SCHEDULE_PUT,
    "schedule_due": _SCHEDULE_DUE,
    "schedule_fire": _SCHEDULE_FIRE,
    "schedule_trigger": _SCHEDULE_TRIGGER,
    "schedule_backfill": _SCHEDULE_BACKFILL,
    "schedule_pause": _SCHEDULE_PAUSE,
    "schedule_resume": _SCHEDULE_RESUME,
    "schedule_delete": _SCHEDULE_DELETE,
}
_SOURCES.update({name: _SCHEDULE_FUNCTIONS + body for name, body in _SCHEDULE_SOURCES.items()})


class Scripts:
    """The Lua scripts registered on one Redis client.

    Called directly (``scripts.claim(args=[...])``) they go through redis-py's
    ``Script`` (EVALSHA, loading on NOSCRIPT).  Inside a MULTI pipeline use
    ``execute`` instead: redis-py's own pipeline support asks ``SCRIPT EXISTS``
    on every execute, one extra round trip on every create and lifecycle call.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, Any] = {
            name: client.register_script(_source(name, body)) for name, body in _SOURCES.items()
        }

    def __getattr__(self, name: str) -> Any:
        try:
            return self._scripts[name]
        except KeyError:
            raise AttributeError(name) from None

    def pipeline(self, calls: list[tuple[str, list[str]]]) -> list[Any]:
        """Run scripts in one non-transactional pipeline (each script is atomic by
        itself); replies come back in order, an error as an exception value.  Calls
        that met an empty script cache are sent again once the scripts are loaded (up to
        ``NOSCRIPT_ATTEMPTS`` times: a cache flushed again meanwhile is loaded again)."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(1, NOSCRIPT_ATTEMPTS + 1):
            pipe = self._client.pipeline(transaction=False)
            for n in todo:
                name, args = calls[n]
                pipe.evalsha(self._scripts[name].sha, 0, *args)
            results = pipe.execute(raise_on_error=False)
            missing = []
            for n, res in zip(todo, results, strict=True):
                if isinstance(res, redis.exceptions.NoScriptError) and attempt < NOSCRIPT_ATTEMPTS:
                    missing.append(n)
                else:
                    replies[n] = res
            if not missing:
                break
            for script in self._scripts.values():
                self._client.script_load(script.script)
            todo = missing
        return replies

    def execute(
        self, calls: list[tuple[str, list[str]]], extra: Any = None, once: str | None = None
    ) -> list[Any]:
        """Run scripts (and whatever ``extra(pipe)`` adds) in one MULTI/EXEC.

        Returns the scripts' replies.  With ``once`` (a request key, ``Keys.request``)
        the transaction is exactly-once: the first script (in ``ONCE``) gets it as
        its request key, the others ``once:2``, ``once:3``..., and what ``extra``
        adds (RQ's enqueue commands) is captured and pushed by the first script
        (``_ONCE_TAIL``), only if it ran now and changed something: a resent
        transaction changes nothing and pushes no second job, a refused call pushes
        none (with no script, ``jobs_once`` pushes them once).  If Redis lost its
        script cache (a restart) the scripts are loaded and the transaction is sent
        again; what of the first try was applied is not applied twice (without
        ``once``, what ``extra`` added is pushed again, which must be harmless).
        """
        for attempt in range(1, NOSCRIPT_ATTEMPTS + 1):
            pipe = self._client.pipeline()
            pipe.multi()
            jobs = [] if extra is None or once is None else self.captured(extra)
            for n, (name, args) in enumerate(calls):
                if once is None:
                    pipe.evalsha(self._scripts[name].sha, 0, *args)
                elif n == 0:  # its jobs ride along in its KEYS (see _ONCE_TAIL)
                    pipe.evalsha(self._scripts[name].sha, 1 + len(jobs), once, *jobs, *args)
                else:
                    pipe.evalsha(self._scripts[name].sha, 1, f"{once}:{n + 1}", *args)
            if jobs and not calls:
                assert once is not None
                pipe.evalsha(self._scripts["jobs_once"].sha, 1, once, "", *jobs)
            if extra is not None and once is None:
                extra(pipe)
            try:
                return list(pipe.execute()[: len(calls)])
            except redis.exceptions.NoScriptError:
                if attempt == NOSCRIPT_ATTEMPTS:
                    raise
                for script in self._scripts.values():
                    self._client.script_load(script.script)
        raise AssertionError("unreachable")

    def push_jobs(self, extra: Callable[[Any], None], once: str) -> bool:
        """Pushes the RQ jobs ``extra(pipe)`` enqueues, once for request key ``once``
        (a resend after a lost reply pushes nothing).  Returns whether it pushed."""
        jobs = self.captured(extra)
        if not jobs:
            return False
        return bool(self._scripts["jobs_once"](keys=[once], args=["", *jobs]))

    def captured(self, extra: Callable[[Any], None]) -> list[Any]:
        """The commands ``extra(pipe)`` adds to a pipeline (never sent), flattened for
        ``jobs_once``: each as its argument count, then its arguments.  They stay as
        redis-py got them: the script call encodes them as the pipeline would have."""
        pipe = self._client.pipeline(transaction=False)
        extra(pipe)
        flat: list[Any] = []
        for args, _ in pipe.command_stack:
            flat.append(len(args))
            flat.extend(args)
        pipe.reset()
        return flat


class ScriptStream:
    """Script calls sent without waiting for their replies, on a connection of its own.

    The step protocol's writes go out this way: a step's record is on its way to
    Redis before the next step's callback starts (so a crash loses nothing but
    the interrupted step), yet no step waits a round trip for it.  Each call
    names a handler that gets its reply (or the error) when replies are read:
    ``poll`` reads what has arrived, ``drain`` everything still owed.  A reply of
    ``NOSCRIPT`` (Redis lost its script cache) loads the scripts and sends that
    call again; replies keep their order, so every call after it is resent too.
    """

    def __init__(self, scripts: Scripts) -> None:
        self._scripts = scripts
        self._pool = scripts._client.connection_pool
        self._conn: Any = None
        self._owed: deque[tuple[str, list[str], Callable[[Any], None]]] = deque()
        #: when Redis last answered every call sent so far (time.monotonic())
        self.settled_at = time.monotonic()

    def send(self, calls: list[tuple[str, list[str], Callable[[Any], None]]]) -> None:
        """Writes ``calls`` to the socket in one go; raises ``redis.RedisError`` if
        Redis cannot be reached (nothing of them is owed then)."""
        if self._conn is None:
            self._conn = self._pool.get_connection()
        shas = self._scripts._scripts
        packed = [_pack("EVALSHA", shas[name].sha, "0", *args) for name, args, _ in calls]
        try:
            self._conn.send_packed_command([b"".join(packed)], check_health=False)
        except BaseException:
            self._lost()
            raise
        self._owed.extend(calls)

    def poll(self) -> None:
        """Reads the replies that have arrived, without waiting for more."""
        while self._owed:
            try:
                ready = self._conn.can_read(timeout=0)
            except BaseException:  # the connection closed: Redis went away
                self._lost()
                raise
            if not ready:
                return
            self._read_one()

    def drain(self) -> None:
        """Reads every reply still owed (waits for them)."""
        while self._owed:
            self._read_one()

    def _read_one(self) -> None:
        try:
            reply = self._conn.read_response()
        except redis.exceptions.NoScriptError:
            name, args, handler = self._owed.popleft()
            for script in self._scripts._scripts.values():
                self._resend_after_load(script)
            self.send([(name, args, handler)])
            return
        except redis.exceptions.ResponseError as exc:
            reply = exc
        except BaseException:
            self._lost()
            raise
        self._owed.popleft()[2](reply)
        if not self._owed:
            self.settled_at = time.monotonic()

    def _resend_after_load(self, script: Any) -> None:
        # SCRIPT LOAD on this connection, behind the calls still owed (they were
        # sent before it and fail the same way, so they are resent in order too)
        self._conn.send_packed_command([_pack("SCRIPT", "LOAD", script.script)], check_health=False)
        self._owed.append(("", [], _ignore))

    def _lost(self) -> None:
        """The connection failed: every owed call's handler gets the error."""
        owed, self._owed = self._owed, deque()
        if self._conn is not None:
            self._conn.disconnect()
        err = redis.ConnectionError("connection to Redis lost before the reply")
        for _, _, handler in owed:
            handler(err)

    def close(self) -> None:
        """Reads what is owed and gives the connection back to the pool."""
        if self._conn is None:
            return
        try:
            self.drain()
        finally:
            conn, self._conn = self._conn, None
            self._pool.release(conn)


def _pack(*parts: str) -> bytes:
    """One command in Redis's wire format (hiredis's packer: C, not Python)."""
    packed: bytes = hiredis.pack_command(parts)  # type: ignore[arg-type]  # its stub wants 1-tuples
    return packed


def _ignore(reply: Any) -> None:
    """The reply of a call nobody waits for (a script load)."""
