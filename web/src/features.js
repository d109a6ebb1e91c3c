// The head's inputs for one slate, computed as shared_model/head_features.py computes them (the Python runtime
// and the training pipeline call those functions; these are their ports, checked against them in
// tests/test_web_runtime.py). Flat typed arrays, row-major: a [S, D] matrix is a Float32Array of S * D.

export const HISTORY_LEN = 10; // recent clicked items that make up the on-device user context
export const RANK_SCALE = 50.0; // the first-stage rank feature is rank / RANK_SCALE
export const Z_EPS = 1e-6; // added to the slate's standard deviation when z-scoring retrieval scores
export const NUM_MODALITIES = 3; // text, image, video: the order of item_mask's last axis
export const SLATE_DENSE_DIM = 3;
export const HEAD_INPUTS = ["query", "item_text", "item_image", "item_video", "item_mask", "dense", "user_text",
  "user_image", "user_mask"];

/** log1p(price) as float64, a missing price (NaN / null) counting as 0 (head_features.log_prices). */
export function logPrice(price) {
  return price == null || Number.isNaN(price) ? 0 : Math.log1p(price);
}

function median(values) {
  const v = Float64Array.from(values).sort();
  const n = v.length;
  return n % 2 ? v[(n - 1) / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/**
 * [S, 3] float32 slate features (head_features.slate_features): first-stage rank / 50, the retrieval score
 * z-scored within the slate (0 when not given), log1p(price) minus the slate's median.
 * @param {Float64Array} logPrices [S]
 * @param {ArrayLike<number>|null} ranks [S] (default 0, 1, 2, ...)
 * @param {ArrayLike<number>|null} scores [S] retrieval scores (default: unknown)
 */
export function slateFeatures(logPrices, ranks = null, scores = null) {
  const s = logPrices.length;
  const out = new Float32Array(s * SLATE_DENSE_DIM);
  if (s === 0) return out;
  let mean = 0;
  let std = 0;
  if (scores) {
    const f = Float32Array.from(scores); // float32 like numpy's
    for (const x of f) mean += x;
    mean = Math.fround(mean / s);
    for (const x of f) std += (x - mean) * (x - mean);
    std = Math.fround(Math.sqrt(std / s));
  }
  const med = median(logPrices);
  for (let i = 0; i < s; i++) {
    out[i * 3] = (ranks ? ranks[i] : i) / RANK_SCALE;
    out[i * 3 + 1] = scores ? Math.fround(Math.fround(scores[i]) - mean) / Math.fround(std + Z_EPS) : 0;
    out[i * 3 + 2] = logPrices[i] - med;
  }
  return out;
}

/** The last `historyLen` known rows (null = unknown item), most recent last (head_features.recent_history). */
export function recentHistory(rows, historyLen = HISTORY_LEN) {
  const known = rows.filter((r) => r !== null && r !== undefined);
  return known.slice(Math.max(known.length - historyLen, 0));
}

/**
 * The on-device user context (head_features.user_context) from H history items: mean text embedding, mean image
 * embedding (an imageless item adds zero but still counts), mask 1 if there is any history.
 * @param {Float32Array} text [H, Dt]  @param {Float32Array} image [H, Di]  @param {ArrayLike<number>} hasImage [H]
 */
export function userContext(text, image, hasImage, h, dt, di) {
  const userText = new Float32Array(dt);
  const userImage = new Float32Array(di);
  const denom = Math.max(h, 1);
  for (let d = 0; d < dt; d++) {
    let acc = 0;
    for (let k = 0; k < h; k++) acc = Math.fround(acc + text[k * dt + d]);
    userText[d] = acc / denom;
  }
  for (let d = 0; d < di; d++) {
    let acc = 0;
    for (let k = 0; k < h; k++) acc = Math.fround(acc + image[k * di + d] * (hasImage[k] ? 1 : 0));
    userImage[d] = acc / denom;
  }
  return { text: userText, image: userImage, mask: h > 0 ? 1 : 0, numItems: h };
}

/** x = q * scale per row: int8 rows [N, D] with float32 scales [N] -> Float32Array [N, D]. */
export function dequantize(q, scale, n, d) {
  const out = new Float32Array(n * d);
  for (let i = 0; i < n; i++) {
    const s = scale[i];
    for (let j = 0; j < d; j++) out[i * d + j] = q[i * d + j] * s;
  }
  return out;
}

/**
 * The head's 9 named inputs for one slate (batch 1; head_features.head_feeds): {name: {data, dims}}.
 * `cands` is a candidate set (runtime.js): text/image/video [S, D], mask [S, 3], itemDense [S, Dd], logPrice [S].
 */
export function headFeeds(queryEmb, cands, slate, user) {
  const s = cands.ids.length;
  const dd = cands.itemDense.length / Math.max(s, 1);
  const dense = new Float32Array(s * (dd + SLATE_DENSE_DIM));
  for (let i = 0; i < s; i++) {
    dense.set(cands.itemDense.subarray(i * dd, (i + 1) * dd), i * (dd + SLATE_DENSE_DIM));
    dense.set(slate.subarray(i * SLATE_DENSE_DIM, (i + 1) * SLATE_DENSE_DIM), i * (dd + SLATE_DENSE_DIM) + dd);
  }
  const dt = queryEmb.length;
  const di = user.image.length;
  return {
    query: { data: Float32Array.from(queryEmb), dims: [1, dt] },
    item_text: { data: cands.text, dims: [1, s, dt] },
    item_image: { data: cands.image, dims: [1, s, di] },
    item_video: { data: cands.video, dims: [1, s, cands.video.length / Math.max(s, 1)] },
    item_mask: { data: cands.mask, dims: [1, s, NUM_MODALITIES] },
    dense: { data: dense, dims: [1, s, dd + SLATE_DENSE_DIM] },
    user_text: { data: user.text, dims: [1, user.text.length] },
    user_image: { data: user.image, dims: [1, di] },
    user_mask: { data: Float32Array.of(user.mask), dims: [1, 1] },
  };
}
