//! keylease in the same process: the calls of its gRPC service made as function calls, for a
//! proxy or a batch that runs inside the server. The server implements [`InProcessCalls`] with
//! the same gate, service and state a call over the network meets; [`KeyLeaseClient::in_process`]
//! puts it under the same client, leases and retries as the gRPC transport.
//!
//! [`KeyLeaseClient::in_process`]: crate::KeyLeaseClient::in_process

use keylease::pb;
use std::future::Future;
use std::pin::Pin;
use tonic::Status;

/// A call's answer, as the gRPC service would give it.
pub type Answer<'a, T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'a>>;

/// The unary calls of `keylease.v1.KeyLease` a lease needs, each made as the holder of `token`
/// (`None`: no token), answering exactly what the service answers over gRPC.
pub trait InProcessCalls: Send + Sync + 'static {
    fn acquire_key<'a>(
        &'a self,
        token: Option<&'a str>,
        request: pb::AcquireKeyRequest,
    ) -> Answer<'a, pb::Lease>;

    fn renew_lease<'a>(
        &'a self,
        token: Option<&'a str>,
        request: pb::RenewLeaseRequest,
    ) -> Answer<'a, pb::RenewLeaseResponse>;

    fn release<'a>(
        &'a self,
        token: Option<&'a str>,
        request: pb::ReleaseRequest,
    ) -> Answer<'a, pb::ReleaseResponse>;

    fn report_failure<'a>(
        &'a self,
        token: Option<&'a str>,
        request: pb::ReportFailureRequest,
    ) -> Answer<'a, pb::ReportFailureResponse>;

    fn get_status<'a>(
        &'a self,
        token: Option<&'a str>,
        request: pb::GetStatusRequest,
    ) -> Answer<'a, pb::GetStatusResponse>;
}
