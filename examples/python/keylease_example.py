"""Borrow a Gemini key from keylease in Python, with grpcio: lease, call Gemini, then release
with what the call used, or report the failure (with what a 429 names of the limit it hit, so
that keylease learns the project's real limits) and call again on the replacement.

    pip install grpcio grpcio-tools
    python3 examples/python/keylease_example.py [HOST:PORT]     # default 127.0.0.1:50051

GEMINI_BASE_URL points the calls elsewhere than Google (a fake Gemini, a proxy).

With a worker token and TLS, from the environment:
    KEYLEASE_TOKEN=...                 sent as `authorization: Bearer ...`
    KEYLEASE_CA=ca.pem                 the CA that signed keylease's certificate: TLS on
    KEYLEASE_CLIENT_CERT=worker.pem    with KEYLEASE_CLIENT_KEY=worker.key: mutual TLS

The stubs are generated from proto/ at start, so nothing generated needs committing.
"""

import importlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request

import grpc
import grpc_tools
from grpc_tools import protoc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_stubs():
    out = tempfile.mkdtemp(prefix="keylease-python-")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    status = protoc.main([
        "protoc", f"-I{REPO}/proto", f"-I{well_known}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        "keylease/v1/keylease.proto",
    ])
    if status != 0:
        sys.exit("generating the keylease stubs failed")
    sys.path.insert(0, out)
    return (importlib.import_module("keylease.v1.keylease_pb2"),
            importlib.import_module("keylease.v1.keylease_pb2_grpc"))


def retry_after_seconds(error):
    """keylease says when to retry a RESOURCE_EXHAUSTED in the `retry-after-ms` metadata."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            return int(value) / 1000
    return None


def call_gemini(api_key, model, prompt):
    """generateContent with the leased key; (HTTP status, body text)."""
    base = os.environ.get("GEMINI_BASE_URL", "https://generativelanguage.googleapis.com")
    request = urllib.request.Request(
        f"{base.rstrip('/')}/v1beta/models/{model}:generateContent",
        data=json.dumps({"contents": [{"parts": [{"text": prompt}]}]}).encode(),
        headers={"x-goog-api-key": api_key, "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def gemini_error(body):
    """The `error` object of a Gemini error body (sometimes wrapped in a one-element array)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    if isinstance(parsed, list):
        parsed = parsed[0] if parsed else {}
    return parsed.get("error", {}) if isinstance(parsed, dict) else {}


def quota_violations(pb, error):
    """`QuotaFailure.violations` as ReportFailure carries them: which limit, for which model,
    and its figure. keylease learns the project's real limits from them."""
    violations = []
    for detail in error.get("details", []):
        if not detail.get("@type", "").endswith("QuotaFailure"):
            continue
        for found in detail.get("violations", [])[:8]:
            violation = pb.QuotaViolation(
                quota_id=str(found.get("quotaId", ""))[:256],
                model=str(found.get("quotaDimensions", {}).get("model", ""))[:256])
            try:
                value = int(found.get("quotaValue"))
            except (TypeError, ValueError):
                value = None
            if value is not None and 0 <= value <= 10**12:
                violation.quota_value = value
            violations.append(violation)
    return violations


def failure_of(pb, status, error):
    """What a failed call means, as keylease's Rust client classifies it: the kind to report and
    its finer class (which older servers ignore), or None when the key is not at fault."""
    ids = [v.get("quotaId", "") for d in error.get("details", []) for v in d.get("violations", [])]
    reasons = [d.get("reason") for d in error.get("details", [])]
    message = error.get("message", "")
    # The model's capacity is no one's quota: the pool rests the model, the key is fine.
    if status in (429, 503) and (
        "MODEL_CAPACITY_EXHAUSTED" in reasons or message.startswith("No capacity available for model")
    ):
        return pb.FAILURE_KIND_SERVER_ERROR, pb.FAILURE_CLASS_MODEL_CAPACITY
    if status == 429 and (any("PerDay" in i for i in ids) or "limit: 0" in message):
        return pb.FAILURE_KIND_DAILY_QUOTA_EXHAUSTED, pb.FAILURE_CLASS_QUOTA
    if status == 429:
        # Without a QuotaFailure it names no limit: Gemini answers so under its own load too.
        named = pb.FAILURE_CLASS_QUOTA if ids else pb.FAILURE_CLASS_BARE_RATE_LIMIT
        return pb.FAILURE_KIND_RATE_LIMITED, named
    if status == 400 and "API_KEY_INVALID" in reasons:
        return pb.FAILURE_KIND_INVALID_KEY, pb.FAILURE_CLASS_UNSPECIFIED
    if status == 403 and "unregistered callers" in message:
        return None  # no key was sent: the caller's bug, not the key's
    if status in (401, 403):
        return pb.FAILURE_KIND_PERMISSION_DENIED, pb.FAILURE_CLASS_UNSPECIFIED
    if status >= 500:
        overloaded = error.get("status") == "UNAVAILABLE"
        return pb.FAILURE_KIND_SERVER_ERROR, (
            pb.FAILURE_CLASS_OVERLOADED if overloaded else pb.FAILURE_CLASS_UNSPECIFIED)
    return None


def retry_delay(error):
    """`RetryInfo.retryDelay` ("26s", "55.8s"), as a Duration, when the provider gave one."""
    from google.protobuf.duration_pb2 import Duration
    for detail in error.get("details", []):
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                seconds = float(delay[:-1])
            except ValueError:
                continue
            return Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
    return None


def read(variable):
    path = os.environ.get(variable)
    if not path:
        return None
    with open(path, "rb") as file:
        return file.read()


def channel_to(address):
    """TLS when KEYLEASE_CA is set (with a client certificate when one is given), else plaintext."""
    ca = read("KEYLEASE_CA")
    if ca is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=read("KEYLEASE_CLIENT_KEY"),
        certificate_chain=read("KEYLEASE_CLIENT_CERT"))
    return grpc.secure_channel(address, credentials)


def main():
    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    pb, rpc = load_stubs()
    from google.protobuf.duration_pb2 import Duration
    token = os.environ.get("KEYLEASE_TOKEN")
    auth = [("authorization", f"Bearer {token}")] if token else []

    with channel_to(address) as channel:
        keylease = rpc.KeyLeaseStub(channel)
        request = pb.AcquireKeyRequest(task_id="python-job-1", model="gemini-2.5-flash",
                                       wait=Duration(seconds=10))
        try:
            lease = keylease.AcquireKey(request, timeout=30, metadata=auth)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                sys.exit(f"no key now ({error.details()}); retry in {retry_after_seconds(error)} s")
            raise
        for _ in range(3):
            print(f"leased {lease.key_id} of project {lease.project}, fencing token {lease.fencing_token}")
            status, body = call_gemini(lease.api_key, request.model, "Say hello")
            if status == 200:
                used = json.loads(body).get("usageMetadata", {}).get("promptTokenCount")
                # Say what the call used: left unset, requests_sent counts every granted request
                # and input_tokens keeps the estimate, so a release never under-books the quota.
                released = keylease.Release(pb.ReleaseRequest(
                    lease_id=lease.lease_id, fencing_token=lease.fencing_token,
                    requests_sent=1, input_tokens=used), timeout=10, metadata=auth)
                print(f"released: {released.released}, booked {released.requests_booked} request(s) "
                      f"and {released.input_tokens_booked} input tokens")
                return
            error = gemini_error(body)
            failure = failure_of(pb, status, error)
            if failure is None:
                keylease.Release(pb.ReleaseRequest(lease_id=lease.lease_id,
                                                   fencing_token=lease.fencing_token, requests_sent=1),
                                 timeout=10, metadata=auth)
                sys.exit(f"Gemini refused the request itself ({status}): {error.get('message')}")
            kind, failure_class = failure
            violations = quota_violations(pb, error)
            reported = keylease.ReportFailure(pb.ReportFailureRequest(
                lease_id=lease.lease_id, fencing_token=lease.fencing_token, kind=kind,
                **{"class": failure_class},
                retry_after=retry_delay(error), detail=f"{status} {error.get('status', '')}",
                requests_sent=1, quota_violations=violations, rotate=True,
                replacement_wait=Duration(seconds=10)), timeout=30, metadata=auth)
            named = ", ".join(f"{v.quota_id}={v.quota_value}" for v in violations) or "no figure"
            print(f"reported {pb.FailureKind.Name(kind)} ({status}; {named})")
            if not reported.HasField("replacement"):
                print("no replacement key now: "
                      f"{pb.UnavailableReason.Name(reported.replacement_unavailable.reason)}")
                return
            lease = reported.replacement
        sys.exit("every attempt failed")


if __name__ == "__main__":
    main()
