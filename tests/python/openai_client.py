"""OpenAI's official Python SDK against the server's OpenAI-compatible API.

Usage: openai_client.py BASE_URL API_KEY IMAGE_FILE METRICS_URL
Prints one JSON summary: a streamed chat with an image (greedy, with
logprobs), a JSON Schema reply (validated here), embeddings (float and
base64), a bad image, a wrong API key, and a stream the client abandons
after its first chunk (with what the server's metrics say 300 ms later).
"""
import base64
import json
import re
import struct
import sys
import time
import urllib.request

import jsonschema
import openai

base_url, api_key, image_file, metrics_url = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
with open(image_file, "rb") as f:
    image_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
MODEL = client.models.list().data[0].id


def server_load():
    time.sleep(0.3)
    text = urllib.request.urlopen(metrics_url).read().decode()

    def value(name):
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    return {
        "in_flight": value("internvl_requests_in_flight"),
        "active": value("internvl_active_sequences"),
    }


def error_of(call):
    try:
        call()
    except openai.APIStatusError as e:
        return {"status": e.status_code, "type": type(e).__name__, "body": e.body}
    return None


summary = {"model": MODEL}

stream = client.chat.completions.create(
    model=MODEL,
    messages=[
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": "What is shown?"},
            ],
        }
    ],
    temperature=0,
    max_tokens=12,
    logprobs=True,
    stream=True,
    stream_options={"include_usage": True},
)
text, tokens, chunks, finish, usage = "", [], 0, None, None
for chunk in stream:
    chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        text += choice.delta.content or ""
        if choice.logprobs and choice.logprobs.content:
            tokens += [t.token for t in choice.logprobs.content]
        finish = choice.finish_reason or finish
summary["stream"] = {
    "text": text,
    "tokens": tokens,
    "chunks": chunks,
    "finish_reason": finish,
    "usage": usage,
}

schema = {
    "type": "object",
    "properties": {"animal": {"type": "string", "maxLength": 12}, "legs": {"type": "integer"}},
    "required": ["animal", "legs"],
    "additionalProperties": False,
}
reply = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Describe an animal as JSON."}],
    temperature=0.7,
    seed=5,
    max_tokens=200,
    response_format={
        "type": "json_schema",
        "json_schema": {"name": "animal", "schema": schema, "strict": True},
    },
)
content = reply.choices[0].message.content
parsed = json.loads(content)
jsonschema.validate(parsed, schema)
summary["json_schema"] = {
    "content": content,
    "finish_reason": reply.choices[0].finish_reason,
}

floats = client.embeddings.create(model=MODEL, input=["A photo of a cat.", "A dog."])
packed = client.embeddings.create(
    model=MODEL, input="A photo of a cat.", encoding_format="base64"
)
summary["embeddings"] = {
    "count": len(floats.data),
    "dimensions": len(floats.data[0].embedding),
    "norm": sum(v * v for v in floats.data[0].embedding) ** 0.5,
    # Asked for explicitly, base64 comes back as the string: little-endian
    # float32s, which must be the float list's values exactly.
    "base64_equal": base64.b64decode(packed.data[0].embedding)
    == struct.pack(f"<{len(floats.data[0].embedding)}f", *floats.data[0].embedding),
    "prompt_tokens": floats.usage.prompt_tokens,
}

# The extension: a chat-style input with an image.
with_image = client.embeddings.create(
    model=MODEL,
    input=[
        {
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": "A photo."},
            ]
        }
    ],
    encoding_format="float",
)
summary["image_embedding"] = {
    "values": with_image.data[0].embedding,
    "prompt_tokens": with_image.usage.prompt_tokens,
}

summary["bad_image"] = error_of(
    lambda: client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"},
                    },
                ],
            }
        ],
        max_tokens=4,
    )
)
summary["wrong_key"] = error_of(
    lambda: openai.OpenAI(base_url=base_url, api_key="not-the-key", max_retries=0)
    .chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
)
summary["unknown_model"] = error_of(
    lambda: client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
)

# A long stream abandoned after its first chunk: the server must free it.
abandoned = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Count to a thousand."}],
    max_tokens=8000,
    stream=True,
    extra_body={"ignore_eos": True},
)
first = next(iter(abandoned))
# Still decoding (held back by the stream's bound), then abandoned.
running = server_load()
abandoned.close()
summary["abandoned"] = {
    "first_chunk": first.choices[0].delta.role,
    "running": running,
    "server": server_load(),
}

print(json.dumps(summary))
