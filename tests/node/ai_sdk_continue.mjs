// The Vercel AI SDK (`ai` + `@ai-sdk/openai`) through tether after a denial it never sees:
// one task, its steps until an answer without a tool call (stepCountIs(5) only bounds it).
// Usage: node ai_sdk_continue.mjs BASE_URL responses|chat generate|stream. Prints one JSON line.
import { createOpenAI } from '@ai-sdk/openai';
import { generateText, jsonSchema, stepCountIs, streamText, tool } from 'ai';

const [baseURL, api, mode] = process.argv.slice(2);
const openai = createOpenAI({ baseURL, apiKey: 'sk-agent' });
const ran = [];
const tools = {
  list_volumes: tool({
    description: 'List volumes',
    inputSchema: jsonSchema({ type: 'object', properties: {} }),
    execute: async () => { ran.push('list_volumes'); return '[vol-9 (production)]'; },
  }),
  delete_volume: tool({
    description: 'Delete a volume',
    inputSchema: jsonSchema({ type: 'object', properties: {} }),
    execute: async () => { ran.push('delete_volume'); return 'deleted'; },
  }),
};

try {
  const model = api === 'chat' ? openai.chat('gpt-x') : openai.responses('gpt-x');
  const options = { model, prompt: 'clean up the volumes', tools, stopWhen: stepCountIs(5) };
  let steps;
  let text;
  let streamed = '';
  if (mode === 'stream') {
    let failed = null;
    const result = streamText({ ...options, onError: ({ error }) => { failed = error; } });
    for await (const delta of result.textStream) streamed += delta;
    if (failed) throw failed;
    steps = await result.steps;
    text = await result.text;
  } else {
    const result = await generateText(options);
    steps = result.steps;
    text = result.text;
  }
  console.log(JSON.stringify({
    ok: true, text, streamed, ran,
    steps: steps.map((s) => ({ text: s.text, calls: s.toolCalls.map((c) => c.toolName),
                               finish: s.finishReason })),
  }));
} catch (error) {
  console.log(JSON.stringify({ ok: false, error: String(error?.message ?? error),
                               body: error?.responseBody ?? null, ran }));
}
