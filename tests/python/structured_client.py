"""A Python gRPC client asking for a JSON reply (response_format.json_schema).

Usage: structured_client.py STUBS_DIR ADDRESS SCHEMA_JSON
Streams one sampled Generate call with the schema and prints a JSON summary;
then sends a schema that is not JSON and reports the status it got.
"""
import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from internvl.v1 import internvl_pb2, internvl_pb2_grpc  # noqa: E402


def request(schema: str) -> internvl_pb2.GenerateRequest:
    return internvl_pb2.GenerateRequest(
        messages=[
            internvl_pb2.Message(
                role="user",
                content=[internvl_pb2.Content(text="Read the receipt as JSON.")],
            )
        ],
        sampling=internvl_pb2.SamplingParams(temperature=1.0, seed=7),
        max_new_tokens=200,
        response_format=internvl_pb2.ResponseFormat(json_schema=schema),
    )


def main() -> None:
    channel = grpc.insecure_channel(sys.argv[2])
    stub = internvl_pb2_grpc.InternVLStub(channel)
    text, done = "", None
    for response in stub.Generate(request(sys.argv[3]), timeout=60):
        if response.WhichOneof("event") == "delta":
            text += response.delta.text
        else:
            done = response.done
    refused = None
    try:
        for _ in stub.Generate(request("{not json"), timeout=60):
            pass
    except grpc.RpcError as error:
        refused = {"code": error.code().name, "details": error.details()}
    print(
        json.dumps(
            {
                "text": text,
                "finish_reason": internvl_pb2.FinishReason.Name(done.finish_reason),
                "refused": refused,
            }
        )
    )


if __name__ == "__main__":
    main()
