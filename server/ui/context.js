// The context panel: pick, create or delete a context, its settings, and its active chunks
// in layout order (drag to reorder, × to deactivate).

import { api } from "./api.js";
import { $, badge, el, short, snippet } from "./util.js";

let page;
let dragged = null; // index of the active chunk being dragged

export function setup(p) {
  page = p;
  $("context-select").addEventListener("change", (e) => page.setContext(e.target.value));
  $("context-new").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("context-name").value.trim();
    $("context-name").value = "";
    if (name) page.setContext(name);
  });
  $("context-delete").addEventListener("click", remove);
  $("mode").addEventListener("change", () => configure({ mode: $("mode").value }));
  $("recompute").addEventListener("change", () => {
    const field = $("recompute");
    // Text that is no number reads as "", which would clear the setting: refused instead.
    if (field.validity.badInput) {
      page.status("recompute must be a number from 0 to 1 (empty: the default)");
      return page.refresh();
    }
    configure({ mode: "realign", recompute: field.value === "" ? null : Number(field.value) });
  });
  $("auto-activate").addEventListener("change", (e) =>
    configure({ auto_activate: e.target.checked }),
  );
}

// Forget the context on the server, then work on "default" (which, deleted, starts anew).
async function remove() {
  const name = page.state.context;
  const forgotten = "Its settings and active list are forgotten; no chunk is deleted.";
  if (!confirm(`Delete context ${name}? ${forgotten}`)) return;
  if (await page.run(() => api.deleteContext(name))) {
    await page.setContext("default");
    page.status(`context ${name} deleted`, true);
  }
}

function configure(settings) {
  page.run(() => api.configure(page.state.context, settings), "settings saved");
}

export async function renderNames(state) {
  const names = new Set(["default", state.context, ...(await api.contexts())]);
  const select = $("context-select");
  select.replaceChildren(...[...names].sort().map((n) => el("option", { value: n }, n)));
  select.value = state.context;
}

// The select shows the context the page works on, listed or not.
export function showName(name) {
  const select = $("context-select");
  if (![...select.options].some((o) => o.value === name)) {
    select.append(el("option", { value: name }, name));
  }
  select.value = name;
}

export function render(state) {
  showName(state.context);
  const view = state.view;
  $("mode").value = view.mode;
  $("recompute").value = view.recompute ?? "";
  $("recompute").disabled = view.mode !== "realign";
  $("auto-activate").checked = view.auto_activate;
  $("active-list").replaceChildren(...view.chunks.map((c, i) => item(c, i, state)));
  $("active-total").textContent =
    `${view.chunks.length} active, ${view.token_count} of ${view.window} tokens`;
}

function item(chunk, index, state) {
  return el(
    "li",
    {
      draggable: "true",
      tabindex: "0",
      title: "Enter: details; Alt+↑ / Alt+↓: move",
      dataset: { hash: chunk.hash },
      onkeydown: (e) => keyed(e, chunk, index, state),
      ondragstart: () => (dragged = index),
      ondragover: (e) => {
        e.preventDefault();
        e.currentTarget.classList.add("drag-over");
      },
      ondragleave: (e) => e.currentTarget.classList.remove("drag-over"),
      ondrop: (e) => {
        e.preventDefault();
        drop(index, state);
      },
      onclick: () => page.select(chunk.hash),
    },
    badge(chunk),
    el("span", { class: "hash" }, short(chunk.hash)),
    el("span", { class: "text", title: snippet(chunk.text, 400) }, snippet(chunk.text, 60)),
    el("span", { class: "hint" }, `${chunk.token_count} tok`),
    el(
      "button",
      {
        class: "small deactivate",
        title: "deactivate",
        onclick: (e) => {
          e.stopPropagation();
          page.toggle(chunk);
        },
      },
      "×",
    ),
  );
}

// The keyboard's way to what the mouse does: Enter shows the details, Alt+arrow moves.
function keyed(e, chunk, index, state) {
  const step = { ArrowUp: -1, ArrowDown: 1 }[e.key];
  if (e.key === "Enter") page.select(chunk.hash);
  else if (step && e.altKey) {
    e.preventDefault();
    const target = index + step;
    if (target >= 0 && target < state.view.chunks.length) {
      move(index, target, state).then(() => focusItem(chunk.hash));
    }
  }
}

const focusItem = (hash) =>
  [...$("active-list").children].find((li) => li.dataset.hash === hash)?.focus();

// Move the dragged chunk to where it was dropped.
function drop(target, state) {
  const from = dragged;
  dragged = null;
  if (from === null || from === target) return page.refresh();
  return move(from, target, state);
}

// Move one active chunk to another place, and send the whole new order.
function move(from, target, state) {
  const order = state.view.chunks.map((c) => c.hash);
  const [moved] = order.splice(from, 1);
  order.splice(target, 0, moved);
  return page.run(() => api.reorder(state.context, order), "order saved");
}
