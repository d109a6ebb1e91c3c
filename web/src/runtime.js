// fedrank's on-device reranking runtime in the browser: the same bundle as client/runtime.py, run by
// onnxruntime-web (wasm backend, its .wasm files served by the page's own server: no CDN).
//
//   import * as ort from "onnxruntime-web";           // an import map points it at the local dist/ folder
//   const rr = await Reranker.load("/bundle/", { ort, wasmPaths: "/ort/" });
//   const ranked = await rr.rerank("red canvas sneakers", candidateIds, { recentItemIds });  // [{id, score}], best first
//
//   await rr.rerankCandidates("red canvas sneakers", request, { recentItemIds });  // rows sent by the search API
//
// Per request, as in the Python runtime: the query is tokenised (WordPiece, truncated at the manifest's
// max_length) and encoded by the exported text encoder -- or, in a compact bundle, by the static query encoder
// (encoders.js); the candidates' embeddings come from the bundle's catalog (int8 rows times their scale) or, with
// `rerankCandidates`, from the request itself (format version 1, candidates.js: what a search API sends, so a
// bundle need not ship a catalog); the user context is the mean embedding of the shopper's last HISTORY_LEN
// known recent items (from the catalog, or from their rows with `recentItems`), computed here and never sent
// anywhere; the dense features are the items' 4 catalog features + 3 slate features; the head scores every
// candidate. Nothing in this module sends anything: it only fetches the bundle's files.
//
// Every scoring path goes through one CandidateSet ({ids, keep, text, image, video, mask, itemDense, logPrice}),
// built from the catalog (`catalogCandidates`) or from a request (`parseCandidates`). Search by photo (the
// image encoder) is not part of the browser runtime.

import { readBundleFile, readManifest, MANIFEST } from "./bundle.js";
import { parseCandidates } from "./candidates.js";
import { makeQueryEncoder, openSession } from "./encoders.js";
import { BundleError, RerankInputError } from "./errors.js";
import { headFeeds, HEAD_INPUTS, HISTORY_LEN, logPrice, NUM_MODALITIES, recentHistory, SLATE_DENSE_DIM,
  slateFeatures, userContext } from "./features.js";
import { readNpz } from "./npz.js";
import { WordPieceTokenizer } from "./tokenizer.js";

export { BundleError, RerankInputError, parseCandidates };
export const MAX_QUERY_CHARS = 1000;
export const MAX_CANDIDATES = 2000;
const CATALOG_ARRAYS = ["text_q", "text_scale", "image_q", "image_scale", "video_q", "video_scale", "mask", "dense",
  "price"];

// ------------------------------------------------------------------------------------------------ catalog

/** The bundle's catalog.npz: int8 rows with per-row scales, mask, dense features, raw prices. */
export class PackedCatalog {
  constructor(itemIds, arrays, dims) {
    this.itemIds = itemIds;
    this.arrays = arrays;
    this.dims = dims; // {text, image, video, dense}
    this.rowOf = new Map(itemIds.map((id, r) => [id, r]));
  }

  static async fromBytes(bytes, name, itemIds, dims) {
    const arrays = await readNpz(bytes, name);
    const missing = CATALOG_ARRAYS.filter((k) => !(k in arrays));
    if (missing.length) throw new BundleError(name, `missing arrays ${JSON.stringify(missing)}`);
    const n = itemIds.length;
    const want = { text_q: [n, dims.text], image_q: [n, dims.image], video_q: [n, dims.image], text_scale: [n],
      image_scale: [n], video_scale: [n], mask: [n, NUM_MODALITIES], price: [n] };
    for (const [k, shape] of Object.entries(want)) {
      if (JSON.stringify(arrays[k].shape) !== JSON.stringify(shape)) {
        throw new BundleError(name, `array ${k} has shape (${arrays[k].shape}), expected (${shape})`);
      }
    }
    if (arrays.dense.shape.length !== 2 || arrays.dense.shape[0] !== n) {
      throw new BundleError(name, `array dense has shape (${arrays.dense.shape}), expected (${n}, D)`);
    }
    return new PackedCatalog(itemIds, arrays, { ...dims, video: dims.image, dense: arrays.dense.shape[1] });
  }

  get size() { return this.itemIds.length; }

  row(id) { return this.rowOf.get(id) ?? null; }

  /** Dequantised embeddings of `rows` for `name` (text/image/video): Float32Array [rows.length, D]. */
  modality(name, rows) {
    const d = this.dims[name];
    const q = this.arrays[`${name}_q`].data;
    const scale = this.arrays[`${name}_scale`].data;
    const out = new Float32Array(rows.length * d);
    rows.forEach((r, i) => {
      const s = scale[r];
      for (let j = 0; j < d; j++) out[i * d + j] = q[r * d + j] * s;
    });
    return out;
  }

  mask(rows) {
    const m = this.arrays.mask.data;
    const out = new Float32Array(rows.length * NUM_MODALITIES);
    rows.forEach((r, i) => { for (let j = 0; j < NUM_MODALITIES; j++) out[i * NUM_MODALITIES + j] = m[r * NUM_MODALITIES + j]; });
    return out;
  }

  dense(rows) {
    const d = this.dims.dense;
    const x = this.arrays.dense.data;
    const out = new Float32Array(rows.length * d);
    rows.forEach((r, i) => out.set(x.subarray(r * d, (r + 1) * d), i * d));
    return out;
  }

  logPrices(rows) { return Float64Array.from(rows, (r) => logPrice(this.arrays.price.data[r])); }
}

// ------------------------------------------------------------------------------------------------ reranker

export class Reranker {
  constructor({ ort, manifest, baseUrl, tokenizer, queryEncoder, head, catalog }) {
    Object.assign(this, { ort, manifest, baseUrl, tokenizer, queryEncoder, head, catalog });
    this.dims = { text: manifest.dims.text, image: manifest.dims.image, video: manifest.dims.image };
    this.itemDenseDim = (manifest.dims.dense ?? 7) - SLATE_DENSE_DIM;
    this.historyLen = (manifest.catalog ?? manifest.candidates ?? {}).history_len ?? HISTORY_LEN;
  }

  /**
   * Fetch and verify a bundle (manifest against manifest.sha256, every file against the manifest's sha256),
   * then build the tokenizer, query encoder, head and catalog (if the bundle has one) from the verified bytes.
   * @param {string} baseUrl the bundle's URL (a folder; a trailing "/" is added)
   * @param {{ort: object, wasmPaths?: string, numThreads?: number, fetch?: Function}} options
   */
  static async load(baseUrl, { ort, wasmPaths = null, numThreads = 1, fetch: fetchFn = globalThis.fetch.bind(globalThis) } = {}) {
    if (!ort) throw new Error("Reranker.load needs { ort }: the onnxruntime-web module");
    ort.env.wasm.numThreads = numThreads;
    if (wasmPaths) ort.env.wasm.wasmPaths = new URL(wasmPaths, globalThis.location?.href).href;
    const base = new URL(baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`, globalThis.location?.href).href;
    const man = await readManifest(base, fetchFn);
    const comps = man.components;
    for (const comp of ["text_encoder", "head"]) {
      if (!comps[comp]?.files?.onnx) {
        throw new BundleError(MANIFEST, `no onnx file for the ${comp} (exported targets: `
          + `${JSON.stringify(Object.keys(comps[comp]?.files ?? {}))}): the browser runtime needs ONNX`);
      }
    }
    const textName = comps.text_encoder.files.onnx;
    const headName = comps.head.files.onnx;
    const names = [man.tokenizer.file, textName, headName, ...(man.catalog ? [man.catalog.file] : [])];
    const files = Object.fromEntries(await Promise.all(
      names.map(async (n) => [n, await readBundleFile(base, man, n, fetchFn)])));

    let tokJson;
    try {
      tokJson = JSON.parse(new TextDecoder().decode(files[man.tokenizer.file]));
    } catch (e) {
      throw new BundleError(man.tokenizer.file, `cannot load the tokenizer (${e.message})`);
    }
    const tokenizer = new WordPieceTokenizer(tokJson, man.tokenizer.max_length, man.tokenizer.file);
    const catalog = man.catalog ? await PackedCatalog.fromBytes(files[man.catalog.file], man.catalog.file,
      man.catalog.item_ids, { text: man.dims.text, image: man.dims.image }) : null;
    const queryEncoder = await makeQueryEncoder(ort, man, textName, files[textName], tokenizer.vocabSize);
    const head = await openSession(ort, files[headName], headName);
    return new Reranker({ ort, manifest: man, baseUrl: base, tokenizer, queryEncoder, head, catalog });
  }

  // -------------------------------------------------------------------------------------------- pieces

  checkQuery(query) {
    if (typeof query !== "string") throw new RerankInputError("query", `expected a string, got ${typeof query}`);
    if (!query.trim()) throw new RerankInputError("query", "empty query");
    if (query.length > MAX_QUERY_CHARS) {
      throw new RerankInputError("query", `${query.length} characters; at most ${MAX_QUERY_CHARS}`);
    }
  }

  tokenize(query) {
    this.checkQuery(query);
    return this.tokenizer.encode(query);
  }

  /** [Dt] float32 query embedding. */
  async encodeQuery(query) {
    return this.queryEncoder.encode(this.tokenize(query));
  }

  /** The user context from recent item ids (most recent last; unknown ids are ignored), from the catalog. */
  userContext(recentItemIds) {
    const ids = recentItemIds == null ? [] : idList(recentItemIds, "recentItemIds");
    if (ids.length && !this.catalog) {
      throw new RerankInputError("recentItemIds", "this bundle has no catalog: pass recentItems (the rows of the "
        + "shopper's recent items, in the candidates format)");
    }
    const rows = this.catalog ? recentHistory(ids.map((i) => this.catalog.row(i)), this.historyLen) : [];
    if (!this.catalog) return userContext(new Float32Array(0), new Float32Array(0), [], 0, this.dims.text, this.dims.image);
    const hasImage = Array.from(this.catalog.mask(rows).filter((_, k) => k % NUM_MODALITIES === 1));
    return userContext(this.catalog.modality("text", rows), this.catalog.modality("image", rows), hasImage,
      rows.length, this.dims.text, this.dims.image);
  }

  /** The user context from the rows of the shopper's recent items (candidates format, most recent last): for a
   * page without the bundle catalog, which keeps the rows of items it showed and the shopper clicked. */
  userContextFromRows(recentItems) {
    const { set } = parseCandidates(recentItems, this.dims, this.itemDenseDim, { field: "recentItems", history: true });
    const h = set.ids.length;
    const from = Math.max(h - this.historyLen, 0);
    const n = h - from;
    const hasImage = Array.from({ length: n }, (_, k) => set.mask[(from + k) * NUM_MODALITIES + 1]);
    return userContext(set.text.subarray(from * this.dims.text), set.image.subarray(from * this.dims.image), hasImage,
      n, this.dims.text, this.dims.image);
  }

  /** A CandidateSet from the bundle's catalog; unknown ids raise unless skipUnknown (then they are left out). */
  catalogCandidates(candidateIds, skipUnknown = false) {
    const ids = idList(candidateIds, "candidateIds");
    checkCount(ids.length, "candidateIds");
    if (!this.catalog) {
      throw new RerankInputError("candidateIds", "this bundle has no catalog: send the candidates' rows (rerankCandidates)");
    }
    const rows = ids.map((i) => this.catalog.row(i));
    const keep = rows.map((r) => r !== null);
    const unknown = ids.filter((_, k) => !keep[k]);
    if (unknown.length && !skipUnknown) {
      throw new RerankInputError("candidateIds", `${unknown.length} unknown item id(s), e.g. ${JSON.stringify(unknown.slice(0, 5))}`);
    }
    if (unknown.length === ids.length) {
      throw new RerankInputError("candidateIds", "none of the candidates is in the bundle's catalog");
    }
    const kept = rows.filter((r) => r !== null);
    const c = this.catalog;
    return { ids: ids.filter((_, k) => keep[k]), keep, text: c.modality("text", kept), image: c.modality("image", kept),
      video: c.modality("video", kept), mask: c.mask(kept), itemDense: c.dense(kept), logPrice: c.logPrices(kept) };
  }

  /** Scores [S] (candidates' order) of a CandidateSet for a query embedding and user context. */
  async scoreSet(queryEmb, cands, user, { retrievalScores = null, firstStageRanks = null } = {}) {
    const s = cands.ids.length;
    const pick = (v, field) => {
      if (v == null) return null;
      const all = numbers(v, cands.keep.length, field);
      return all.filter((_, k) => cands.keep[k]);
    };
    const slate = slateFeatures(cands.logPrice, pick(firstStageRanks, "firstStageRanks"),
      pick(retrievalScores, "retrievalScores"));
    const feeds = headFeeds(queryEmb, cands, slate, user);
    const tensors = Object.fromEntries(HEAD_INPUTS.map((n) => [n, new this.ort.Tensor("float32", feeds[n].data, feeds[n].dims)]));
    const out = await this.head.run(tensors);
    const scores = out[this.head.outputNames[0]].data;
    return Float32Array.from(scores.subarray(0, s));
  }

  // -------------------------------------------------------------------------------------------- requests

  /** {ids, scores} in the candidates' order. Options: recentItemIds, retrievalScores, firstStageRanks, skipUnknown. */
  async score(query, candidateIds, { recentItemIds = null, retrievalScores = null, firstStageRanks = null,
    skipUnknown = false } = {}) {
    const cands = this.catalogCandidates(candidateIds, skipUnknown);
    const q = await this.encodeQuery(query);
    const scores = await this.scoreSet(q, cands, this.userContext(recentItemIds), { retrievalScores, firstStageRanks });
    return { ids: cands.ids, scores };
  }

  /** [{id, score}] best first (ties keep the candidates' order). */
  async rerank(query, candidateIds, options = {}) {
    const { ids, scores } = await this.score(query, candidateIds, options);
    return ranked(ids, scores);
  }

  /**
   * {ids, scores} in the request's order for candidates whose rows come in the request (format: candidates.js).
   * The history: recentItemIds (looked up in the catalog) or recentItems (their rows, same format), not both.
   */
  async scoreCandidates(query, request, { recentItemIds = null, recentItems = null } = {}) {
    const { set, retrievalScores, firstStageRanks } = parseCandidates(request, this.dims, this.itemDenseDim,
      { maxCandidates: MAX_CANDIDATES });
    if (recentItems != null && recentItemIds != null) {
      throw new RerankInputError("recentItems", "give recentItemIds (catalog) or recentItems (rows), not both");
    }
    const user = recentItems != null ? this.userContextFromRows(recentItems) : this.userContext(recentItemIds);
    const q = await this.encodeQuery(query);
    return { ids: set.ids, scores: await this.scoreSet(q, set, user, { retrievalScores, firstStageRanks }) };
  }

  /** As `rerank`, with the candidates' rows from the request (a search API's response), not the catalog. */
  async rerankCandidates(query, request, options = {}) {
    const { ids, scores } = await this.scoreCandidates(query, request, options);
    return ranked(ids, scores);
  }
}

function ranked(ids, scores) {
  const order = Array.from(ids.keys()).sort((a, b) => scores[b] - scores[a] || a - b); // stable, best first
  return order.map((i) => ({ id: ids[i], score: scores[i] }));
}

function idList(ids, field) {
  if (typeof ids === "string" || ids == null || typeof ids[Symbol.iterator] !== "function") {
    throw new RerankInputError(field, `expected a list of item ids, got ${ids === null ? "null" : typeof ids}`);
  }
  return Array.from(ids, String);
}

function checkCount(n, field) {
  if (n === 0) throw new RerankInputError(field, "no candidates");
  if (n > MAX_CANDIDATES) throw new RerankInputError(field, `${n} candidates; at most ${MAX_CANDIDATES}`);
}

function numbers(values, n, field) {
  if (values == null || typeof values[Symbol.iterator] !== "function") {
    throw new RerankInputError(field, "expected a list of numbers");
  }
  const v = Array.from(values, Number);
  if (v.length !== n) throw new RerankInputError(field, `${v.length} values for ${n} expected`);
  if (!v.every(Number.isFinite)) throw new RerankInputError(field, "NaN, infinite or non-numeric values");
  return v;
}
