// The chunk table: search and filters, activate, move, tag and delete; loading a document.

import { ApiError, api } from "./api.js";
import { $, badge, chunkType, el, short, snippet, when } from "./util.js";

const TIERS = ["gpu", "cpu", "disk"];
const TYPES = ["document", "prompt", "answer", "composed", "split"];
let page;

export function setup(p) {
  page = p;
  for (const id of ["search", "filter-tag", "filter-kind", "filter-tier"]) {
    $(id).addEventListener("input", () => render(page.state));
  }
  $("refresh").addEventListener("click", () => page.run(async () => {}));
  $("load-form").addEventListener("submit", (e) => {
    e.preventDefault();
    loadDocument();
  });
}

export function render(state) {
  const tags = [...new Set(state.chunks.flatMap((c) => c.tags))].sort();
  fillSelect($("filter-tag"), "any tag", tags);
  fillSelect($("filter-kind"), "any type", TYPES);
  fillSelect($("filter-tier"), "any tier", TIERS);
  const shown = state.chunks.filter(matcher());
  $("chunk-table").tBodies[0].replaceChildren(...shown.map((c) => row(c, state)));
  $("chunk-count").textContent = `${shown.length} of ${state.chunks.length} chunks`;
}

function fillSelect(select, anyLabel, values) {
  const current = select.value;
  const options = values.map((v) => el("option", { value: v }, v));
  select.replaceChildren(el("option", { value: "" }, anyLabel), ...options);
  select.value = values.includes(current) ? current : "";
}

// The search matches a hash prefix, or the text or name anywhere (case-insensitive).
function matcher() {
  const text = $("search").value.trim().toLowerCase();
  const tag = $("filter-tag").value;
  const type = $("filter-kind").value;
  const tier = $("filter-tier").value;
  return (chunk) =>
    (!tag || chunk.tags.includes(tag)) &&
    (!type || chunkType(chunk) === type) &&
    (!tier || chunk.tier === tier) &&
    (!text ||
      chunk.hash.startsWith(text) ||
      `${name(chunk) ?? ""} ${chunk.text ?? ""}`.toLowerCase().includes(text));
}

// A document's name: where its text came from (a file, or the name given when it was loaded).
function name(chunk) {
  const source = chunk.metadata?.source;
  return chunkType(chunk) === "document" && source && source !== "text" ? source : null;
}

function row(chunk, state) {
  const classes = [chunk.is_active && "is-active", state.selected === chunk.hash && "selected"];
  const label = name(chunk);
  return el(
    "tr",
    { class: classes.filter(Boolean).join(" "), dataset: { hash: chunk.hash } },
    el("td", {}, toggleButton(chunk)),
    el("td", { class: "hash", title: chunk.hash }, selectLink(chunk)),
    el("td", {}, badge(chunk)),
    el(
      "td",
      { class: "text", title: snippet(chunk.text, 400) },
      label && el("b", {}, `${label}: `),
      snippet(chunk.text, 90),
    ),
    el("td", { class: "num" }, String(chunk.token_count)),
    el("td", {}, tierSelect(chunk)),
    el("td", {}, tagList(chunk)),
    el("td", {}, when(chunk.created_at)),
    el("td", {}, el("button", { class: "small delete", onclick: () => remove(chunk) }, "delete")),
  );
}

function toggleButton(chunk) {
  const text = chunk.is_active ? "deactivate" : "activate";
  return el("button", { class: "small toggle", onclick: () => page.toggle(chunk) }, text);
}

function selectLink(chunk) {
  const onclick = (e) => {
    e.preventDefault();
    page.select(chunk.hash);
  };
  return el("a", { href: "#", onclick }, short(chunk.hash));
}

function tierSelect(chunk) {
  const select = el("select", { class: "tier", "aria-label": "tier" });
  select.replaceChildren(...TIERS.map((t) => el("option", { value: t }, t)));
  select.value = chunk.tier;
  select.addEventListener("change", () =>
    page.run(() => api.move(chunk.hash, select.value), `${short(chunk.hash)} moved to ${select.value}`),
  );
  return select;
}

function tagList(chunk) {
  const chips = chunk.tags.map((tag) =>
    el(
      "span",
      { class: "tag" },
      tag,
      el("button", { title: "remove tag", onclick: () => retag(chunk, [], [tag]) }, "×"),
    ),
  );
  const add = () => {
    const answer = prompt(`Tags to add to ${short(chunk.hash)} (space separated)`);
    const tags = (answer || "").split(/\s+/).filter(Boolean);
    if (tags.length) retag(chunk, tags, []);
  };
  return [...chips, el("button", { class: "small add-tag", onclick: add }, "+ tag")];
}

function retag(chunk, add, removed) {
  return page.run(() => api.tags(chunk.hash, add, removed), `tags of ${short(chunk.hash)} saved`);
}

// A chunk that views or later chunks depend on is deleted only with them, after a second yes.
async function remove(chunk) {
  if (!confirm(`Delete ${short(chunk.hash)} (${chunkType(chunk)})?`)) return;
  const said = (deleted) => `${short(chunk.hash)} ${deleted ? "deleted" : "kept"}`;
  await page.run(async () => {
    try {
      await api.deleteChunk(chunk.hash);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 409)) throw error;
      // The server's message names the views, then how to delete them from code: not here.
      const views = error.message.split(";")[0];
      if (!confirm(`${views}.\n\nDelete them too?`)) return false;
      await api.deleteChunk(chunk.hash, true);
    }
    return true;
  }, said);
}

async function loadDocument() {
  const text = $("doc-text").value;
  const source = $("doc-name").value.trim() || undefined;
  const tags = $("doc-tags").value.split(/\s+/).filter(Boolean);
  const loaded = (c) => `loaded ${short(c.hash)}: ${c.token_count} tokens`;
  if (await page.run(() => api.addChunk(text, source, tags), loaded)) $("load-form").reset();
}
