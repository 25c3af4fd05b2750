// The kvchunks page: one state, read from the REST API, drawn by each part of the page.

import { UNREACHABLE, api, apiKey, keyProblem, setApiKey } from "./api.js";
import * as chat from "./chat.js";
import * as chunks from "./chunks.js";
import * as context from "./context.js";
import * as details from "./details.js";
import * as graph from "./graph.js";
import * as usage from "./usage.js";
import { $, short } from "./util.js";

const CONTEXT_ITEM = "kvchunks.context";
const STATUS_MS = 4000;
let statusTimer = null;

const state = {
  context: localStorage.getItem(CONTEXT_ITEM) || "default",
  chunks: [], // every chunk, with is_active as this context has it
  view: null, // the context: its settings and its active chunks in order
  selected: null, // the hash shown in the details
};

const page = {
  state,

  // Read the chunks and the context again and redraw everything.
  async refresh() {
    const [list, view] = await Promise.all([api.chunks(state.context), api.context(state.context)]);
    state.chunks = list;
    state.view = view;
    for (const part of [context, chunks, graph, details, usage]) part.render(state);
  },

  // Run an API call, then refresh; a failure is shown, not thrown. `done` is a message, or a
  // function of the call's result that makes one.
  async run(action, done) {
    try {
      const result = await action();
      await page.refresh();
      if (done) page.status(typeof done === "function" ? done(result) : done, true);
      return result ?? true;
    } catch (error) {
      page.status(explain(error));
      // Drawn again from the server: a control the user changed shows what the server kept.
      await page.refresh().catch(() => {});
      return null;
    }
  },

  // The server answered the usage poll: a standing "cannot be reached" is over.
  reached() {
    const line = $("status");
    if (line.hidden || line.textContent !== UNREACHABLE) return;
    line.hidden = true;
    page.refresh().catch(() => {});
  },

  // A line under the header: an error stays until the next message, a success fades.
  status(message, ok = false) {
    const line = $("status");
    line.textContent = message;
    line.className = ok ? "status ok" : "status";
    line.hidden = false;
    clearTimeout(statusTimer);
    if (ok) statusTimer = setTimeout(() => (line.hidden = true), STATUS_MS);
  },

  select(hash) {
    state.selected = hash;
    for (const part of [chunks, graph, details]) part.render(state);
  },

  toggle(chunk) {
    const call = chunk.is_active ? api.deactivate : api.activate;
    const verb = chunk.is_active ? "deactivated" : "activated";
    return page.run(() => call(state.context, chunk.hash), `${short(chunk.hash)} ${verb}`);
  },

  async setContext(name) {
    const before = state.context;
    state.context = name;
    if (await page.run(() => context.renderNames(state), `context ${name}`)) {
      localStorage.setItem(CONTEXT_ITEM, name);
      return;
    }
    // A name the server refused, or a server out of reach: back to the last context, which
    // the select shows even when the server cannot list the names now.
    state.context = before;
    context.showName(before);
    await page.run(() => context.renderNames(state));
  },
};

function explain(error) {
  if (error.status === 401) return `${error.message}: enter the server's API key at the top`;
  return error.message;
}

function setupKey() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    const problem = keyProblem(key);
    if (problem) return page.status(problem);
    setApiKey(key);
    await start();
  });
}

async function start() {
  if (await page.run(() => context.renderNames(state))) $("status").hidden = true;
}

for (const part of [context, chunks, graph, details, chat]) part.setup(page);
setupKey();
usage.setup(page);
start();
