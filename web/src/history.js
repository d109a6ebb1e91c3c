// The shopper's recently clicked items, kept in this browser's localStorage and nowhere else: the reranker
// reads them to build the on-device user context; no code here (or in the runtime) sends them anywhere.

export const DEFAULT_KEY = "fedrank.recent-items";
export const DEFAULT_MAX = 50;

export class RecentItems {
  /** @param {Storage} storage localStorage (or any object with getItem/setItem/removeItem) */
  constructor(storage = globalThis.localStorage, key = DEFAULT_KEY, max = DEFAULT_MAX) {
    this.storage = storage;
    this.key = key;
    this.max = max;
  }

  /** Item ids, most recent last. A corrupt entry reads as an empty history (and is replaced on the next add). */
  list() {
    try {
      const v = JSON.parse(this.storage.getItem(this.key) ?? "[]");
      return Array.isArray(v) ? v.filter((x) => typeof x === "string") : [];
    } catch {
      return [];
    }
  }

  /** Record a click: the id moves to the end (most recent); the list keeps the last `max`. */
  add(itemId) {
    const ids = this.list().filter((x) => x !== itemId);
    ids.push(String(itemId));
    this.storage.setItem(this.key, JSON.stringify(ids.slice(-this.max)));
    return this.list();
  }

  clear() { this.storage.removeItem(this.key); }
}
