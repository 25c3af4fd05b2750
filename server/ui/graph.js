// The provenance tree, drawn by Cytoscape.js with the dagre layout: each chunk hangs under
// the last chunk it was computed after, so a conversation's branches show as a tree.

import * as keys from "./graph-keys.js";
import { $, chunkType, short, snippet, treeParent } from "./util.js";

const STYLE = [
  {
    selector: "node",
    style: {
      label: "data(label)",
      width: 136,
      height: 42,
      "font-size": 9,
      "text-wrap": "wrap",
      "text-max-width": 126,
      "text-valign": "center",
      "border-width": 1,
      shape: "rectangle",
      "background-color": "#dbe8ff",
      "border-color": "#2f6fdb",
    },
  },
  {
    selector: 'node[type = "prompt"]',
    style: { shape: "ellipse", "background-color": "#fff1d6", "border-color": "#c98a12" },
  },
  {
    selector: 'node[type = "answer"]',
    style: { shape: "round-rectangle", "background-color": "#dcf3e3", "border-color": "#2e8b57" },
  },
  {
    selector: 'node[type = "composed"], node[type = "split"]',
    style: { shape: "hexagon", "background-color": "#ece6f7", "border-color": "#7a5cc2" },
  },
  { selector: "node.active", style: { "border-width": 4, "border-color": "#e4572e" } },
  {
    selector: "node.chosen",
    style: { "underlay-color": "#2f6fdb", "underlay-opacity": 0.25, "underlay-padding": 6 },
  },
  {
    selector: "edge",
    style: {
      width: 1.5,
      "line-color": "#9aa3b2",
      "target-arrow-color": "#9aa3b2",
      "target-arrow-shape": "triangle",
      "curve-style": "taxi",
      "taxi-direction": "downward",
    },
  },
];

let cy = null;
let drawn = ""; // the nodes and edges last laid out: the layout runs again only when they change
let centred = null; // the chosen chunk the view last moved to

export function setup(page) {
  cy = cytoscape({ container: $("graph"), style: STYLE, minZoom: 0.05, maxZoom: 2.5 });
  cy.on("tap", "node", (e) => page.select(e.target.id()));
  keys.setup(cy, page, reveal);
  $("graph-scope").addEventListener("change", () => render(page.state));
  window.cy = cy; // the graph's model, for the browser console and the browser test
}

export function render(state) {
  const chunks = inScope(state.chunks, $("graph-scope").value);
  const known = new Set(chunks.map((c) => c.hash));
  const nodes = chunks.map((c) => ({ data: { id: c.hash, label: label(c), type: chunkType(c) } }));
  const edges = chunks
    .filter((c) => known.has(treeParent(c)))
    .map((c) => ({ data: { id: `${treeParent(c)}-${c.hash}`, source: treeParent(c), target: c.hash } }));
  const shape = JSON.stringify([nodes.map((n) => n.data.id), edges.map((e) => e.data.id)]);
  const reshaped = shape !== drawn;
  if (reshaped) {
    drawn = shape;
    cy.elements().remove();
    cy.add([...nodes, ...edges]);
    layOut();
  }
  const active = new Set(chunks.filter((c) => c.is_active).map((c) => c.hash));
  cy.nodes().forEach((node) => {
    node.toggleClass("active", active.has(node.id()));
    node.toggleClass("chosen", node.id() === state.selected);
  });
  keys.render(chunks, state.selected, reshaped);
  centreChosen(state.selected);
}

const TREE = { name: "dagre", rankDir: "TB", nodeSep: 14, rankSep: 36, fit: false };
const GAP = 24; // between trees

// Each tree laid out on its own, then the trees in rows about as wide as the panel's shape
// asks (largest first): one row of many separate documents would be too wide to read.
function layOut() {
  const trees = cy.elements().components();
  trees.sort((a, b) => b.nodes().length - a.nodes().length);
  let area = 0;
  for (const tree of trees) {
    tree.layout(TREE).run();
    const box = tree.boundingBox();
    area += (box.w + GAP) * (box.h + GAP);
  }
  const widest = Math.max(0, ...trees.map((tree) => tree.boundingBox().w));
  const rowWidth = Math.max(widest, Math.sqrt((area * cy.width()) / Math.max(cy.height(), 1)));
  let x = 0;
  let y = 0;
  let rowHeight = 0;
  for (const tree of trees) {
    const box = tree.boundingBox();
    if (x > 0 && x + box.w > rowWidth) {
      [x, y, rowHeight] = [0, y + rowHeight + GAP, 0];
    }
    tree.nodes().shift({ x: x - box.x1, y: y - box.y1 });
    x += box.w + GAP;
    rowHeight = Math.max(rowHeight, box.h);
  }
  cy.fit(undefined, 12);
}

const READABLE = 0.9; // a zoom at which the nodes' labels read easily

// A newly chosen chunk (here, in the table or in the details) is brought into view, readable.
function centreChosen(hash) {
  const node = hash ? cy.getElementById(hash) : cy.collection();
  if (hash === centred || node.empty()) return;
  centred = hash;
  centre(node);
}

// A node reached from the keyboard is brought into view, readable, only when it is not: the
// drawing holds still while the keys walk through what it shows.
function reveal(node) {
  const box = node.renderedBoundingBox();
  const inside = box.x1 >= 0 && box.y1 >= 0 && box.x2 <= cy.width() && box.y2 <= cy.height();
  if (!inside || cy.zoom() < READABLE) centre(node);
}

function centre(node) {
  const zoom = Math.max(cy.zoom(), READABLE);
  cy.stop().animate({ center: { eles: node }, zoom }, { duration: 200 });
}

function label(chunk) {
  return `${chunkType(chunk)} ${short(chunk.hash)}\n${snippet(chunk.text, 40)}`;
}

// "active": only the trees that hold an active chunk (the conversations in use).
function inScope(chunks, scope) {
  if (scope !== "active") return chunks;
  const byHash = new Map(chunks.map((c) => [c.hash, c]));
  const root = (chunk) => {
    const seen = new Set();
    while (byHash.has(treeParent(chunk)) && !seen.has(chunk.hash)) {
      seen.add(chunk.hash);
      chunk = byHash.get(treeParent(chunk));
    }
    return chunk.hash;
  };
  const roots = new Set(chunks.filter((c) => c.is_active).map(root));
  return chunks.filter((c) => roots.has(root(c)));
}
