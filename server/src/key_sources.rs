//! Keys read again by themselves, without a SIGHUP: every `key_sources.refresh` (a command run
//! again, the files read again), and when the keys file changes. The file is watched through
//! its directory, so that an editor's save (a new file renamed over the old one) and the
//! symlink swap Kubernetes makes for a mounted secret (`..data` pointed at a new directory)
//! are seen like a write in place; where it is a symlink, the directory it leads to is watched
//! too (followed anew after each change), so that a write through the link is seen as well.
//! Only events of the names on the way to the file's bytes count: a busy neighbour in the
//! same directory (a log, a state file) neither delays a change nor costs a read, and the
//! watcher's own reads (opens and closes are events too) wake nothing. Changes are taken up
//! once those names have been quiet for a moment, and only when the file's bytes changed. A
//! read that fails (the file truncated mid-write, unreadable, not a keys file) keeps the keys
//! in force: the caller's reload says so and counts it.

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::HashSet;
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long the keys file's directory must be quiet before a change is taken up: a save is
/// several events (write, rename, chmod), a Kubernetes update a handful of renames.
pub const SETTLE: Duration = Duration::from_millis(300);

/// Calls `tick` every `every` until `stop` (the first call after one period: the keys were
/// just read).
pub fn every<F, Fut>(every: Duration, stop: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => tick().await,
            }
        }
    });
}

/// Calls `changed` each time the bytes of the file at `path` change (through any symlinks),
/// until `stop`. Fails when its directory cannot be watched.
pub fn watch<F, Fut>(
    path: &Path,
    stop: CancellationToken,
    mut changed: F,
) -> Result<(), notify::Error>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let path = path.to_path_buf();
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (events, mut noticed) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let _ = events.send(event);
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let mut target = None;
    follow(&mut watcher, &path, &dir, &mut target);
    tokio::spawn(async move {
        // Kept for as long as changes are watched.
        let mut watcher = watcher;
        let mut last = contents(&path);
        let mut names = names_on_the_way(&path);
        loop {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    event = noticed.recv() => match event {
                        None => return,
                        Some(event) if can_change(&event, &names) => break,
                        Some(_) => {}
                    },
                }
            }
            // Until those names are quiet: each event of theirs starts the wait again.
            loop {
                let quiet = tokio::time::sleep(SETTLE);
                tokio::pin!(quiet);
                let again = loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = &mut quiet => break false,
                        event = noticed.recv() => match event {
                            None => return,
                            Some(event) if can_change(&event, &names) => break true,
                            Some(_) => {}
                        },
                    }
                };
                if !again {
                    break;
                }
            }
            follow(&mut watcher, &path, &dir, &mut target);
            names = names_on_the_way(&path);
            let now = contents(&path);
            if now != last {
                last = now;
                changed().await;
            }
        }
    });
    Ok(())
}

/// Whether `event` may have changed the file's bytes: an event of one of `names` (the file and
/// the symlinks on the way to it) other than a read, or one that does not say (an error, a
/// rescan of the directory, an event without a path).
fn can_change(event: &notify::Result<notify::Event>, names: &HashSet<OsString>) -> bool {
    let Ok(event) = event else { return true };
    if matches!(event.kind, EventKind::Access(access)
        if access != AccessKind::Close(AccessMode::Write))
    {
        return false;
    }
    event.paths.is_empty()
        || event.need_rescan()
        || event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|name| names.contains(name)))
}

/// The names the file's bytes are reached through: its own, and along each symlink the
/// first name of where it leads (Kubernetes' `..data`) and that place's own, up to the file
/// that holds the bytes.
fn names_on_the_way(path: &Path) -> HashSet<OsString> {
    let mut names = HashSet::new();
    let mut at = path.to_path_buf();
    // Bounded, as the kernel bounds a chain of links.
    for _ in 0..40 {
        names.extend(at.file_name().map(OsString::from));
        let Ok(leads_to) = std::fs::read_link(&at) else {
            break;
        };
        names.extend(leads_to.components().find_map(|c| match c {
            std::path::Component::Normal(name) => Some(name.to_os_string()),
            _ => None,
        }));
        at = at.parent().unwrap_or(Path::new(".")).join(leads_to);
    }
    if let Ok(real) = std::fs::canonicalize(path) {
        names.extend(real.file_name().map(OsString::from));
    }
    names
}

/// Watches the directory the file's symlinks lead to now, in place of the one they led to
/// (`target`), when it is not `dir` itself.
fn follow(watcher: &mut impl Watcher, path: &Path, dir: &Path, target: &mut Option<PathBuf>) {
    let now = std::fs::canonicalize(path)
        .ok()
        .and_then(|real| real.parent().map(Path::to_path_buf))
        .filter(|real| std::fs::canonicalize(dir).ok().as_ref() != Some(real));
    if now == *target {
        return;
    }
    if let Some(old) = target.take() {
        let _ = watcher.unwatch(&old);
    }
    if let Some(new) = now
        && watcher.watch(&new, RecursiveMode::NonRecursive).is_ok()
    {
        *target = Some(new);
    }
}

/// The file's bytes as they read now (through symlinks); `None` when it cannot be read, which
/// is a change too (and a reload that will say why).
fn contents(path: &PathBuf) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, ModifyKind, RenameMode};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn event(kind: EventKind, path: &Path) -> notify::Result<notify::Event> {
        Ok(notify::Event::new(kind).add_path(path.to_path_buf()))
    }

    /// A Kubernetes secret volume: keys.txt -> ..data/keys.txt, ..data -> ..v1.
    fn secret_volume() -> tempfile::TempDir {
        let secret = tempfile::tempdir().unwrap();
        std::fs::create_dir(secret.path().join("..v1")).unwrap();
        std::fs::write(secret.path().join("..v1/keys.txt"), "k1\n").unwrap();
        std::os::unix::fs::symlink("..v1", secret.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/keys.txt", secret.path().join("keys.txt")).unwrap();
        secret
    }

    #[test]
    fn the_names_on_the_way_are_the_links_and_the_file() {
        let secret = secret_volume();
        let names = names_on_the_way(&secret.path().join("keys.txt"));
        let expected: HashSet<OsString> = ["keys.txt", "..data"].map(OsString::from).into();
        assert_eq!(names, expected);
    }

    #[test]
    fn reads_and_neighbours_change_nothing_and_the_swap_does() {
        let secret = secret_volume();
        let dir = secret.path();
        let names = names_on_the_way(&dir.join("keys.txt"));
        let keys = dir.join("keys.txt");
        let opened = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Read));
        let written = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(!can_change(&event(opened, &keys), &names));
        assert!(!can_change(&event(closed, &keys), &names));
        assert!(!can_change(
            &event(written, &dir.join("keylease.log")),
            &names
        ));
        assert!(!can_change(
            &event(EventKind::Create(CreateKind::Any), &dir.join("..data_tmp")),
            &names
        ));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(can_change(&event(renamed, &dir.join("..data")), &names));
        assert!(can_change(
            &event(written, &dir.join("..v1/keys.txt")),
            &names
        ));
        let closed_after_writing = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(can_change(&event(closed_after_writing, &keys), &names));
        assert!(can_change(
            &Err(notify::Error::generic("queue overflow")),
            &names
        ));
    }

    /// A neighbour written more often than the settling time used to hold a change back for as
    /// long as it was written.
    #[tokio::test]
    async fn a_busy_neighbour_does_not_hold_a_change_back() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.txt");
        std::fs::write(&keys, "k1\n").unwrap();
        let changes = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let counted = changes.clone();
        watch(&keys, stop.clone(), move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async {}
        })
        .unwrap();
        let neighbour = dir.path().join("keylease.log");
        let busy = tokio::spawn(async move {
            for line in 0.. {
                std::fs::write(&neighbour, format!("{line}\n")).unwrap();
                tokio::time::sleep(SETTLE / 6).await;
            }
        });
        tokio::time::sleep(SETTLE).await;
        std::fs::write(&keys, "k2\n").unwrap();
        // Up to twenty settling times.
        for _ in 0..200 {
            if changes.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(SETTLE / 10).await;
        }
        busy.abort();
        stop.cancel();
        assert_eq!(
            changes.load(Ordering::SeqCst),
            1,
            "the change was taken up once"
        );
    }
}
