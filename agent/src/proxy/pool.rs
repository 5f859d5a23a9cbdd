//! Pooled HBONE connections: one mutual-TLS HTTP/2 connection per (source pod, source identity,
//! destination identity, destination address) carries every tunnel between them.
//!
//! Concurrent first uses of a key share one handshake; a dead connection is replaced on the
//! next use. The pool owns the connections' driver tasks; it does not choose destinations.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h2::client::SendRequest;

use crate::identity::Identity;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// Network namespace the connection's socket lives in: its source IP is that pod's.
    pub src_netns: u64,
    pub src: Identity,
    pub dst: Identity,
    pub dst_addr: SocketAddr,
}

type Slot = Arc<tokio::sync::Mutex<Option<SendRequest<Bytes>>>>;

#[derive(Debug, Default)]
pub struct Pool {
    slots: Mutex<HashMap<Key, Slot>>,
}

impl Pool {
    /// A ready sender for `key`, reusing a live connection or creating one with `connect`.
    pub async fn get<F, Fut, E>(&self, key: &Key, connect: F) -> Result<SendRequest<Bytes>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<SendRequest<Bytes>, E>>,
    {
        let slot = {
            let mut slots = self.slots.lock().expect("pool lock");
            // Look up before `entry`: the key owns six strings, cloned only for a new slot.
            match slots.get(key) {
                Some(slot) => slot.clone(),
                None => slots.entry(key.clone()).or_default().clone(),
            }
        };
        let mut guard = slot.lock().await;
        if let Some(sender) = guard.as_ref() {
            // `ready` fails once the connection is gone; then replace it below.
            if let Ok(sender) = sender.clone().ready().await {
                return Ok(sender);
            }
        }
        *guard = None;
        let sender = connect().await?;
        *guard = Some(sender.clone());
        Ok(sender)
    }

    /// Drops the pooled connection for `key` (e.g. its peer answered with a connection error).
    pub fn evict(&self, key: &Key) {
        self.slots.lock().expect("pool lock").remove(key);
    }

    /// Drops every connection from a pod that left the mesh.
    pub fn evict_netns(&self, netns: u64) {
        self.slots.lock().expect("pool lock").retain(|k, _| k.src_netns != netns);
    }

    pub fn len(&self) -> usize {
        self.slots.lock().expect("pool lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key() -> Key {
        let id = |sa: &str| Identity {
            trust_domain: "cluster.local".into(),
            namespace: "ns".into(),
            service_account: sa.into(),
        };
        Key { src_netns: 1, src: id("a"), dst: id("b"), dst_addr: "10.0.0.2:15008".parse().unwrap() }
    }

    async fn h2_sender() -> SendRequest<Bytes> {
        let (c, s) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            while conn.accept().await.is_some() {}
        });
        let (sender, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    #[tokio::test]
    async fn concurrent_first_uses_share_one_connection() {
        let pool = Arc::new(Pool::default());
        let made = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (pool, made) = (pool.clone(), made.clone());
            tasks.push(tokio::spawn(async move {
                pool.get(&key(), || async {
                    made.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, ()>(h2_sender().await)
                })
                .await
                .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(made.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn dead_connection_is_replaced() {
        let pool = Pool::default();
        let made = AtomicUsize::new(0);
        // A connection whose server side is gone at once.
        let (c, s) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move { h2::server::handshake(s).await.unwrap() });
        let (dead, conn) = h2::client::handshake(c).await.unwrap();
        let driver = tokio::spawn(conn);
        drop(server.await.unwrap());
        let _ = driver.await;
        pool.get(&key(), || async { Ok::<_, ()>(dead) }).await.unwrap();
        pool.get(&key(), || async {
            made.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(h2_sender().await)
        })
        .await
        .unwrap();
        assert_eq!(made.load(Ordering::SeqCst), 1, "the dead connection must not be reused");
        pool.evict_netns(1);
        assert!(pool.is_empty());
    }
}
