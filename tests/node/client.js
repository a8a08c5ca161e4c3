// A Node @grpc/grpc-js client of internvl.v1, loading proto/ at run time as a
// Node backend would. Usage: node client.js PROTO_ROOT ADDRESS IMAGE_FILE METRICS_URL VIDEO_FILE
// Prints one JSON summary: a streamed Generate (with an image), one with a
// video file the server decodes, an Embed, a
// Generate cancelled after its first token and one past its deadline (each
// with what the server's metrics say 300 ms later), a refused request, and a
// response_format reply.
'use strict';
const fs = require('fs');
const http = require('http');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [protoRoot, address, imageFile, metricsUrl, videoFile] = process.argv.slice(2);

// Requests in flight and slots in use, from the server's own metrics, a
// moment after the client gave up on a call: what the server did about it.
function serverLoad() {
  return new Promise((resolve, reject) => {
    setTimeout(() => {
      http.get(metricsUrl, (res) => {
        let body = '';
        res.on('data', (chunk) => { body += chunk; });
        res.on('end', () => {
          const value = (name) => Number((body.match(new RegExp(`^${name} (\\S+)$`, 'm')) || [])[1]);
          resolve({
            in_flight: value('internvl_requests_in_flight'),
            active: value('internvl_active_sequences'),
          });
        });
      }).on('error', reject);
    }, 300);
  });
}
const definition = protoLoader.loadSync('internvl/v1/internvl.proto', {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [protoRoot],
});
const { InternVL } = grpc.loadPackageDefinition(definition).internvl.v1;
const client = new InternVL(address, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 60000);

function user(content) {
  return [{ role: 'user', content }];
}

function generate(request, { cancelAfterFirst = false } = {}) {
  return new Promise((resolve) => {
    const out = { text: '', ids: [], deltas: 0, done: null, error: null };
    const call = client.Generate(request, { deadline: deadline() });
    call.on('data', (response) => {
      if (response.event === 'delta') {
        out.deltas += 1;
        out.text += response.delta.text;
        out.ids.push(...response.delta.tokens.map((t) => t.id));
        if (cancelAfterFirst) call.cancel();
      } else if (response.event === 'done') {
        out.done = {
          finish_reason: response.done.finish_reason,
          completion_tokens: response.done.usage.completion_tokens,
          image_tokens: response.done.usage.image_tokens,
        };
      }
    });
    call.on('error', (e) => {
      out.error = { code: grpc.status[e.code], details: e.details };
    });
    call.on('status', () => resolve(out));
  });
}

function embed(request) {
  return new Promise((resolve) => {
    client.Embed(request, { deadline: deadline() }, (e, response) => {
      if (e) resolve({ error: { code: grpc.status[e.code], details: e.details } });
      else resolve({ count: response.embeddings.length, dimensions: response.dimensions,
        norm: Math.hypot(...response.embeddings[0].values), tokens: response.embeddings[0].tokens });
    });
  });
}

async function main() {
  const image = fs.readFileSync(imageFile);
  const summary = {};
  summary.generate = await generate({
    messages: user([{ image: { data: image } }, { text: 'What is shown?' }]),
    sampling: { temperature: 0 },
    max_new_tokens: 12,
    ignore_eos: true,
    request_id: 'node-client',
  });
  summary.video = await generate({
    messages: user([
      { video: { data: fs.readFileSync(videoFile), num_frames: 8 } },
      { text: 'What happens in the video?' },
    ]),
    sampling: { temperature: 0 },
    max_new_tokens: 8,
    ignore_eos: true,
  });
  summary.embed = await embed({
    inputs: [{ content: [{ text: 'A photo of a cat.' }] }],
    pooling: 'POOLING_MEAN',
    normalize: true,
  });
  summary.cancelled = await generate(
    // Long enough (seconds) that a server which missed the cancel would
    // still be decoding it when the test looks.
    { messages: user([{ text: 'Count to a thousand.' }]), max_new_tokens: 8000, ignore_eos: true },
    { cancelAfterFirst: true },
  );
  summary.cancelled.server = await serverLoad();
  summary.refused = await generate({ messages: user([{ text: 'Hi' }]), max_new_tokens: 0 });
  summary.deadline = await new Promise((resolve) => {
    const call = client.Generate(
      { messages: user([{ text: 'Count to a thousand.' }]), max_new_tokens: 8000, ignore_eos: true },
      { deadline: new Date(Date.now() + 200) },
    );
    let deltas = 0;
    call.on('data', () => { deltas += 1; });
    call.on('error', (e) => resolve({ code: grpc.status[e.code], deltas }));
    call.on('end', () => resolve({ code: 'OK', deltas }));
  });
  summary.deadline.server = await serverLoad();
  summary.constrained = await generate({
    messages: user([{ text: 'Yes or no?' }]),
    sampling: { temperature: 1, seed: 3 },
    max_new_tokens: 20,
    response_format: { choice: { options: ['yes', 'no'] } },
  });
  client.close();
  console.log(JSON.stringify(summary));
}

main().catch((e) => {
  console.error(`node client: ${e.stack || e}`);
  process.exit(1);
});
