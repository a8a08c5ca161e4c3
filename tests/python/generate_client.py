"""A Python gRPC client of internvl.v1, generated from proto/ at test time.

Usage: generate_client.py STUBS_DIR ADDRESS
Streams one greedy Generate call and prints a JSON summary on stdout.
"""
import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from internvl.v1 import internvl_pb2, internvl_pb2_grpc  # noqa: E402


def main() -> None:
    channel = grpc.insecure_channel(sys.argv[2])
    stub = internvl_pb2_grpc.InternVLStub(channel)
    request = internvl_pb2.GenerateRequest(
        messages=[
            internvl_pb2.Message(
                role="user",
                content=[internvl_pb2.Content(text="Hello! Who are you?")],
            )
        ],
        sampling=internvl_pb2.SamplingParams(temperature=0.0),
        max_new_tokens=12,
        ignore_eos=True,
        request_id="python-client",
    )
    text, ids, deltas, done = "", [], 0, None
    for response in stub.Generate(request, timeout=60):
        kind = response.WhichOneof("event")
        if kind == "delta":
            deltas += 1
            text += response.delta.text
            ids.extend(token.id for token in response.delta.tokens)
        elif kind == "done":
            done = response.done
    print(
        json.dumps(
            {
                "text": text,
                "ids": ids,
                "deltas": deltas,
                "finish_reason": internvl_pb2.FinishReason.Name(done.finish_reason),
                "prompt_tokens": done.usage.prompt_tokens,
                "completion_tokens": done.usage.completion_tokens,
            }
        )
    )


if __name__ == "__main__":
    main()
