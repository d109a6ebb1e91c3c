// Query encoders: the exported ONNX transformer (MiniLM or a stand-in) and the static encoder of a compact bundle
// (text_encoder.static.npz: an int8 token table distilled from the transformer, a projection and a bias; layout
// in client/runtime_bundle.py, Python twin client/runtime_models.py StaticTextModel). Both: encode(ids) ->
// Float32Array [Dt], L2-normalised. `makeQueryEncoder` picks one from the manifest.

import { BundleError } from "./errors.js";
import { readNpz } from "./npz.js";

export const STATIC_KIND = "static";
const STATIC_ARRAYS = { table_q: ["|i1", 2], table_scale: ["<f4", 1], projection: ["<f4", 2], bias: ["<f4", 1],
  skip_ids: ["<i8", 1] };

/** An ONNX Runtime Web session from a file's verified bytes (wasm backend). */
export async function openSession(ort, bytes, name) {
  try {
    return await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  } catch (e) {
    throw new BundleError(name, `onnxruntime-web cannot load it (${String(e.message || e).slice(0, 300)})`);
  }
}

/** The exported transformer text encoder: input_ids, attention_mask [1, T] -> [1, Dt]. */
export class OnnxQueryEncoder {
  constructor(ort, session) {
    this.ort = ort;
    this.session = session;
    this.kind = "onnx";
  }

  async encode(ids) {
    const t = ids.length;
    const feeds = {
      input_ids: new this.ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, t]),
      attention_mask: new this.ort.Tensor("int64", new BigInt64Array(t).fill(1n), [1, t]),
    };
    const out = await this.session.run(feeds);
    return Float32Array.from(out[this.session.outputNames[0]].data);
  }
}

/**
 * The static query encoder: keep = ids not in skip_ids; v = mean over kept ids of table_q[id] * table_scale[id]
 * (zeros [K] if none); e = v @ projection + bias; return e / max(|e|, 1e-12).
 */
export class StaticQueryEncoder {
  constructor(arrays, name) {
    for (const [k, [dtype, ndim]] of Object.entries(STATIC_ARRAYS)) {
      const a = arrays[k];
      if (!a) throw new BundleError(name, `missing arrays ["${k}"]`);
      if (a.dtype !== dtype || a.shape.length !== ndim) {
        throw new BundleError(name, `array ${k} is ${a.dtype} with ${a.shape.length} axes, expected ${dtype} with ${ndim}`);
      }
    }
    const [v, kDim] = arrays.table_q.shape;
    const d = arrays.bias.shape[0];
    if (arrays.table_scale.shape[0] !== v) throw new BundleError(name, `array table_scale has shape (${arrays.table_scale.shape}), expected (${v},)`);
    if (arrays.projection.shape[0] !== kDim || arrays.projection.shape[1] !== d) {
      throw new BundleError(name, `array projection has shape (${arrays.projection.shape}), expected (${kDim}, ${d})`);
    }
    const skip = Array.from(arrays.skip_ids.data, Number);
    if (skip.some((s) => s < 0 || s >= v)) throw new BundleError(name, `array skip_ids holds ids outside the table's ${v} rows`);
    for (const k of ["table_scale", "projection", "bias"]) {
      if (!arrays[k].data.every(Number.isFinite)) throw new BundleError(name, "NaN or infinite values in table_scale, projection or bias");
    }
    this.q = arrays.table_q.data;
    this.scale = arrays.table_scale.data;
    this.proj = arrays.projection.data;
    this.bias = arrays.bias.data;
    this.skip = new Set(skip);
    Object.assign(this, { vocabSize: v, k: kDim, dim: d, kind: STATIC_KIND });
  }

  static async fromBytes(bytes, name) {
    return new StaticQueryEncoder(await readNpz(bytes, name), name);
  }

  async encode(ids) {
    const kept = ids.filter((t) => !this.skip.has(t));
    const { k, dim } = this;
    const v = new Float64Array(k);
    for (const t of kept) {
      const s = this.scale[t];
      for (let j = 0; j < k; j++) v[j] += s * this.q[t * k + j];
    }
    const n = Math.max(kept.length, 1);
    const vf = Float32Array.from(v, (x) => x / n);
    const e = new Float64Array(dim);
    for (let j = 0; j < k; j++) {
      const x = vf[j];
      if (x === 0) continue;
      for (let i = 0; i < dim; i++) e[i] += x * this.proj[j * dim + i];
    }
    let norm = 0;
    for (let i = 0; i < dim; i++) { e[i] = Math.fround(Math.fround(e[i]) + this.bias[i]); norm += e[i] * e[i]; }
    norm = Math.max(Math.sqrt(norm), 1e-12);
    return Float32Array.from(e, (x) => x / norm);
  }
}

/** The query encoder the manifest names for the text_encoder (its files entry's kind: "static", else ONNX). */
export async function makeQueryEncoder(ort, man, name, bytes, vocabSize) {
  if (man.files[name]?.kind === STATIC_KIND) {
    const enc = await StaticQueryEncoder.fromBytes(bytes, name);
    if (enc.vocabSize !== vocabSize) {
      throw new BundleError(name, `table of ${enc.vocabSize} rows for a tokenizer of ${vocabSize} tokens (${man.tokenizer.file})`);
    }
    return enc;
  }
  return new OnnxQueryEncoder(ort, await openSession(ort, bytes, name));
}
