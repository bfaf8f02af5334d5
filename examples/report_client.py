"""Report usage to keymeter's Report API from Python, for work outside a request
(batch jobs, asynchronous tasks).

Install the client and generate the stubs once (from the repository root):

    python3 -m pip install grpcio grpcio-tools
    python3 -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen \
        proto/keymeter/v1/usage.proto

Then (KEYMETER_ADDR defaults to 127.0.0.1:9191, what `keymeter dev` listens on):

    PYTHONPATH=gen API_KEY=sk-test-0001 python3 examples/report_client.py \
        batch embeddings 1200 job-42

KEYMETER_ADDR is keymeter's Report API address: listen.grpc unless listen.report is
set, then only listen.report. In deploy/kubernetes that is
keymeter.billing.svc.cluster.local:9193 (the Service port `report`), and the job's pod
must be labelled keymeter.io/client: report for the NetworkPolicy to let it in.

Prints the record id. The same idempotency key (here job-42) in a retry returns the
same record id and records nothing new. With mTLS on keymeter's gRPC port, use
grpc.secure_channel with grpc.ssl_channel_credentials(root, key, chain) instead.
"""

import json
import os
import sys

import grpc
from keymeter.v1 import usage_pb2, usage_pb2_grpc


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    module, model, usage = sys.argv[1], sys.argv[2], int(sys.argv[3])
    idempotency_key = sys.argv[4] if len(sys.argv) > 4 else ""
    metadata = json.loads(os.environ.get("METADATA_JSON", "{}"))
    address = os.environ.get("KEYMETER_ADDR", "127.0.0.1:9191")
    with grpc.insecure_channel(address) as channel:
        stub = usage_pb2_grpc.UsageStub(channel)
        request = usage_pb2.ReportRequest(
            records=[
                usage_pb2.UsageRecord(
                    module=module,
                    model=model,
                    usage=usage,
                    metadata_json=json.dumps(metadata) if metadata else "",
                    idempotency_key=idempotency_key,
                )
            ]
        )
        try:
            answer = stub.Report(
                request, metadata=[("api-key", os.environ["API_KEY"])], timeout=10
            )
        except grpc.RpcError as e:
            print(f"refused: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    for record_id in answer.record_ids:
        print(record_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
