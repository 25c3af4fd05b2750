// The chosen chunk: its text, where it sits in the tree, and its whole record.

import { $, badge, el, short, when } from "./util.js";

const HINT = "Click a node, or press Enter on it, for its text and record.";
let page;

export function setup(p) {
  page = p;
  render(page.state); // the hint, before anything is read
}

export function render(state) {
  const chunk = state.chunks.find((c) => c.hash === state.selected);
  if (!chunk) {
    $("details").replaceChildren(el("p", { class: "hint" }, HINT));
    return;
  }
  const action = chunk.is_active ? "deactivate" : "activate";
  $("details").replaceChildren(
    el(
      "div",
      { class: "row" },
      badge(chunk),
      el("span", { class: "hash" }, chunk.hash),
      el("button", { class: "small", onclick: () => page.toggle(chunk) }, action),
    ),
    el("dl", {}, ...facts(chunk).flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)])),
    el("div", { class: "text", id: "details-text" }, chunk.text ?? ""),
    el("details", {}, el("summary", {}, "record"), el("pre", {}, JSON.stringify(chunk, null, 2))),
  );
}

function facts(chunk) {
  const rows = [
    ["role / kind", `${chunk.role} / ${chunk.kind}`],
    ["tokens", String(chunk.token_count)],
    ["tier", chunk.tier],
    ["active", chunk.is_active ? `yes, in ${page.state.context}` : "no"],
    ["tags", chunk.tags.join(" ") || "–"],
    ["created", when(chunk.created_at)],
    ["computed after", parentLinks(chunk.parent_chunks)],
  ];
  if (chunk.generation_params) rows.push(["generation", JSON.stringify(chunk.generation_params)]);
  return rows;
}

function parentLinks(hashes) {
  if (!hashes.length) return "nothing (standalone)";
  return el(
    "span",
    {},
    ...hashes.map((hash) => {
      const onclick = (e) => {
        e.preventDefault();
        page.select(hash);
      };
      return [el("a", { href: "#", class: "hash", onclick }, short(hash)), " "];
    }),
  );
}
