"""A Python gRPC client of internvl.v1, generated from proto/ at test time.

Usage: generate_client.py STUBS_DIR ADDRESS [IMAGE_URL]
Streams one greedy Generate call and prints a JSON summary on stdout. With
IMAGE_URL, the question is about the image the server fetches from there.
"""
import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from internvl.v1 import internvl_pb2, internvl_pb2_grpc  # noqa: E402


def main() -> None:
    channel = grpc.insecure_channel(sys.argv[2])
    stub = internvl_pb2_grpc.InternVLStub(channel)
    if len(sys.argv) > 3:
        content = [
            internvl_pb2.Content(image=internvl_pb2.Image(url=sys.argv[3])),
            internvl_pb2.Content(text="What is shown?"),
        ]
    else:
        content = [internvl_pb2.Content(text="Hello! Who are you?")]
    request = internvl_pb2.GenerateRequest(
        messages=[internvl_pb2.Message(role="user", content=content)],
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
                "image_tokens": done.usage.image_tokens,
            }
        )
    )


if __name__ == "__main__":
    main()
