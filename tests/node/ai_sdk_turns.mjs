// The Vercel AI SDK (`ai` + `@ai-sdk/openai`, Responses API, default `store`) through tether:
// one turn whose answer holds an allowed and a denied call (the SDK runs the allowed one and
// goes on in a second step, sending earlier output back as item references), then one more
// turn. Usage: node ai_sdk_turns.mjs BASE_URL generate|stream. Prints one JSON line.
import { createOpenAI } from '@ai-sdk/openai';
import { generateText, jsonSchema, stepCountIs, streamText, tool } from 'ai';

const [baseURL, mode] = process.argv.slice(2);
const openai = createOpenAI({ baseURL, apiKey: 'sk-agent' });
const ran = [];
const tools = {
  list_volumes: tool({
    description: 'List volumes',
    inputSchema: jsonSchema({ type: 'object', properties: {} }),
    execute: async () => { ran.push('list_volumes'); return '[vol-9]'; },
  }),
  delete_volume: tool({
    description: 'Delete a volume',
    inputSchema: jsonSchema({ type: 'object', properties: {} }),
    execute: async () => { ran.push('delete_volume'); return 'deleted'; },
  }),
};

async function turn(messages) {
  const options = { model: openai.responses('gpt-x'), messages, tools, stopWhen: stepCountIs(4) };
  if (mode === 'stream') {
    let failed = null;
    const result = streamText({ ...options, onError: ({ error }) => { failed = error; } });
    await result.consumeStream();
    if (failed) throw failed;
    return { text: await result.text, messages: (await result.response).messages,
             steps: (await result.steps).length };
  }
  const result = await generateText(options);
  return { text: result.text, messages: result.response.messages, steps: result.steps.length };
}

try {
  const history = [{ role: 'user', content: 'clean up' }];
  const first = await turn(history);
  history.push(...first.messages, { role: 'user', content: 'thanks' });
  const second = await turn(history);
  console.log(JSON.stringify({ ok: true, first: first.text, firstSteps: first.steps,
                               second: second.text, ran }));
} catch (error) {
  console.log(JSON.stringify({ ok: false, error: String(error?.message ?? error),
                               body: error?.responseBody ?? null, ran }));
}
