// The shop's first stage, in the page: BM25 over each item's title, brand, category and colour. It stands in
// for a shop's search backend; it runs here so that the demo sends nothing (not even the query) anywhere.

const K1 = 1.2;
const B = 0.75;

export function terms(text) {
  return (text.toLowerCase().normalize("NFD").replace(/\p{Mn}/gu, "").match(/[\p{L}\p{N}]+/gu) ?? [])
    .map((t) => (t.length > 3 && t.endsWith("s") && !t.endsWith("ss") ? t.slice(0, -1) : t)); // sneakers ~ sneaker
}

export class Bm25Index {
  constructor(items) {
    this.items = items;
    this.docs = items.map((it) => terms([it.title, it.brand, it.category, it.color].filter(Boolean).join(" ")));
    this.avgLen = this.docs.reduce((a, d) => a + d.length, 0) / Math.max(this.docs.length, 1);
    this.df = new Map();
    for (const d of this.docs) for (const t of new Set(d)) this.df.set(t, (this.df.get(t) ?? 0) + 1);
  }

  /** [{index, score}] of the best `k` items with a positive score, best first (ties: catalog order). */
  search(query, k = 50) {
    const q = [...new Set(terms(query))];
    const n = this.docs.length;
    const out = [];
    this.docs.forEach((d, i) => {
      let score = 0;
      for (const t of q) {
        const tf = d.filter((x) => x === t).length;
        if (!tf) continue;
        const df = this.df.get(t);
        const idf = Math.log(1 + (n - df + 0.5) / (df + 0.5));
        score += idf * (tf * (K1 + 1)) / (tf + K1 * (1 - B + B * d.length / this.avgLen));
      }
      if (score > 0) out.push({ index: i, score });
    });
    out.sort((a, b) => b.score - a.score || a.index - b.index);
    return out.slice(0, k);
  }
}
