// The provenance tree from the keyboard. Cytoscape draws the nodes on a canvas, so each node
// has a transparent stand-in laid over it: a WAI-ARIA tree item named by the chunk's type and
// text, which takes the focus (and shows the focus ring) where the node is drawn. The tree is
// one tab stop (roving tabindex). The arrows follow the drawing, which hangs each chunk below
// the one it follows: ↑ the parent, ↓ a child, ← → the siblings (between roots: the trees);
// Home and End the first and last node. Enter and Space do what a click does.

import { $, chunkType, el, snippet } from "./util.js";

let cy;
let page;
let reveal; // brings a node into view, readable
let items = new Map(); // hash -> its stand-in, in tree order (depth first, as drawn)
let current = null; // the node that holds the tab stop
let chosen = null; // the selection when last drawn: a new one takes the tab stop
let upFrom = null; // the node ↑ last left: ↓ goes back to it
let parentOf = new Map(); // hash -> the node it hangs under, as last built

export function setup(graph, p, revealNode) {
  [cy, page, reveal] = [graph, p, revealNode];
  cy.on("viewport resize", place);
  const tree = $("graph-keys");
  tree.addEventListener("keydown", keyed);
  tree.addEventListener("focusin", (e) => focused(e.target));
}

// `reshaped`: the nodes or edges changed, and were laid out again. A keyboard user in the
// tree (say, while an answer arrives) stays on their node, or on the nearest one above it that
// is still drawn: the rebuilt stand-ins would otherwise drop the focus to the page's start.
export function render(chunks, selected, reshaped) {
  const walking = $("graph-keys").contains(document.activeElement);
  const above = parentOf;
  if (reshaped) build();
  if (selected !== chosen) {
    chosen = selected;
    if (items.has(selected)) current = selected;
  }
  while (current && !items.has(current)) current = above.get(current);
  current ??= items.keys().next().value ?? null;
  for (const chunk of chunks) {
    const item = items.get(chunk.hash);
    item?.setAttribute("aria-label", label(chunk));
    item?.setAttribute("aria-selected", String(chunk.hash === selected));
  }
  rove();
  place();
  if (walking && reshaped) items.get(current)?.focus({ preventScroll: true });
}

// Depth first in drawn order, so that a screen reader's reading order is the drawing's. A
// stack, not recursion: a conversation thousands of turns long is a branch that deep.
function build() {
  items = new Map();
  parentOf = new Map();
  const stack = siblings(roots(), 1, null).reverse();
  while (stack.length) {
    const { node, level, parent, position, count } = stack.pop();
    const item = el("div", {
      role: "treeitem",
      tabindex: "-1",
      "aria-level": level,
      "aria-posinset": position,
      "aria-setsize": count,
      dataset: { hash: node.id() },
    });
    items.set(node.id(), item);
    if (parent) parentOf.set(node.id(), parent);
    stack.push(...siblings(children(node), level + 1, node.id()).reverse());
  }
  $("graph-keys").replaceChildren(...items.values());
}

const siblings = (nodes, level, parent) =>
  nodes.map((node, i) => ({ node, level, parent, position: i + 1, count: nodes.length }));

// What a screen reader says of a node: what it is, whether it is active, how its text begins.
const label = (chunk) =>
  `${chunkType(chunk)}${chunk.is_active ? ", active" : ""}: ${snippet(chunk.text, 80)}`;

function rove() {
  for (const [hash, item] of items) item.tabIndex = hash === current ? 0 : -1;
}

// Each stand-in over its node as the view pans and zooms, so that the focus ring is drawn
// around the node and a screen magnifier follows it there.
function place() {
  for (const [hash, item] of items) {
    const node = cy.getElementById(hash);
    if (node.empty()) continue; // removed for a new drawing whose stand-ins come next
    const box = node.renderedBoundingBox({ includeLabels: false });
    Object.assign(item.style, {
      left: `${box.x1}px`,
      top: `${box.y1}px`,
      width: `${box.w}px`,
      height: `${box.h}px`,
    });
  }
}

// Each key's node, from the focused one: a hash, or undefined where there is none that way.
const MOVES = {
  ArrowUp: (node) => node.incomers("node").id(),
  ArrowDown: (node) => down(node),
  ArrowLeft: (node) => beside(node, -1),
  ArrowRight: (node) => beside(node, 1),
  Home: () => [...items.keys()][0],
  End: () => [...items.keys()].at(-1),
};

function keyed(e) {
  if (e.altKey || e.ctrlKey || e.metaKey || e.shiftKey) return; // the browser's own keys
  const hash = e.target.dataset.hash;
  if (e.key === "Enter" || e.key === " ") {
    e.preventDefault(); // Space would scroll the page too
    page.select(hash);
  } else if (MOVES[e.key]) {
    e.preventDefault(); // the arrows would scroll the page too
    const to = MOVES[e.key](cy.getElementById(hash));
    if (e.key === "ArrowUp") upFrom = hash;
    // The page scrolls in focused(), to where the node will be once in view.
    items.get(to)?.focus({ preventScroll: true });
  }
}

// Reached by Tab or by a key: the node takes the tab stop and comes into view.
function focused(item) {
  current = item.dataset.hash;
  rove();
  reveal(cy.getElementById(current));
  $("graph").scrollIntoView({ block: "nearest" });
}

// ↓: back to the child ↑ came from, else the first child as drawn.
function down(node) {
  const ids = children(node).map((n) => n.id());
  return ids.includes(upFrom) ? upFrom : ids[0];
}

function beside(node, step) {
  const parent = node.incomers("node");
  const ids = (parent.empty() ? roots() : children(parent)).map((n) => n.id());
  return ids[ids.indexOf(node.id()) + step];
}

const children = (node) => node.outgoers("node").sort(drawnOrder);
const roots = () => cy.nodes().filter((node) => node.incomers().empty()).sort(drawnOrder);

// By rank, top to bottom, then left to right: the rows of trees read the same way.
function drawnOrder(a, b) {
  const [p, q] = [a.position(), b.position()];
  return Math.abs(p.y - q.y) > 1 ? p.y - q.y : p.x - q.x;
}
