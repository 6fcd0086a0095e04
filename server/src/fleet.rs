//! The fleet of replicas as this one sees it: what the leader tells operators in `GetStatus`.
//! Kept up to date by the replica's supervisor ([`crate::replica`]); read by the gRPC service.

use std::sync::Arc;

/// What the leader tells operators about the fleet, in `GetStatus`.
#[derive(Debug, Default)]
pub struct Fleet {
    pub replica: String,
    pub epoch: u64,
    pub key_set_differences: Vec<String>,
}

/// The fleet as this replica sees it, kept up to date by its supervisor.
#[derive(Debug, Clone, Default)]
pub struct FleetView(Arc<std::sync::RwLock<Fleet>>);

impl FleetView {
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Fleet> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, Fleet> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
