//! The keylease wire protocol: the generated gRPC and protobuf code of `keylease.v1`, and (from
//! `keylease-core`, re-exported) the limits and names that both ends of the protocol must agree
//! on. Nothing else lives here; conversions to domain types happen at the server's edge.
#![forbid(unsafe_code)]

/// Generated code of `proto/keylease/v1/keylease.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keylease.v1");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keylease_descriptor");
}

pub use keylease_core::*;
