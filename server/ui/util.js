// Small helpers shared by the page's parts: building elements, naming and formatting chunks.

// el("td", {class: "num"}, "12"): attributes, then children (strings become text, never HTML).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}

export const $ = (id) => document.getElementById(id);

export const short = (hash) => hash.slice(0, 12);

// What a chunk is to a person (a document, a prompt, an answer, or a view made of others),
// and its parent in the provenance tree: both as the server says, as `kvchunks tree` draws.
export const chunkType = (chunk) => chunk.type;
export const treeParent = (chunk) => chunk.follows ?? null;

// Cut by characters (code points), never inside one: an emoji is two UTF-16 units.
export function snippet(text, length) {
  const flat = [...(text || "").replace(/\s+/g, " ").trim()];
  return flat.length > length ? `${flat.slice(0, length - 1).join("")}…` : flat.join("");
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function when(seconds) {
  const date = new Date(seconds * 1000);
  const today = new Date().toDateString() === date.toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString();
}

export const badge = (chunk) => el("span", { class: `badge ${chunkType(chunk)}` }, chunkType(chunk));
