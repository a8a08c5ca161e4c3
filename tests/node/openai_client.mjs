// OpenAI's official npm SDK against the server's OpenAI-compatible API.
// Usage: node openai_client.mjs BASE_URL API_KEY IMAGE_FILE METRICS_URL
// Prints the same JSON summary as tests/python/openai_client.py: a streamed
// chat with an image (greedy, with logprobs), a JSON Schema reply, embeddings,
// a bad image, a wrong key, an unknown model, an abandoned stream.
import fs from 'node:fs';
import OpenAI from 'openai';

const [baseURL, apiKey, imageFile, metricsUrl] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60000 });
const imageUrl = `data:image/png;base64,${fs.readFileSync(imageFile).toString('base64')}`;

async function serverLoad() {
  await new Promise((r) => setTimeout(r, 300));
  const text = await (await fetch(metricsUrl)).text();
  const value = (name) => Number((text.match(new RegExp(`^${name} (\\S+)$`, 'm')) || [])[1]);
  return { in_flight: value('internvl_requests_in_flight'), active: value('internvl_active_sequences') };
}

async function errorOf(call) {
  try {
    await call();
  } catch (e) {
    if (e instanceof OpenAI.APIError) return { status: e.status, type: e.constructor.name, body: e.error };
    throw e;
  }
  return null;
}

async function main() {
  const models = await client.models.list();
  const MODEL = models.data[0].id;
  const summary = { model: MODEL };

  const stream = await client.chat.completions.create({
    model: MODEL,
    messages: [{ role: 'user', content: [
      { type: 'image_url', image_url: { url: imageUrl } },
      { type: 'text', text: 'What is shown?' },
    ] }],
    temperature: 0,
    max_tokens: 12,
    logprobs: true,
    stream: true,
    stream_options: { include_usage: true },
  });
  const out = { text: '', tokens: [], chunks: 0, finish_reason: null, usage: null };
  for await (const chunk of stream) {
    out.chunks += 1;
    if (chunk.usage) out.usage = chunk.usage;
    for (const choice of chunk.choices) {
      out.text += choice.delta.content || '';
      if (choice.logprobs && choice.logprobs.content) out.tokens.push(...choice.logprobs.content.map((t) => t.token));
      out.finish_reason = choice.finish_reason || out.finish_reason;
    }
  }
  summary.stream = out;

  const schema = {
    type: 'object',
    properties: { animal: { type: 'string', maxLength: 12 }, legs: { type: 'integer' } },
    required: ['animal', 'legs'],
    additionalProperties: false,
  };
  const reply = await client.chat.completions.create({
    model: MODEL,
    messages: [{ role: 'user', content: 'Describe an animal as JSON.' }],
    temperature: 0.7,
    seed: 5,
    max_tokens: 200,
    response_format: { type: 'json_schema', json_schema: { name: 'animal', schema, strict: true } },
  });
  const content = reply.choices[0].message.content;
  const parsed = JSON.parse(content);
  // The schema's rules, checked here: the two keys, their types, nothing else.
  const keys = Object.keys(parsed).sort().join(',');
  if (keys !== 'animal,legs' || typeof parsed.animal !== 'string' || parsed.animal.length > 12
    || !Number.isInteger(parsed.legs)) {
    throw new Error(`reply does not match the schema: ${content}`);
  }
  summary.json_schema = { content, finish_reason: reply.choices[0].finish_reason };

  const floats = await client.embeddings.create({ model: MODEL, input: ['A photo of a cat.', 'A dog.'], encoding_format: 'float' });
  // The SDK asks for base64 by default and decodes it itself.
  const packed = await client.embeddings.create({ model: MODEL, input: 'A photo of a cat.' });
  const v = floats.data[0].embedding;
  summary.embeddings = {
    count: floats.data.length,
    dimensions: v.length,
    norm: Math.hypot(...v),
    base64_equal: JSON.stringify(Array.from(packed.data[0].embedding)) === JSON.stringify(v),
    prompt_tokens: floats.usage.prompt_tokens,
  };

  summary.bad_image = await errorOf(() => client.chat.completions.create({
    model: MODEL,
    messages: [{ role: 'user', content: [
      { type: 'text', text: 'What is this?' },
      { type: 'image_url', image_url: { url: 'data:image/png;base64,bm90IGFuIGltYWdl' } },
    ] }],
    max_tokens: 4,
  }));
  summary.wrong_key = await errorOf(() => new OpenAI({ baseURL, apiKey: 'not-the-key', maxRetries: 0 })
    .chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 2 }));
  summary.unknown_model = await errorOf(() => client.chat.completions.create({
    model: 'gpt-4o', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 2,
  }));

  const controller = new AbortController();
  const abandoned = await client.chat.completions.create({
    model: MODEL,
    messages: [{ role: 'user', content: 'Count to a thousand.' }],
    max_tokens: 8000,
    stream: true,
    ignore_eos: true,
  }, { signal: controller.signal });
  let firstRole = null;
  let running = null;
  try {
    for await (const chunk of abandoned) {
      firstRole = chunk.choices[0].delta.role;
      running = await serverLoad();
      controller.abort();
    }
  } catch (e) {
    if (!(e instanceof OpenAI.APIUserAbortError) && e.name !== 'AbortError') throw e;
  }
  summary.abandoned = { first_chunk: firstRole, running, server: await serverLoad() };
  console.log(JSON.stringify(summary));
}

main().catch((e) => {
  console.error(`openai node client: ${e.stack || e}`);
  process.exit(1);
});
