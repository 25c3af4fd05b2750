// The chat box: a question over the context's active chunks, its answer streamed as it is
// generated, and what kvchunks did for it (mode, tokens reused and recomputed, first token).

import { ApiError, api, streamChat } from "./api.js";
import { $, el, short } from "./util.js";

let page;
let answering = null; // the request_id of the answer being streamed, if one is

export function setup(p) {
  page = p;
  // The button sends a question, or while an answer comes, stops it.
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (answering) stop(answering);
    else ask();
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {  // not an input method's Enter
      e.preventDefault();
      ask();
    }
  });
}

async function ask() {
  const question = $("chat-input").value.trim();
  if (!question || answering) return;
  const sampling = samplingFields();
  if (!sampling) return; // said why; the question stays in the box
  $("chat-input").value = "";
  answering = requestId();
  $("chat-send").textContent = "stop";
  const turn = newTurn(question);
  try {
    const result = await stream(question, sampling, turn, answering);
    turn.facts.textContent = describe(result);
    turn.node.dataset.done = result.extension?.interrupted ? "stopped" : "true";
    toBottom();
  } catch (error) {
    const early = error instanceof ApiError && error.status === 499; // stopped, nothing kept
    turn.facts.replaceChildren(el("span", { class: !early && "error" }, error.message));
    turn.node.dataset.done = early ? "stopped" : "error";
  } finally {
    answering = null;
    $("chat-send").textContent = "send";
    $("chat-send").disabled = false;
    await page.run(async () => {});
  }
}

// The server stops the answer and ends its stream with what it kept: the answer so far,
// or, before the first token, nothing. Too late (the answer had ended), there is no
// request left to stop, and the answer reads as one that was not stopped.
async function stop(id) {
  $("chat-send").disabled = true;
  try {
    await api.stopRequest(id);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) page.status(error.message);
  }
}

// 128 random bits in hex: crypto.randomUUID is only there in a secure context, which a
// server reached over plain HTTP beyond loopback is not.
const requestId = () =>
  Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");

function newTurn(question) {
  const answer = el("div", { class: "answer" });
  const facts = el("div", { class: "facts" }, "waiting for the first token…");
  const node = el("div", { class: "turn" }, el("div", { class: "question" }, question), answer, facts);
  $("chat-log").append(node);
  toBottom();
  return { node, answer, facts };
}

const toBottom = () => ($("chat-log").scrollTop = $("chat-log").scrollHeight);

// The fields as the request's numbers (the server checks their ranges), or null after
// saying which one is not a number. Enter sends without the form's own checks.
function samplingFields() {
  const sampling = {};
  for (const [id, name] of [
    ["max-tokens", "max_tokens"],
    ["temperature", "temperature"],
  ]) {
    const field = $(id);
    if (field.validity.badInput) {
      page.status(`${name} must be a number`);
      return null;
    }
    if (field.value !== "") sampling[name] = Number(field.value);
  }
  return sampling;
}

async function stream(question, sampling, turn, id) {
  const body = {
    messages: [{ role: "user", content: question }],
    context: page.state.context,
    temperature: 0, // greedy unless the field says otherwise (OpenAI's default is 1)
    request_id: id,
    ...sampling,
  };
  const started = performance.now();
  const result = { firstMs: null, totalMs: null, extension: null, usage: null };
  for await (const event of streamChat(body)) {
    if (event.error) throw new ApiError(event.error.code, event.error.message);
    const text = event.choices?.[0]?.delta?.content;
    if (text) {
      result.firstMs ??= performance.now() - started;
      turn.answer.textContent += text;
      turn.facts.textContent = `first token after ${ms(result.firstMs)}…`;
      toBottom();
    }
    result.extension = event.kvchunks ?? result.extension;
    result.usage = event.usage ?? result.usage;
  }
  result.totalMs = performance.now() - started;
  return result;
}

function describe({ firstMs, totalMs, extension, usage }) {
  const parts = [];
  if (extension?.interrupted) parts.push("stopped: the answer so far was kept, marked interrupted");
  if (extension) {
    const fraction = extension.recompute === null ? "" : ` ${extension.recompute}`;
    parts.push(`mode ${extension.mode}${fraction}`);
    parts.push(`${extension.reused_tokens} tokens reused`);
    parts.push(`${extension.recomputed_tokens} recomputed`);
  }
  if (firstMs !== null) parts.push(`first token ${ms(firstMs)}`);
  if (usage) parts.push(`${usage.completion_tokens} tokens in ${ms(totalMs)}`);
  if (extension?.output_chunk) {
    parts.push(`prompt ${short(extension.prompt_chunk)} → answer ${short(extension.output_chunk)}`);
  }
  return parts.join(" · ");
}

const ms = (value) => (value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(2)} s`);
