//! Keys read again by themselves, without a SIGHUP: every `key_sources.refresh` (a command run
//! again, the files read again), and when the keys file changes. The file is watched through
//! its directory, so that an editor's save (a new file renamed over the old one) and the
//! symlink swap Kubernetes makes for a mounted secret (`..data` pointed at a new directory)
//! are seen like a write in place; where it is a symlink, the directory it leads to is watched
//! too (followed anew after each change), so that a write through the link is seen as well; changes are taken up once the directory has been quiet for
//! a moment, and only when the file's bytes changed. A read that fails (the file truncated
//! mid-write, unreadable, not a keys file) keeps the keys in force: the caller's reload says
//! so and counts it.

use notify::{RecursiveMode, Watcher};
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
    let (events, mut noticed) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Errors too: whatever happened, the file is read again and compared.
        let _ = event;
        let _ = events.send(());
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let mut target = None;
    follow(&mut watcher, &path, &dir, &mut target);
    tokio::spawn(async move {
        // Kept for as long as changes are watched.
        let mut watcher = watcher;
        let mut last = contents(&path);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = noticed.recv() => if event.is_none() { return },
            }
            // Until the directory is quiet.
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(SETTLE) => break,
                    event = noticed.recv() => if event.is_none() { return },
                }
            }
            follow(&mut watcher, &path, &dir, &mut target);
            let now = contents(&path);
            if now != last {
                last = now;
                changed().await;
            }
        }
    });
    Ok(())
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
