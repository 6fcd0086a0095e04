//! A store for tests of what happens around the disk: it keeps nothing, and each commit first
//! runs a hook, which may wait (a gate the test opens) or fail (a disk that breaks).

use super::{Log, RecordVisitor, Store, StoreError};
use std::path::PathBuf;

/// What a commit does: `Err(reason)` is the disk failing with that reason.
type OnCommit = Box<dyn FnMut() -> Result<(), String> + Send>;

pub struct HookedStore {
    on_commit: OnCommit,
}

impl HookedStore {
    pub fn new(on_commit: impl FnMut() -> Result<(), String> + Send + 'static) -> Self {
        Self {
            on_commit: Box::new(on_commit),
        }
    }
}

impl Log for HookedStore {
    fn snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }

    fn records(&self, _: u64, _: &mut RecordVisitor<'_>) -> Result<(), StoreError> {
        Ok(())
    }

    fn location(&self) -> PathBuf {
        PathBuf::from("/test/state.redb")
    }
}

impl Store for HookedStore {
    fn append(&mut self, _: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        (self.on_commit)().map_err(|reason| StoreError::Write {
            path: self.location(),
            reason,
        })
    }

    fn save_snapshot(&mut self, _: u64, _: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }
}
