// The demo shop page: first-stage search in the page (BM25 over titles), then the bundle's reranker in the
// page (onnxruntime-web), with the shopper's clicks kept in localStorage as the on-device history.

import * as ort from "onnxruntime-web";
import { Reranker } from "/src/runtime.js";
import { RecentItems } from "/src/history.js";
import { Bm25Index } from "/shop/search.js";

const CANDIDATES = 50; // first-stage slate size, as the head was trained on (20-50)
const $ = (id) => document.getElementById(id);
const state = { items: [], byId: new Map(), index: null, rr: null, recent: new RecentItems(), query: "", results: [] };
window.shop = state; // for the browser tests

function setStatus(text) { $("status").textContent = text; }

function card(r, pos) {
  const it = state.byId.get(r.id) ?? { id: r.id, title: r.id };
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.id = r.id;
  if (state.recent.list().includes(r.id)) el.classList.add("recent");
  const photo = it.image ? document.createElement("img") : document.createElement("div");
  photo.className = it.image ? "photo" : "photo nophoto";
  if (it.image) { photo.src = it.image; photo.alt = it.title; photo.loading = "lazy"; } else { photo.textContent = "no photo"; }
  const title = document.createElement("div");
  title.className = "title";
  title.textContent = it.title;
  const meta = document.createElement("div");
  meta.className = "meta";
  const price = document.createElement("span");
  price.textContent = it.price == null ? "" : `$${it.price.toFixed(2)}`;
  const move = document.createElement("span");
  const d = r.firstStage - pos;
  move.className = d > 0 ? "up" : d < 0 ? "down" : "same";
  move.textContent = `${d > 0 ? "▲" : d < 0 ? "▼" : "="} was #${r.firstStage + 1}`;
  move.title = `score ${r.score.toFixed(4)}`;
  meta.append(price, move);
  el.append(photo, title, meta);
  el.addEventListener("click", () => onClick(r.id));
  return el;
}

function renderRecent() {
  const ol = $("recent");
  ol.replaceChildren(...state.recent.list().slice().reverse().map((id) => {
    const li = document.createElement("li");
    li.textContent = state.byId.get(id)?.title ?? id;
    return li;
  }));
}

async function search(query) {
  state.query = query;
  const hits = state.index.search(query, CANDIDATES);
  if (!hits.length) {
    state.results = [];
    $("results").replaceChildren();
    setStatus(`no product matches "${query}"`);
    return;
  }
  const ids = hits.map((h) => state.items[h.index].id);
  const t0 = performance.now();
  const ranked = await state.rr.rerank(query, ids, { recentItemIds: state.recent.list(),
    retrievalScores: hits.map((h) => h.score), skipUnknown: true });
  const ms = performance.now() - t0;
  const firstStage = new Map(ids.map((id, k) => [id, k]));
  state.results = ranked.map((r) => ({ ...r, firstStage: firstStage.get(r.id) }));
  state.lastLatencyMs = ms;
  $("results").replaceChildren(...state.results.map(card));
  const n = state.recent.list().length;
  setStatus(`${ids.length} results, reranked on this device in ${ms.toFixed(1)} ms`
    + (n ? ` using your ${n} recent item${n > 1 ? "s" : ""}` : ""));
}

async function onClick(id) {
  state.recent.add(id);
  renderRecent();
  if (state.query) await search(state.query);
}

async function main() {
  try {
    const resp = await fetch("/catalog/items.json");
    state.items = (await resp.json()).items;
    state.byId = new Map(state.items.map((it) => [it.id, it]));
    state.index = new Bm25Index(state.items);
    state.rr = await Reranker.load("/bundle/", { ort, wasmPaths: "/ort/" });
  } catch (e) {
    setStatus(`cannot load the bundle: ${e.message}`);
    state.error = e.message;
    return;
  }
  renderRecent();
  $("query").disabled = false;
  $("go").disabled = false;
  $("search").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("query").value.trim();
    if (q) search(q).catch((e) => setStatus(`error: ${e.message}`));
  });
  $("clear").addEventListener("click", () => {
    state.recent.clear();
    renderRecent();
    if (state.query) search(state.query);
  });
  setStatus(`${state.items.length} products; bundle verified (sha256), reranker ready`);
  state.ready = true;
}

main();
