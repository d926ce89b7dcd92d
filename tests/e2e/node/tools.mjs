// The official Node SDK's helpers against t2 (tests/e2e/test_structured.py runs this with T2_BASE_URL and
// T2_MODEL set): `runTools` (calls a local function and sends its result back as a `tool` message),
// `stream` (accumulates streamed tool-call deltas) and `parse` with a JSON schema. Prints one JSON line
// with what each helper returned; any thrown error exits non-zero.
import OpenAI from 'openai';

const client = new OpenAI({ baseURL: process.env.T2_BASE_URL, apiKey: 'unused' });
const model = process.env.T2_MODEL;
const messages = [{ role: 'user', content: 'What is the weather like in Paris today?' }];
const weatherParams = {
  type: 'object',
  properties: { city: { type: 'string', maxLength: 30 }, unit: { enum: ['celsius', 'fahrenheit'] } },
  required: ['city', 'unit'],
  additionalProperties: false,
};

const calledWith = [];
const runner = client.chat.completions.runTools({
  model,
  messages,
  max_tokens: 100,
  temperature: 0,
  tool_choice: { type: 'function', function: { name: 'get_weather' } },
  tools: [{
    type: 'function',
    function: {
      name: 'get_weather',
      parameters: weatherParams,
      parse: JSON.parse,
      function: (args) => { calledWith.push(args); return '18 degrees and sunny'; },
    },
  }],
});
const runContent = await runner.finalContent();
const runMessages = runner.messages.map((m) => m.role);

const stream = client.chat.completions.stream({
  model,
  messages,
  max_tokens: 100,
  temperature: 0,
  tools: [{ type: 'function', function: { name: 'get_weather', parameters: weatherParams } }],
  tool_choice: 'required',
  parallel_tool_calls: false,
});
const doneArgs = [];
stream.on('tool_calls.function.arguments.done', (e) => doneArgs.push(e.arguments));
const streamed = await stream.finalChatCompletion();

const parsed = await client.chat.completions.parse({
  model,
  messages: [{ role: 'user', content: 'Name a big city and its population.' }],
  max_tokens: 100,
  temperature: 0,
  response_format: {
    type: 'json_schema',
    json_schema: {
      name: 'city',
      strict: true,
      schema: {
        type: 'object',
        properties: { city: { type: 'string', maxLength: 30 }, population: { type: 'integer' } },
        required: ['city', 'population'],
        additionalProperties: false,
      },
    },
  },
});

console.log(JSON.stringify({
  runTools: { calledWith, roles: runMessages, content: runContent },
  stream: {
    finish: streamed.choices[0].finish_reason,
    calls: streamed.choices[0].message.tool_calls.map((c) => [c.function.name, c.function.arguments]),
    doneArgs,
  },
  parse: { parsed: parsed.choices[0].message.parsed, finish: parsed.choices[0].finish_reason },
}));
