"""OpenAI's Python SDK over TLS: its own HTTP client speaks HTTP/1.1.

Usage: openai_tls.py BASE_URL CA_FILE
Lists the models and asks one short question; prints a JSON summary with
the HTTP version the connection used.
"""
import json
import ssl
import sys

import openai

base_url, ca_file = sys.argv[1:3]
versions = []
http = openai.DefaultHttpxClient(
    verify=ssl.create_default_context(cafile=ca_file),
    event_hooks={"response": [lambda r: versions.append(r.http_version)]},
)
client = openai.OpenAI(base_url=base_url, api_key="unused", http_client=http, max_retries=0)
model = client.models.list().data[0].id
reply = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
)
print(
    json.dumps(
        {
            "model": model,
            "completion_tokens": reply.usage.completion_tokens,
            "http_versions": sorted(set(versions)),
        }
    )
)
