//! The engine's ids: the catalogue's interned indexes of pools, projects, models and keys, and
//! the fencing token that numbers each lease. Plain numbers, named for what they count.

pub(super) type PoolIdx = u32;
pub(super) type ProjectIdx = u32;
pub(super) type ModelIdx = u32;
pub(super) type KeyIdx = usize;
/// A fencing token: a lease's number, higher for every later grant.
pub(super) type Token = u64;
