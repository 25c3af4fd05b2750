// Live use of the KV pool, host memory and disk, polled every few seconds.

import { api } from "./api.js";
import { $, bytes, el } from "./util.js";

const EVERY_MS = 3000;
let page;
let counters = ""; // the store's counters last seen: when they move, chunks may have moved
let last = null; // the usage last read, drawn again with each new list of chunks

export function setup(p) {
  page = p;
  poll();
  setInterval(poll, EVERY_MS);
}

async function poll() {
  if (document.hidden) return;
  let usage;
  try {
    usage = await api.usage();
  } catch (error) {
    // Said at once when the server is gone; other refusals (a key not given yet) the page
    // says when it loads chunks. The meters stay as they were.
    if (error.status === 0) page.status(error.message);
    return;
  }
  page.reached();
  last = usage;
  show(usage);
  const seen = JSON.stringify(usage.stats);
  if (counters && seen !== counters) {
    if (busy()) return; // not taken as seen: the page catches up once the user is done
    page.refresh().catch(() => {});
  }
  counters = seen;
}

// The chunks were read again: their counts per tier change with them. (No usage yet: the
// page could not read it, as before its API key was given; it asks now.)
export function render() {
  if (last) show(last);
  else poll();
}

// Someone is using a control in the table or a form, or walking the tree: redrawing now
// would take it away.
function busy() {
  const focused = document.activeElement;
  return focused && focused !== document.body && focused.closest("table, form, [role=tree]");
}

function show(usage) {
  const tiers = tierCounts(page.state.chunks);
  const pool = usage.pool;
  const blocks = pool ? `${pool.blocks - pool.free} of ${pool.blocks} blocks` : "not started";
  $("usage").replaceChildren(
    meter("KV pool (gpu)", pool && (pool.blocks - pool.free) / pool.blocks, blocks, tiers.gpu),
    meter("host (cpu)", fraction(usage.host_bytes, usage.host_budget), of(usage.host_bytes, usage.host_budget), tiers.cpu),
    // Every chunk has its file, so the disk's bytes cover all of them; the count says which
    // chunks are in no nearer tier.
    meter("disk", fraction(usage.disk_bytes, usage.disk_budget), of(usage.disk_bytes, usage.disk_budget), tiers.disk, "only on disk"),
  );
}

function meter(name, share, amount, chunks, counted = "chunks") {
  const fill = el("div", { class: "fill", style: `width: ${Math.round(100 * (share || 0))}%` });
  return el(
    "div",
    { class: "meter", dataset: { tier: name } },
    el("span", {}, `${name}: ${amount}, ${chunks} ${counted}`),
    el("div", { class: "bar" }, fill),
  );
}

const fraction = (used, budget) => (budget ? Math.min(1, used / budget) : 0);
const of = (used, budget) => (budget ? `${bytes(used)} of ${bytes(budget)}` : bytes(used));

function tierCounts(chunks) {
  const counts = { gpu: 0, cpu: 0, disk: 0 };
  for (const chunk of chunks) counts[chunk.tier] = (counts[chunk.tier] || 0) + 1;
  return counts;
}
