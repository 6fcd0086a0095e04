//! Several replicas on one Redis.

pub mod redis;

#[cfg(test)]
mod tests {
    use super::redis::{Redis, RedisLog, RedisStore, create_log, head, take_leadership};
    use crate::redis_server::RedisServer;
    use crate::secret::FingerprintKey;
    use crate::store::Store;
    use crate::store::conformance::Reopen;
    use std::sync::Arc;
    use std::time::Duration;

    /// A new Redis, opened again on each call by a new leader, as a restarted replica would
    /// after the old one's leadership ran out.
    fn on_a_new_redis() -> Reopen {
        let server = Arc::new(RedisServer::start());
        Box::new(move || {
            let redis = Redis::new(&server.url(), "conformance").unwrap();
            let mut connection = redis.connect().unwrap();
            // The downtime the suite plays is longer than any leadership's TTL.
            let _: () = redis::cmd("DEL")
                .arg(&redis.keys.leader)
                .query(&mut connection)
                .unwrap();
            let log_id = create_log(&redis, &mut connection, "log-1", None).unwrap();
            let leader = take_leadership(
                &redis,
                &mut connection,
                "test",
                "127.0.0.1:1",
                Duration::from_secs(3_600),
                0,
                &log_id,
            )
            .unwrap()
            .expect("no one else leads");
            let last = head(&redis, &mut connection).unwrap().last_seq;
            let store: Box<dyn Store> = Box::new(RedisStore::new(
                RedisLog::open(redis).unwrap(),
                &leader,
                log_id,
                last,
            ));
            (store, FingerprintKey::from_bytes([7; FingerprintKey::LEN]))
        })
    }

    crate::conformance_tests!(on_a_new_redis());
}
