"""Borrow a Gemini key from keylease in Python, with grpcio.

    pip install grpcio grpcio-tools
    python3 examples/python/keylease_example.py [HOST:PORT]     # default 127.0.0.1:50051

With a worker token and TLS, from the environment:
    KEYLEASE_TOKEN=...                 sent as `authorization: Bearer ...`
    KEYLEASE_CA=ca.pem                 the CA that signed keylease's certificate: TLS on
    KEYLEASE_CLIENT_CERT=worker.pem    with KEYLEASE_CLIENT_KEY=worker.key: mutual TLS

The stubs are generated from proto/ at start, so nothing generated needs committing.
"""

import importlib
import os
import sys
import tempfile

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
        print(f"leased {lease.key_id} of project {lease.project}, fencing token {lease.fencing_token}")

        # Call Gemini here with lease.api_key in the x-goog-api-key header, then say what it used.
        # Left unset, requests_sent counts every granted request as sent and input_tokens keeps
        # the estimate: a release that says nothing never under-books the project's quota.
        # On a 429 or 403, call ReportFailure with rotate=True instead to get another key.
        released = keylease.Release(pb.ReleaseRequest(
            lease_id=lease.lease_id, fencing_token=lease.fencing_token,
            requests_sent=1, input_tokens=12), timeout=10, metadata=auth)
        print(f"released: {released.released}, booked {released.requests_booked} request(s) "
              f"and {released.input_tokens_booked} input tokens")


if __name__ == "__main__":
    main()
