//! A lock file that names its holder: locked (`flock`) for as long as a process holds it, with
//! that process's id written in it, so that a second process is refused naming the first. The
//! file stays when released: removing it would let two processes each lock a file of their own.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

/// What locking found.
#[derive(Debug)]
pub enum Locked {
    /// This process holds it until the file is dropped.
    Held(File),
    /// Another process holds it: its id, when it wrote one.
    By(Option<String>),
}

/// Locks `path` (creating it) and writes this process's id into it, or says who holds it.
pub fn lock(path: &Path) -> std::io::Result<Locked> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Ok(Locked::By((!holder.is_empty()).then(|| holder.to_string())));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(Locked::Held(file))
}

/// `another NAME`, with its process id when known, for messages.
pub fn holder(name: &str, pid: Option<&str>) -> String {
    match pid {
        Some(pid) => format!("another {name} (process {pid})"),
        None => format!("another {name}"),
    }
}
