//! The output of a batch, which is its checkpoint too: one JSON line per finished task, each
//! written whole in one `write` and so on disk before the next task is counted done. Reopened,
//! it tells which ids are done (skipped) and which failed for good (skipped unless retried); a
//! last line cut short by a crash or a full disk is cut off and its task redone. A process
//! killed at any moment leaves whole lines only, bar that last one.

use keylease_server::lock_file::Locked;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Failed for good: retried only with `--retry-failed`.
    Failed,
}

/// Why a task failed, for people and for counting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowError {
    /// `request`, `provider`, `invalid_json`, `blocked`, `deadline`, `keylease`.
    pub class: String,
    pub message: String,
}

/// One result line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub status: Status,
    /// The answer's text (absent with `--json`, which gives `json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The answer parsed as JSON, with `--json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RowError>,
    /// Calls sent to Gemini for this task (key failures included).
    pub attempts: u32,
    /// The key of the last call: its id, never its secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// From the task's start to its end, waits for keys and retries included.
    pub latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// What an earlier run left in the output.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Ids answered.
    pub done: HashSet<String>,
    /// Ids that failed for good and were not answered since.
    pub failed: HashSet<String>,
    /// The number of a last line that was cut short (and was cut off): its task is redone.
    pub torn_line: Option<usize>,
    /// Lines of failed tasks dropped for `--retry-failed`.
    pub dropped_failures: usize,
    /// Lines that say a task failed.
    failed_lines: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    /// Another run writes to the same output: both would run every task.
    #[error("{path}: {holder} is writing to it; wait for it to end, or write to another file")]
    Held { path: String, holder: String },
    #[error(
        "{path}, line {line}: not a result line ({reason}); this is not the output of a batch, \
         or it was edited: fix or remove that line, or write to another file"
    )]
    Damaged {
        path: String,
        line: usize,
        reason: String,
    },
}

/// An I/O failure on the file at `path`, named.
fn io_error(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + Copy + '_ {
    move |e| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// The id and status of a line; the rest of it is the caller's.
#[derive(Deserialize)]
struct Seen {
    id: String,
    status: Status,
}

/// The output, open for appending results.
#[derive(Debug)]
pub struct Output {
    file: File,
    path: PathBuf,
    /// `<output>.lock`, held locked while the run writes: a second run is refused.
    _lock: File,
}

/// Locks `<path>.lock`, naming this process in it, or says who holds it.
fn lock(path: &Path) -> Result<File, CheckpointError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    match keylease_server::lock_file::lock(&lock_path).map_err(io_error(&lock_path))? {
        Locked::Held(file) => Ok(file),
        Locked::By(pid) => Err(CheckpointError::Held {
            path: path.display().to_string(),
            holder: keylease_server::lock_file::holder("keylease batch", pid.as_deref()),
        }),
    }
}

/// Opens (creating) the output at `path`: reads what is done, cuts a torn last line and, with
/// `retry_failed`, rewrites it without the failed tasks' lines so that each id keeps one line.
pub fn open(path: &Path, retry_failed: bool) -> Result<(Checkpoint, Output), CheckpointError> {
    let io = io_error(path);
    let held = lock(path)?;
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(e)),
    };
    let (mut checkpoint, whole) = read(path, &bytes)?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    if whole < bytes.len() {
        file.set_len(whole as u64).map_err(io)?;
        file.sync_data().map_err(io)?;
    }
    if retry_failed && checkpoint.failed_lines > 0 {
        checkpoint.dropped_failures = drop_failures(path, &bytes[..whole])?;
        checkpoint.failed.clear();
        // The rename replaced the file this handle appends to.
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        return Ok((checkpoint, Output::new(file, path, held)));
    }
    Ok((checkpoint, Output::new(file, path, held)))
}

/// What the output at `path` holds, changing nothing (for `--dry-run`).
pub fn peek(path: &Path) -> Result<Checkpoint, CheckpointError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(read(path, &bytes)?.0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Checkpoint::default()),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// The checkpoint in `bytes`, and how many of them are whole lines.
fn read(path: &Path, bytes: &[u8]) -> Result<(Checkpoint, usize), CheckpointError> {
    let mut checkpoint = Checkpoint::default();
    let mut whole = 0;
    let mut line = 0;
    while whole < bytes.len() {
        line += 1;
        let rest = &bytes[whole..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            // No newline: a write cut short, if it is the start of a result line. Anything else
            // was put there by hand, and is not silently deleted.
            if !could_be_torn_result(rest) {
                return Err(CheckpointError::Damaged {
                    path: path.display().to_string(),
                    line,
                    reason: "the last line is not the start of a result".into(),
                });
            }
            checkpoint.torn_line = Some(line);
            break;
        };
        let text = &rest[..end];
        if text.iter().all(u8::is_ascii_whitespace) {
            whole += end + 1;
            continue;
        }
        match serde_json::from_slice::<Seen>(text) {
            Ok(seen) => {
                match seen.status {
                    Status::Ok => {
                        checkpoint.failed.remove(&seen.id);
                        checkpoint.done.insert(seen.id);
                    }
                    Status::Failed => {
                        checkpoint.failed_lines += 1;
                        if !checkpoint.done.contains(&seen.id) {
                            checkpoint.failed.insert(seen.id);
                        }
                    }
                }
                whole += end + 1;
            }
            // A last line that does not read is as torn as one without its newline, if it
            // starts as a result does.
            Err(_) if whole + end + 1 == bytes.len() && could_be_torn_result(text) => {
                checkpoint.torn_line = Some(line);
                break;
            }
            Err(e) => {
                return Err(CheckpointError::Damaged {
                    path: path.display().to_string(),
                    line,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok((checkpoint, whole))
}

/// Whether `text`, a last line without its newline, is how a result's write cut short would
/// look: a row serializes with its `id` first.
fn could_be_torn_result(text: &[u8]) -> bool {
    const START: &[u8] = br#"{"id":"#;
    text.starts_with(START) || START.starts_with(text)
}

/// Rewrites the output without the lines of failed tasks, through a file beside it renamed over
/// it: a crash leaves the old output or the new, whole. Returns the lines dropped.
fn drop_failures(path: &Path, whole: &[u8]) -> Result<usize, CheckpointError> {
    let io = io_error(path);
    let mut kept = Vec::with_capacity(whole.len());
    let mut dropped = 0;
    for line in whole.split_inclusive(|&b| b == b'\n') {
        let is_failure =
            serde_json::from_slice::<Seen>(line).is_ok_and(|seen| seen.status == Status::Failed);
        if is_failure {
            dropped += 1;
        } else {
            kept.extend_from_slice(line);
        }
    }
    let mut aside = path.as_os_str().to_owned();
    aside.push(".rewrite");
    let aside = PathBuf::from(aside);
    let mut file = File::create(&aside).map_err(io)?;
    file.write_all(&kept).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&aside, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(dir) = File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(dropped)
}

impl Output {
    fn new(file: File, path: &Path, lock: File) -> Self {
        Self {
            file,
            path: path.to_path_buf(),
            _lock: lock,
        }
    }

    /// Appends `row` as one line, in one write: once this returns, a crash of the process
    /// cannot lose it nor leave half of it.
    pub fn append(&mut self, row: &Row) -> Result<(), CheckpointError> {
        let mut line = serde_json::to_vec(row).expect("a row always serializes");
        line.push(b'\n');
        self.file.write_all(&line).map_err(io_error(&self.path))
    }

    /// Puts what was appended on the disk itself (against power loss, not only a crash).
    pub fn sync(&self) -> Result<(), CheckpointError> {
        self.file.sync_data().map_err(io_error(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, status: Status) -> Row {
        Row {
            id: id.into(),
            status,
            text: Some("answer".into()),
            json: None,
            error: None,
            attempts: 1,
            key_id: Some("k1".into()),
            project: Some("p1".into()),
            input_tokens: 3,
            output_tokens: 8,
            latency_ms: 12,
            finish_reason: Some("STOP".into()),
            metadata: None,
        }
    }

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn appended_rows_are_done_when_reopened() {
        let dir = dir();
        let path = dir.path().join("out.jsonl");
        let (checkpoint, mut output) = open(&path, false).unwrap();
        assert_eq!(checkpoint, Checkpoint::default());
        output.append(&row("a", Status::Ok)).unwrap();
        output.append(&row("b", Status::Failed)).unwrap();
        drop(output);
        let (checkpoint, _) = open(&path, false).unwrap();
        assert_eq!(checkpoint.done, HashSet::from(["a".to_string()]));
        assert_eq!(checkpoint.failed, HashSet::from(["b".to_string()]));
        assert_eq!(checkpoint.torn_line, None);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_its_task_redone() {
        for torn in ["{\"id\": \"c\", \"sta", "{\"id\": \"c\", \"sta\n"] {
            let dir = dir();
            let path = dir.path().join("out.jsonl");
            let (_, mut output) = open(&path, false).unwrap();
            output.append(&row("a", Status::Ok)).unwrap();
            drop(output);
            let whole = std::fs::read(&path).unwrap();
            let mut file = OpenOptions::new().append(true).open(&path).unwrap();
            file.write_all(torn.as_bytes()).unwrap();
            drop(file);
            let (checkpoint, mut output) = open(&path, false).unwrap();
            assert_eq!(checkpoint.torn_line, Some(2), "{torn:?}");
            assert_eq!(checkpoint.done.len(), 1);
            assert_eq!(std::fs::read(&path).unwrap(), whole, "{torn:?}");
            output.append(&row("c", Status::Ok)).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(text.lines().count(), 2);
            assert!(text.lines().all(|l| serde_json::from_str::<Row>(l).is_ok()));
        }
    }

    #[test]
    fn a_last_line_put_there_by_hand_is_refused_not_deleted() {
        for added in ["a note\n", "a note", "{\"note\": 1}\n", "[1, 2"] {
            let dir = dir();
            let path = dir.path().join("out.jsonl");
            let (_, mut output) = open(&path, false).unwrap();
            output.append(&row("a", Status::Ok)).unwrap();
            drop(output);
            let mut file = OpenOptions::new().append(true).open(&path).unwrap();
            file.write_all(added.as_bytes()).unwrap();
            drop(file);
            let before = std::fs::read(&path).unwrap();
            let error = open(&path, false).unwrap_err().to_string();
            assert!(
                error.contains("line 2: not a result line"),
                "{added:?}: {error}"
            );
            assert_eq!(std::fs::read(&path).unwrap(), before, "{added:?}");
        }
    }

    #[test]
    fn a_second_run_on_the_same_output_is_refused_naming_the_first() {
        let dir = dir();
        let path = dir.path().join("out.jsonl");
        let (_, first) = open(&path, false).unwrap();
        let error = open(&path, false).unwrap_err();
        assert!(matches!(error, CheckpointError::Held { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains(&format!("process {}", std::process::id())),
            "{error}"
        );
        drop(first);
        assert!(open(&path, false).is_ok());
    }

    #[test]
    fn a_damaged_line_before_the_last_is_refused_with_its_number() {
        let dir = dir();
        let path = dir.path().join("out.jsonl");
        let good = serde_json::to_string(&row("a", Status::Ok)).unwrap();
        std::fs::write(&path, format!("{good}\nnot json\n{good}\n")).unwrap();
        let error = open(&path, false).unwrap_err().to_string();
        assert!(error.contains("line 2: not a result line"), "{error}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().lines().count(),
            3,
            "nothing is cut"
        );
    }

    #[test]
    fn retry_failed_drops_failed_lines_and_keeps_the_rest() {
        let dir = dir();
        let path = dir.path().join("out.jsonl");
        let (_, mut output) = open(&path, false).unwrap();
        output.append(&row("a", Status::Ok)).unwrap();
        output.append(&row("b", Status::Failed)).unwrap();
        output.append(&row("c", Status::Failed)).unwrap();
        output.append(&row("c", Status::Ok)).unwrap();
        drop(output);
        let (checkpoint, mut output) = open(&path, true).unwrap();
        assert_eq!(checkpoint.dropped_failures, 2);
        assert!(checkpoint.failed.is_empty());
        assert_eq!(checkpoint.done.len(), 2);
        output.append(&row("b", Status::Ok)).unwrap();
        let ids: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Row>(l).unwrap().id)
            .collect();
        assert_eq!(ids, ["a", "c", "b"]);
    }
}
