//! Where keys come from, against a real server: a command whose output is the keys, run again
//! every `key_sources.refresh`; a refresh that fails keeps the keys in force and is counted.

mod support;

use keylease::pb;
use std::time::Duration;
use support::*;

/// Reloads the watch of the keys file began that failed.
async fn keys_file_failures(server: &TestServer) -> u64 {
    server
        .metric("keylease_reload_failures_total{trigger=\"keys_file\"}")
        .await as u64
}

fn ids(status: &pb::GetStatusResponse) -> Vec<String> {
    let mut ids: Vec<String> = status.keys.iter().map(|k| k.key_id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_commands_keys_are_read_again_every_refresh_and_a_failure_keeps_them() {
    let script = |ids: &[&str]| {
        ids.iter()
            .map(|id| format!("echo '{} id={id} project=p-{id}'\n", fake_secret(id)))
            .collect::<String>()
    };
    let config = format!(
        "[key_sources]\nenvironment = false\ncommand = [\"sh\", \"keys.sh\"]\nrefresh = \"1s\"\n\n[pools.gemini.models.\"{MODEL}\"]\nrequests_per_minute = 100\n"
    );
    let server = TestServer::start_with_files(&config, &[("keys.sh", &script(&["v1"]))]).await;
    assert_eq!(ids(&server.status().await), ["v1"]);
    let keys_sh = server.config_dir().join("keys.sh");
    std::fs::write(&keys_sh, script(&["v1", "v2"])).unwrap();
    server
        .until_status(Duration::from_secs(10), |s| ids(s) == ["v1", "v2"])
        .await;

    // The vault is down: the keys in force stay, and the failure is counted.
    std::fs::write(
        &keys_sh,
        format!("echo 'vault: sealed, {}' >&2\nexit 2\n", fake_secret("v1")),
    )
    .unwrap();
    let mut failures = 0;
    for _ in 0..100 {
        failures = server
            .metric("keylease_reload_failures_total{trigger=\"refresh\"}")
            .await as u64;
        if failures > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scrape = reqwest::get(&server.metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!scrape.contains(&fake_secret("v1")), "{scrape}");
    assert!(failures > 0, "no failed refresh counted");
    assert_eq!(ids(&server.status().await), ["v1", "v2"]);
    let mut client = server.client().await;
    let lease = client.acquire_key(acquire("t")).await.unwrap().into_inner();
    client.release(release(&lease, 0)).await.unwrap();
}

#[tokio::test]
async fn a_watched_keys_file_is_taken_up_when_swapped_and_a_broken_one_keeps_the_keys() {
    let line = |id: &str| format!("{} id={id} project=p-{id}\n", fake_secret(id));
    let config = format!(
        "[key_sources]\nenvironment = false\nfile = \"secret/keys.txt\"\n\n[pools.gemini.models.\"{MODEL}\"]\nrequests_per_minute = 100\n"
    );
    // A Kubernetes secret volume: keys.txt -> ..data/keys.txt, ..data -> a timestamped directory.
    let dir = std::env::temp_dir().join(format!("keylease-watch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let secret = dir.join("secret");
    std::fs::create_dir_all(secret.join("..v1")).unwrap();
    std::fs::write(secret.join("..v1/keys.txt"), line("w1")).unwrap();
    std::os::unix::fs::symlink("..v1", secret.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/keys.txt", secret.join("keys.txt")).unwrap();
    let swap_to = |version: &str, keys: Option<&str>| {
        let target = secret.join(version);
        std::fs::create_dir_all(&target).unwrap();
        match keys {
            Some(text) => std::fs::write(target.join("keys.txt"), text).unwrap(),
            // Where the file should be, a directory: it cannot be read.
            None => std::fs::create_dir_all(target.join("keys.txt")).unwrap(),
        }
        let _ = std::fs::remove_file(secret.join("..data_tmp"));
        std::os::unix::fs::symlink(version, secret.join("..data_tmp")).unwrap();
        std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).unwrap();
    };
    let config_text = config.replace("secret/keys.txt", secret.join("keys.txt").to_str().unwrap());
    let server = TestServer::start(&config_text).await;
    assert_eq!(ids(&server.status().await), ["w1"]);

    swap_to("..v2", Some(&format!("{}{}", line("w1"), line("w2"))));
    server
        .until_status(Duration::from_secs(10), |s| ids(s) == ["w1", "w2"])
        .await;

    // Truncated in place (a writer caught mid-way): no keys, refused; the keys in force stay.
    std::fs::write(secret.join("..v2/keys.txt"), "").unwrap();
    for _ in 0..100 {
        if keys_file_failures(&server).await >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(keys_file_failures(&server).await, 1);
    // Swapped to something unreadable: refused too.
    swap_to("..v3", None);
    for _ in 0..100 {
        if keys_file_failures(&server).await >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(keys_file_failures(&server).await, 2);
    assert_eq!(ids(&server.status().await), ["w1", "w2"]);

    // Fixed: taken up.
    swap_to("..v4", Some(&line("w3")));
    server
        .until_status(Duration::from_secs(10), |s| ids(s) == ["w3"])
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
