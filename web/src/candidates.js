// Candidates from the server: a search API sends each candidate's rows (int8 embeddings with per-row scales,
// mask, dense features, price) in the request, so a device need not hold the catalog. Request format version 1,
// the same as the Python runtime's (client/runtime.py Reranker.rerank_candidates; checks as in
// client/runtime_bundle.py parse_candidates): a plain object
//
//   version 1; item_ids [S] unique non-empty strings (first-stage order); text_q int8 [S, Dt]; text_scale f32 [S];
//   image_q int8 [S, Di]; image_scale; video_q int8 [S, Di]; video_scale; mask 0/1 [S, 3]; dense f32 [S, F];
//   price f64 [S] (NaN or null = unknown); optional retrieval_scores f32 [S], first_stage_ranks f32 [S]
//
// Each array may be a (nested) JS array, a flat typed array of the right length, or the JSON wire form of
// client/runtime_bundle.py request_to_json: {dtype: "int8"|"uint8"|"float32"|"float64", shape: [...], data:
// base64 of the little-endian C-order bytes}. A bad field is a RerankInputError naming it (candidates.text_q).

import { RerankInputError } from "./errors.js";
import { dequantize, logPrice, NUM_MODALITIES } from "./features.js";

export const CANDIDATES_VERSION = 1;
const WIRE_TYPES = { int8: Int8Array, uint8: Uint8Array, float32: Float32Array, float64: Float64Array };

const pyShape = (s) => `(${s.join(", ")}${s.length === 1 ? "," : ""})`;

function fromWire(v, name) {
  const Type = WIRE_TYPES[v.dtype];
  if (!Type || !Array.isArray(v.shape) || typeof v.data !== "string") {
    throw new RerankInputError(name, "not an array: expected {dtype: int8|uint8|float32|float64, shape, data (base64)}");
  }
  let bin;
  try {
    bin = atob(v.data);
  } catch (e) {
    throw new RerankInputError(name, `not an array: bad base64 (${e.message})`);
  }
  const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  const count = v.shape.reduce((a, b) => a * b, 1);
  if (bytes.length !== count * Type.BYTES_PER_ELEMENT) {
    throw new RerankInputError(name, `not an array: ${bytes.length} bytes for shape ${pyShape(v.shape)} ${v.dtype}`);
  }
  return { flat: new Type(bytes.buffer), shape: v.shape, integer: v.dtype.includes("int") };
}

function fromNested(v, name) {
  const shape = [];
  let level = v;
  while (Array.isArray(level)) { shape.push(level.length); level = level[0]; }
  const flat = v.flat(shape.length);
  if (flat.length !== shape.reduce((a, b) => a * b, 1) || flat.some(Array.isArray)) {
    throw new RerankInputError(name, "not an array: ragged nested lists");
  }
  return { flat, shape, integer: false };
}

/** One field as a flat array of numbers of `shape` (checked), in `dtype`. */
function fieldArray(req, key, dtype, shape, field) {
  const name = `${field}.${key}`;
  const v = req[key];
  if (v == null) throw new RerankInputError(name, "missing");
  const count = shape.reduce((a, b) => a * b, 1);
  let got;
  if (ArrayBuffer.isView(v)) got = { flat: v, shape: v.length === count ? shape : [v.length] };
  else if (Array.isArray(v)) got = fromNested(v, name);
  else if (typeof v === "object") got = fromWire(v, name);
  else throw new RerankInputError(name, `not an array: got ${typeof v}`);
  if (got.shape.length !== shape.length || got.shape.some((d, i) => d !== shape[i])) {
    throw new RerankInputError(name, `shape ${pyShape(got.shape)}, expected ${pyShape(shape)}`);
  }
  const flat = got.flat;
  if (dtype === "bool") {
    const out = new Float32Array(count);
    for (let i = 0; i < count; i++) {
      const x = flat[i];
      if (!(x === 0 || x === 1 || x === true || x === false)) throw new RerankInputError(name, "expected 0/1 (or booleans)");
      out[i] = x ? 1 : 0;
    }
    return out;
  }
  if (dtype === "int8") {
    for (let i = 0; i < count; i++) {
      const x = flat[i];
      if (typeof x !== "number") throw new RerankInputError(name, `expected numbers (int8), got ${typeof x}`);
      if (!Number.isInteger(x)) throw new RerankInputError(name, "expected integers (int8)");
      if (x < -128 || x > 127) throw new RerankInputError(name, "values outside int8 [-128, 127]");
    }
    return flat instanceof Int8Array ? flat : Int8Array.from(flat);
  }
  const Type = dtype === "float64" ? Float64Array : Float32Array;
  const out = new Type(count);
  for (let i = 0; i < count; i++) {
    const x = flat[i];
    if (x === null && key === "price") { out[i] = NaN; continue; }
    if (typeof x !== "number") throw new RerankInputError(name, `expected numbers (${dtype}), got ${x === null ? "null" : typeof x}`);
    if (key === "price" ? (x === Infinity || x === -Infinity) : !Number.isFinite(x)) {
      throw new RerankInputError(name, key === "price" ? "infinite values" : "NaN or infinite values");
    }
    out[i] = x;
  }
  return out;
}

/**
 * Check and decode a request: {set (a CandidateSet: ids, keep, text, image, video, mask, itemDense, logPrice),
 * retrievalScores, firstStageRanks}. `history`: the rows of a shopper's recent items (may be empty, ids may repeat).
 */
export function parseCandidates(req, dims, denseDim, { field = "candidates", maxCandidates = null, history = false } = {}) {
  if (req === null || typeof req !== "object" || Array.isArray(req)) {
    throw new RerankInputError(field, `expected a mapping of field -> array, got ${Array.isArray(req) ? "list" : typeof req}`);
  }
  if (req.version !== CANDIDATES_VERSION) {
    throw new RerankInputError(`${field}.version`, `${JSON.stringify(req.version ?? null)}: this runtime reads version ${CANDIDATES_VERSION}`);
  }
  const ids = req.item_ids;
  if (!Array.isArray(ids) || !ids.every((i) => typeof i === "string" && i)) {
    throw new RerankInputError(`${field}.item_ids`, "expected a list of non-empty strings");
  }
  const s = ids.length;
  if (s === 0 && !history) throw new RerankInputError(`${field}.item_ids`, "no candidates");
  if (maxCandidates !== null && s > maxCandidates) {
    throw new RerankInputError(`${field}.item_ids`, `${s} candidates; at most ${maxCandidates}`);
  }
  if (!history && new Set(ids).size !== s) {
    const dup = ids.find((i, n) => ids.indexOf(i) !== n);
    throw new RerankInputError(`${field}.item_ids`, `item id '${dup}' twice: one row per candidate`);
  }
  const a = (key, dtype, shape) => fieldArray(req, key, dtype, shape, field);
  const scale = (key) => {
    const v = a(key, "float32", [s]);
    if (v.some((x) => x < 0)) throw new RerankInputError(`${field}.${key}`, "negative scale");
    return v;
  };
  const textQ = a("text_q", "int8", [s, dims.text]);
  const imageQ = a("image_q", "int8", [s, dims.image]);
  const videoQ = a("video_q", "int8", [s, dims.image]);
  const [textS, imageS, videoS] = ["text_scale", "image_scale", "video_scale"].map(scale);
  const set = {
    ids: ids.slice(), keep: ids.map(() => true),
    text: dequantize(textQ, textS, s, dims.text), image: dequantize(imageQ, imageS, s, dims.image),
    video: dequantize(videoQ, videoS, s, dims.image), mask: a("mask", "bool", [s, NUM_MODALITIES]),
    itemDense: a("dense", "float32", [s, denseDim]),
    logPrice: Float64Array.from(a("price", "float64", [s]), (p) => logPrice(p)),
  };
  const optional = (key) => (req[key] == null ? null : Array.from(a(key, "float32", [s])));
  return { set, retrievalScores: optional("retrieval_scores"), firstStageRanks: optional("first_stage_ranks") };
}
