// The official OpenAI Node SDK (npm `openai`) against lorcserve's gateway. Started by
// gateway_e2e_test.py, which passes:
//   GATEWAY_URL (gateway A: no auth), AUTH_URL (gateway B: --auth-token-file, in front of a
//   coordinator with a queue of 1), AUTH_TOKEN, DEAD_URL (gateway C: no coordinator),
//   MODEL (served name), GREEDY_PROMPT / GREEDY_TEXT (`lorcserve generate` greedy, 24 tokens).
// Exits non-zero on the first failed assertion.
import assert from "node:assert/strict";
import OpenAI from "openai";

const env = process.env;
const client = new OpenAI({ baseURL: `${env.GATEWAY_URL}/v1`, apiKey: "unused", maxRetries: 0 });
const model = env.MODEL;
const checks = [];
const check = (name, fn) => checks.push([name, fn]);

check("models.list names the served model", async () => {
  const list = await client.models.list();
  assert.deepEqual(list.data.map((m) => m.id), [model]);
});

check("models.retrieve: the served model, NotFoundError for another", async () => {
  assert.equal((await client.models.retrieve(model)).id, model);
  await assert.rejects(client.models.retrieve("gpt-4o"),
                       (e) => e instanceof OpenAI.NotFoundError && e.code === "model_not_found");
});

check("completion, greedy: text equals lorcserve generate", async () => {
  const r = await client.completions.create({
    model, prompt: env.GREEDY_PROMPT, max_tokens: 24, temperature: 0,
  });
  assert.equal(r.object, "text_completion");
  assert.equal(r.choices[0].text, env.GREEDY_TEXT);
  assert.equal(r.choices[0].finish_reason, "length");
  assert.equal(r.usage.completion_tokens, 24);
  assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + 24);
});

check("completion, streamed: the chunks join to the same text; include_usage", async () => {
  const stream = await client.completions.create({
    model, prompt: env.GREEDY_PROMPT, max_tokens: 24, temperature: 0, stream: true,
    stream_options: { include_usage: true },
  });
  let text = "", finish = null, usage = null, chunks = 0;
  for await (const c of stream) {
    chunks++;
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) {
      text += ch.text;
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  assert.ok(chunks > 2, `only ${chunks} chunks`);
  assert.equal(text, env.GREEDY_TEXT);
  assert.equal(finish, "length");
  assert.equal(usage.completion_tokens, 24);
});

const messages = [
  { role: "system", content: "You are a dictionary." },
  { role: "user", content: "Define the word" },
];

check("chat, streamed and not: the same greedy text", async () => {
  const r = await client.chat.completions.create({ model, messages, max_tokens: 16, temperature: 0 });
  assert.equal(r.object, "chat.completion");
  assert.equal(r.choices[0].message.role, "assistant");
  assert.equal(r.usage.completion_tokens, 16);
  const stream = await client.chat.completions.create({
    model, messages, max_tokens: 16, temperature: 0, stream: true,
    stream_options: { include_usage: true },
  });
  let text = "", role = null, usage = null;
  for await (const c of stream) {
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) {
      if (ch.delta.role) role = ch.delta.role;
      text += ch.delta.content ?? "";
    }
  }
  assert.equal(role, "assistant");
  assert.equal(text, r.choices[0].message.content);
  assert.equal(usage.prompt_tokens, r.usage.prompt_tokens);
});

check("n = 3 with a seed: three choices, indexed, reproducible", async () => {
  const req = { model, prompt: "The word", max_tokens: 8, temperature: 1, n: 3, seed: 11 };
  const a = await client.completions.create(req);
  const b = await client.completions.create(req);
  assert.deepEqual(a.choices.map((c) => c.index), [0, 1, 2]);
  assert.deepEqual(a.choices.map((c) => c.text), b.choices.map((c) => c.text));
  assert.equal(a.usage.completion_tokens, 24);
  const c = await client.completions.create({ ...req, seed: 12 });
  assert.notDeepEqual(a.choices.map((x) => x.text), c.choices.map((x) => x.text));
});

check("seed reproducibility, chat streamed with n = 2", async () => {
  const req = { model, messages, max_tokens: 8, temperature: 1, n: 2, seed: 5, stream: true };
  const run = async () => {
    const texts = ["", ""];
    for await (const c of await client.chat.completions.create(req)) {
      for (const ch of c.choices) texts[ch.index] += ch.delta.content ?? "";
    }
    return texts;
  };
  assert.deepEqual(await run(), await run());
});

check("completion logprobs: tokens, token_logprobs, top_logprobs (2 each)", async () => {
  const r = await client.completions.create({
    model, prompt: env.GREEDY_PROMPT, max_tokens: 6, temperature: 0, logprobs: 2,
  });
  const lp = r.choices[0].logprobs;
  assert.equal(lp.tokens.length, 6);
  assert.equal(lp.tokens.join(""), r.choices[0].text);
  for (let i = 0; i < 6; i++) {
    assert.ok(lp.token_logprobs[i] <= 0);
    const top = Object.values(lp.top_logprobs[i]);
    assert.ok(top.length >= 2 && top.length <= 3);
    // greedy: the chosen token is the most likely one
    assert.ok(Math.abs(Math.max(...top) - lp.token_logprobs[i]) < 1e-5);
  }
});

check("chat logprobs with top_logprobs = 3", async () => {
  const r = await client.chat.completions.create({
    model, messages, max_tokens: 4, temperature: 0, logprobs: true, top_logprobs: 3,
  });
  const content = r.choices[0].logprobs.content;
  assert.equal(content.length, 4);
  for (const t of content) {
    assert.equal(t.top_logprobs.length, 3);
    assert.equal(t.top_logprobs[0].token, t.token);
    assert.deepEqual(Buffer.from(t.bytes).toString("utf8"), t.token);
  }
});

check("stop string: text cut before it, finish_reason stop", async () => {
  const full = await client.completions.create({
    model, prompt: env.GREEDY_PROMPT, max_tokens: 24, temperature: 0,
  });
  const stopAt = " verb";
  assert.ok(full.choices[0].text.includes(stopAt), full.choices[0].text);
  const r = await client.completions.create({
    model, prompt: env.GREEDY_PROMPT, max_tokens: 24, temperature: 0, stop: [stopAt],
  });
  assert.equal(r.choices[0].text, full.choices[0].text.slice(0, full.choices[0].text.indexOf(stopAt)));
  assert.equal(r.choices[0].finish_reason, "stop");
  assert.equal(r.choices[0].stop_reason, stopAt);
});

check("usage: cached_tokens on a repeated prefix", async () => {
  const prompt = "A fool and his money are soon parted, said the " + "old ".repeat(40) + "man";
  const first = await client.completions.create({ model, prompt, max_tokens: 2, temperature: 0 });
  const again = await client.completions.create({ model, prompt, max_tokens: 2, temperature: 0 });
  assert.ok(first.usage.prompt_tokens > 40);
  assert.ok(again.usage.prompt_tokens_details.cached_tokens >= 32,
    JSON.stringify(again.usage));
  assert.ok(again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens);
});

check("errors: 404 unknown model, 400 naming the field", async () => {
  await assert.rejects(client.completions.create({ model: "no-such-model", prompt: "x" }),
    (e) => e instanceof OpenAI.NotFoundError && e.status === 404 && e.code === "model_not_found");
  await assert.rejects(
    client.chat.completions.create({ model, messages, top_logprobs: 2 }),
    (e) => e instanceof OpenAI.BadRequestError && e.param === "top_logprobs");
  await assert.rejects(
    client.completions.create({ model, prompt: "x", max_tokens: 4, temperature: -1 }),
    (e) => e instanceof OpenAI.BadRequestError && /temperature/.test(e.message));
  await assert.rejects(
    client.chat.completions.create({ model, messages,
      tools: [{ type: "function", function: { name: "f" } }] }),
    (e) => e instanceof OpenAI.BadRequestError && e.param === "tools");
  // a coordinator-side rejection (INVALID_ARGUMENT) maps to 400 too
  await assert.rejects(
    client.completions.create({ model, prompt: "x", n: 65 }),
    (e) => e instanceof OpenAI.BadRequestError && /n/.test(e.message));
});

check("401 without or with a wrong token when auth is on; OK with it", async () => {
  for (const apiKey of ["wrong-token", ""]) {
    const c = new OpenAI({ baseURL: `${env.AUTH_URL}/v1`, apiKey: apiKey || "x", maxRetries: 0,
      defaultHeaders: apiKey ? {} : { Authorization: null } });
    await assert.rejects(c.models.list(),
      (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);
  }
  const ok = new OpenAI({ baseURL: `${env.AUTH_URL}/v1`, apiKey: env.AUTH_TOKEN, maxRetries: 0 });
  const r = await ok.completions.create({ model, prompt: "x", max_tokens: 2 });
  assert.equal(r.usage.completion_tokens, 2);
});

check("429 when the coordinator's queue is full (RateLimitError)", async () => {
  const c = new OpenAI({ baseURL: `${env.AUTH_URL}/v1`, apiKey: env.AUTH_TOKEN, maxRetries: 0 });
  const results = await Promise.allSettled(Array.from({ length: 6 }, () =>
    c.completions.create({ model, prompt: "x", max_tokens: 64, ignore_eos: true })));
  const ok = results.filter((r) => r.status === "fulfilled");
  const limited = results.filter((r) => r.status === "rejected");
  assert.ok(ok.length >= 1, "none served");
  assert.ok(limited.length >= 1, "none rejected");
  for (const r of limited) {
    assert.ok(r.reason instanceof OpenAI.RateLimitError, String(r.reason));
    assert.equal(r.reason.status, 429);
  }
});

check("503 when the coordinator is unreachable", async () => {
  const c = new OpenAI({ baseURL: `${env.DEAD_URL}/v1`, apiKey: "x", maxRetries: 0 });
  await assert.rejects(c.completions.create({ model, prompt: "x" }),
    (e) => e instanceof OpenAI.InternalServerError && e.status === 503);
  await assert.rejects(c.models.list(), (e) => e.status === 503);
});

let failed = 0;
for (const [name, fn] of checks) {
  try {
    await fn();
    console.log(`ok   ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e.stack || e}`);
  }
}
console.log(`${checks.length - failed}/${checks.length} passed`);
process.exit(failed ? 1 : 0);
