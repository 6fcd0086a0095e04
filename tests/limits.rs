//! End to end: what a client may hold of the server is bounded: connections, event streams,
//! and how long a connection may sit idle. Counts, not timings; the idle timeout is short and
//! real, and every wait is bounded.

mod support;

use keylease::pb;
use std::time::Duration;
use support::*;
use tokio::io::AsyncReadExt;
use tonic::Code;

/// Bounded: how long a test waits for the server to notice something.
const PATIENCE: Duration = Duration::from_secs(10);

async fn status_call(client: &mut Client) -> Result<(), tonic::Status> {
    client
        .get_status(pb::GetStatusRequest::default())
        .await
        .map(drop)
}

#[tokio::test]
async fn one_watch_stream_over_the_cap_is_refused_until_one_closes() {
    let extra = "[server]\nmax_watch_streams = 2\n";
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, extra)).await;
    let first = server.watch().await;
    let _second = server.watch().await;
    let mut client = server.client().await;
    let refused = client
        .watch_events(pb::WatchEventsRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_watch_streams"),
        "{refused:?}"
    );
    drop(first);
    let reopened = tokio::time::timeout(PATIENCE, async {
        loop {
            if client.watch_events(pb::WatchEventsRequest {}).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(reopened.is_ok(), "a closed stream never gave its slot back");
}

#[tokio::test]
async fn a_connection_over_the_cap_is_closed_at_once() {
    let extra = "[server]\nmax_connections = 2\n";
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, extra)).await;
    let mut first = server.client().await;
    let mut second = server.client().await;
    status_call(&mut first).await.unwrap();
    status_call(&mut second).await.unwrap();
    let third = match Client::connect(server.address.clone()).await {
        Err(_) => None,
        Ok(mut third) => Some(status_call(&mut third).await.unwrap_err()),
    };
    // The connection is closed under the client: it sees a transport failure, not a reply.
    if let Some(refused) = third {
        assert!(
            matches!(refused.code(), Code::Unavailable | Code::Cancelled),
            "{refused:?}"
        );
    }
    drop(first);
    let admitted = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Ok(mut client) = Client::connect(server.address.clone()).await
                && status_call(&mut client).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        admitted.is_ok(),
        "a closed connection never gave its slot back"
    );
    status_call(&mut second).await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let extra = "[server]\nidle_timeout = \"300ms\"\n";
    let server = TestServer::start(&config_toml(&[("k1", "p1")], 100, extra)).await;
    let address = server.address.trim_start_matches("http://").to_string();
    // A peer that connects and says nothing is let go.
    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut buffer = [0u8; 64];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match silent.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection was kept open");
    // A watcher's connection carries a call for as long as it watches.
    let mut events = server.watch().await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut client = server.client().await;
    client.acquire_key(acquire("late")).await.unwrap();
    let event = tokio::time::timeout(PATIENCE, events.message()).await;
    assert!(
        matches!(event, Ok(Ok(Some(_)))),
        "the watch stream was cut: {event:?}"
    );
}
