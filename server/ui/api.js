// The REST and OpenAI routes of the server, with the API key kept in the browser.

const KEY_ITEM = "kvchunks.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_ITEM) || "";
}

// A key travels in an HTTP header, which holds printable ASCII only.
export const keyProblem = (key) =>
  /^[\x20-\x7e]*$/.test(key) ? null : "an API key holds printable ASCII characters only";

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_ITEM, key);
  else localStorage.removeItem(KEY_ITEM);
}

function headers() {
  const key = apiKey();
  const result = { "Content-Type": "application/json" };
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    message = (await response.json()).error.message;
  } catch {
    // not the server's JSON error: keep the status line
  }
  return new ApiError(response.status, message);
}

// What a call says when no response came at all (fetch's own TypeError names no cause).
export const UNREACHABLE = "the server cannot be reached; the page keeps trying";

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch {
    throw new ApiError(0, UNREACHABLE);
  }
}

async function call(method, path, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await send(path, init);
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

const q = encodeURIComponent;
const ctx = (name) => `/v1/contexts/${q(name)}`;

export const api = {
  chunks: (context) => call("GET", `/v1/chunks?context=${q(context)}`).then((r) => r.data),
  addChunk: (text, source, tags) => call("POST", "/v1/chunks", { text, source, tags }),
  deleteChunk: (hash, cascade = false) => call("DELETE", `/v1/chunks/${hash}?cascade=${cascade}`),
  tags: (hash, add, remove) => call("POST", `/v1/chunks/${hash}/tags`, { add, remove }),
  move: (hash, tier) => call("POST", `/v1/chunks/${hash}/move`, { tier }),
  contexts: () => call("GET", "/v1/contexts").then((r) => r.data),
  context: (name) => call("GET", ctx(name)),
  deleteContext: (name) => call("DELETE", ctx(name)),
  configure: (name, settings) => call("POST", `${ctx(name)}/settings`, settings),
  activate: (name, chunk) => call("POST", `${ctx(name)}/activate`, { chunk }),
  deactivate: (name, chunk) => call("POST", `${ctx(name)}/deactivate`, { chunk }),
  reorder: (name, chunks) => call("POST", `${ctx(name)}/order`, { chunks }),
  usage: () => call("GET", "/v1/usage"),
  // The answer stops as a Ctrl-C stops it: its stream ends with what was kept.
  stopRequest: (id) => call("POST", `/v1/requests/${q(id)}/stop`),
};

// POST /v1/chat/completions with stream=true: yields each parsed server-sent event.
export async function* streamChat(body) {
  const response = await send("/v1/chat/completions", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}
