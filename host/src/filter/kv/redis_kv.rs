//! Filter KV in Redis: one namespace per filter, shared by every replica.
//!
//! Layout, under `[redis] prefix` (`P`), for filter `F` and its key `K`:
//!
//! - `P kv:{F}:K` — the value (a Redis string; TTL as `PX`);
//! - `P kvidx:{F}` — a sorted set of the namespace's keys, scored by
//!   expiry (ms since the epoch, `+inf` for none): it bounds the entries
//!   (`MAX_ENTRIES`, expired ones swept when full) as the local store does.
//!
//! The `{F}` hash tag keeps a namespace's keys in one Redis Cluster slot.
//! Writes run as Lua scripts, so increment, compare-and-swap and the entry
//! bound are atomic on the server; time comes from Redis (`TIME`), one
//! clock for the fleet.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;

use super::{MAX_ENTRIES, MAX_ENTRY_BYTES};
use crate::config::KvOnError;
use crate::fleet::{Op, RedisError, RedisLink};

/// Shared by the scripts: `now` in ms from Redis's clock, and `room`, which
/// says whether `member` may be written (already there, or the namespace
/// below its bound after sweeping expired keys), and `store`, which writes
/// the value with its TTL and indexes it.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function room(idx, member, max)
  if redis.call('ZSCORE', idx, member) then return true end
  if redis.call('ZCARD', idx) < max then return true end
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', string.format('%d', now))
  return redis.call('ZCARD', idx) < max
end
local function store(key, idx, member, value, ttl)
  if ttl == '' then
    redis.call('SET', key, value)
    redis.call('ZADD', idx, '+inf', member)
  elseif ttl == '0' then
    redis.call('DEL', key)
    redis.call('ZREM', idx, member)
  else
    redis.call('SET', key, value, 'PX', ttl)
    redis.call('ZADD', idx, string.format('%d', now + tonumber(ttl)), member)
  end
end
"#;

/// KEYS: value, index. ARGV: value, ttl ('' = none), member, max. → 1 | 0.
const SET: &str = r#"
if not room(KEYS[2], ARGV[3], tonumber(ARGV[4])) then return 0 end
store(KEYS[1], KEYS[2], ARGV[3], ARGV[1], ARGV[2])
return 1
"#;

/// KEYS: value, index. ARGV: member. → 1 if a live value was removed.
const DELETE: &str = r#"
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return n
"#;

/// KEYS: value, index. ARGV: delta, ttl, member, max.
/// → {1, "new value"} | {0, "why"}.
const INCREMENT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  if not string.match(cur, '^-?%d+$') then return {0, 'not an integer'} end
  local ok, v = pcall(redis.call, 'INCRBY', KEYS[1], ARGV[1])
  if not ok then return {0, 'integer overflow'} end
  return {1, redis.call('GET', KEYS[1])}
end
if not room(KEYS[2], ARGV[3], tonumber(ARGV[4])) then return {0, 'key-value store full'} end
store(KEYS[1], KEYS[2], ARGV[3], ARGV[1], ARGV[2])
return {1, ARGV[1]}
"#;

/// KEYS: value, index. ARGV: has-expected ('1'/'0'), expected, value, ttl,
/// member, max. → 1 | 0.
const CAS: &str = r#"
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
else
  if cur then return 0 end
  if not room(KEYS[2], ARGV[5], tonumber(ARGV[6])) then return 0 end
end
store(KEYS[1], KEYS[2], ARGV[5], ARGV[3], ARGV[4])
return 1
"#;

/// The scripts, compiled once (their SHA-1s are computed once; Redis
/// caches the bodies after the first `EVAL`).
struct Scripts {
    set: Script,
    delete: Script,
    increment: Script,
    cas: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            set: with_prelude(SET),
            delete: Script::new(DELETE),
            increment: with_prelude(INCREMENT),
            cas: with_prelude(CAS),
        }
    })
}

/// One filter's namespace in Redis.
pub struct RedisKv {
    link: Arc<RedisLink>,
    /// `P kv:{F}:`, to which the filter's key is appended.
    key_prefix: String,
    /// `P kvidx:{F}`.
    index: String,
    timeout: Duration,
    /// `[filters.kv] on_error`.
    pub on_error: KvOnError,
}

impl std::fmt::Debug for RedisKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKv")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

fn ttl_arg(ttl_ms: Option<u64>) -> String {
    ttl_ms.map(|t| t.to_string()).unwrap_or_default()
}

/// A prepared script call and what it returns: built once, run by either
/// the async or the blocking path.
struct Call<T> {
    invocation: redis::ScriptInvocation<'static>,
    _t: std::marker::PhantomData<T>,
}

impl RedisKv {
    /// The namespace of `filter` on `link`.
    pub fn new(
        link: Arc<RedisLink>,
        filter: &str,
        timeout: Duration,
        on_error: KvOnError,
    ) -> RedisKv {
        RedisKv {
            key_prefix: link.key(&format!("kv:{{{filter}}}:")),
            index: link.key(&format!("kvidx:{{{filter}}}")),
            link,
            timeout,
            on_error,
        }
    }

    fn call<T>(&self, script: &'static Script, key: &str) -> Call<T> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(format!("{}{key}", self.key_prefix))
            .key(self.index.as_str());
        Call {
            invocation,
            _t: std::marker::PhantomData,
        }
    }

    /// Run `call` (async).
    async fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        call: Call<T>,
    ) -> Result<T, RedisError> {
        let Call { invocation, .. } = call;
        self.link
            .run(Op::Kv, self.timeout, move |mut c| async move {
                invocation.invoke_async::<T>(&mut c).await
            })
            .await
    }

    /// Run `call` (blocking).
    fn run_blocking<T: redis::FromRedisValue + Send + 'static>(
        &self,
        call: Call<T>,
    ) -> Result<T, RedisError> {
        let Call { invocation, .. } = call;
        self.link
            .run_blocking(Op::Kv, self.timeout, move |mut c| async move {
                invocation.invoke_async::<T>(&mut c).await
            })
    }

    fn get_call(&self, key: &str) -> redis::Cmd {
        redis::cmd("GET")
            .arg(format!("{}{key}", self.key_prefix))
            .clone()
    }

    /// The live value at `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RedisError> {
        let cmd = self.get_call(key);
        self.link
            .run(Op::Kv, self.timeout, move |mut c| async move {
                cmd.query_async::<Option<Vec<u8>>>(&mut c).await
            })
            .await
    }

    /// [`RedisKv::get`], blocking.
    pub fn get_blocking(&self, key: &str) -> Result<Option<Vec<u8>>, RedisError> {
        let cmd = self.get_call(key);
        self.link
            .run_blocking(Op::Kv, self.timeout, move |mut c| async move {
                cmd.query_async::<Option<Vec<u8>>>(&mut c).await
            })
    }

    fn set_call(&self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Option<Call<i64>> {
        if key.len() + value.len() > MAX_ENTRY_BYTES {
            return None;
        }
        let mut call = self.call(&scripts().set, &key);
        call.invocation
            .arg(value)
            .arg(ttl_arg(ttl_ms))
            .arg(key)
            .arg(MAX_ENTRIES);
        Some(call)
    }

    /// Write `value`; false when the namespace is full or the entry too big.
    pub async fn set(
        &self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, RedisError> {
        match self.set_call(key, value, ttl_ms) {
            Some(call) => Ok(self.run(call).await? == 1),
            None => Ok(false),
        }
    }

    /// [`RedisKv::set`], blocking.
    pub fn set_blocking(
        &self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, RedisError> {
        match self.set_call(key, value, ttl_ms) {
            Some(call) => Ok(self.run_blocking(call)? == 1),
            None => Ok(false),
        }
    }

    fn delete_call(&self, key: &str) -> Call<i64> {
        let mut call = self.call(&scripts().delete, key);
        call.invocation.arg(key);
        call
    }

    /// Remove `key`; true if a live value was there.
    pub async fn delete(&self, key: &str) -> Result<bool, RedisError> {
        Ok(self.run(self.delete_call(key)).await? == 1)
    }

    /// [`RedisKv::delete`], blocking.
    pub fn delete_blocking(&self, key: &str) -> Result<bool, RedisError> {
        Ok(self.run_blocking(self.delete_call(key))? == 1)
    }

    fn increment_call(&self, key: String, delta: i64, ttl_ms: Option<u64>) -> Call<(i64, String)> {
        let mut call = self.call(&scripts().increment, &key);
        call.invocation
            .arg(delta)
            .arg(ttl_arg(ttl_ms))
            .arg(key)
            .arg(MAX_ENTRIES);
        call
    }

    /// The script's `{ok, value-or-reason}` as the filter's result.
    fn increment_result(key: &str, (ok, text): (i64, String)) -> Result<i64, String> {
        if ok != 1 {
            return Err(match text.as_str() {
                "not an integer" => format!("value at {key:?} is not a decimal integer"),
                _ => text,
            });
        }
        text.parse()
            .map_err(|_| format!("value at {key:?} is not a decimal integer"))
    }

    /// Add `delta` to the integer at `key` (absent = 0).
    pub async fn increment(
        &self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<Result<i64, String>, RedisError> {
        let r = self
            .run(self.increment_call(key.clone(), delta, ttl_ms))
            .await?;
        Ok(Self::increment_result(&key, r))
    }

    /// [`RedisKv::increment`], blocking.
    pub fn increment_blocking(
        &self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<Result<i64, String>, RedisError> {
        let r = self.run_blocking(self.increment_call(key.clone(), delta, ttl_ms))?;
        Ok(Self::increment_result(&key, r))
    }

    fn cas_call(
        &self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Option<Call<i64>> {
        if key.len() + value.len() > MAX_ENTRY_BYTES {
            return None;
        }
        let mut call = self.call(&scripts().cas, &key);
        call.invocation
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or_default())
            .arg(value)
            .arg(ttl_arg(ttl_ms))
            .arg(key)
            .arg(MAX_ENTRIES);
        Some(call)
    }

    /// Write `value` only if the live value equals `expected`.
    pub async fn compare_and_swap(
        &self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, RedisError> {
        match self.cas_call(key, expected, value, ttl_ms) {
            Some(call) => Ok(self.run(call).await? == 1),
            None => Ok(false),
        }
    }

    /// [`RedisKv::compare_and_swap`], blocking.
    pub fn compare_and_swap_blocking(
        &self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, RedisError> {
        match self.cas_call(key, expected, value, ttl_ms) {
            Some(call) => Ok(self.run_blocking(call)? == 1),
            None => Ok(false),
        }
    }
}
