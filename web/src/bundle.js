// Fetching and verifying a bundle over HTTP (the layout: client/runtime_bundle.py). Every file's bytes are
// fetched once, hashed with WebCrypto and compared with the manifest's sha256; the manifest itself is checked
// against manifest.sha256. Everything is then built from those verified bytes.

import { BundleError } from "./errors.js";

export const BUNDLE_FORMAT = "fedrank-bundle";
export const BUNDLE_VERSION = 2;
export const MANIFEST = "manifest.json";
export const MANIFEST_DIGEST = "manifest.sha256";

/** Hex sha256 of bytes (WebCrypto: the page must be a secure context, e.g. http://127.0.0.1 or https). */
export async function sha256Hex(bytes) {
  if (!globalThis.crypto?.subtle) {
    throw new Error("WebCrypto (crypto.subtle) is unavailable: serve the page over https or from localhost");
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The bytes of `name` under `baseUrl` (a URL ending in "/"); a failed request is a BundleError naming it. */
export async function fetchBytes(baseUrl, name, fetchFn = fetch) {
  let resp;
  try {
    resp = await fetchFn(new URL(name, baseUrl).href, { cache: "no-cache" });
  } catch (e) {
    throw new BundleError(name, `cannot fetch it (${e.message})`);
  }
  if (resp.status === 404) throw new BundleError(name, "missing from the bundle (HTTP 404)");
  if (!resp.ok) throw new BundleError(name, `cannot fetch it (HTTP ${resp.status})`);
  return new Uint8Array(await resp.arrayBuffer());
}

/** manifest.json, verified against manifest.sha256 and checked for the keys the runtime relies on. */
export async function readManifest(baseUrl, fetchFn = fetch) {
  const [data, digest] = await Promise.all([fetchBytes(baseUrl, MANIFEST, fetchFn),
    fetchBytes(baseUrl, MANIFEST_DIGEST, fetchFn)]);
  let man;
  try {
    man = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(data));
  } catch (e) {
    throw new BundleError(MANIFEST, `not valid JSON (${e.message})`);
  }
  if (!man || typeof man !== "object" || man.format !== BUNDLE_FORMAT) {
    throw new BundleError(MANIFEST, `not a ${BUNDLE_FORMAT} manifest`);
  }
  if (man.format_version !== BUNDLE_VERSION) {
    throw new BundleError(MANIFEST, `bundle format version ${man.format_version} is not supported by this runtime `
      + `(expects ${BUNDLE_VERSION}); re-export the bundle`);
  }
  const text = new TextDecoder().decode(digest);
  const fields = text.trim().split(/\s+/);
  const want = (fields[0] || "").toLowerCase();
  if (fields.length > 2 || !/^[0-9a-f]{64}$/.test(want)
      || (fields.length === 2 && fields[1].replace(/^\*/, "") !== MANIFEST)) {
    throw new BundleError(MANIFEST_DIGEST, `expected one line '<sha256 of ${MANIFEST}>  ${MANIFEST}', `
      + `got ${JSON.stringify(text.slice(0, 100))}`);
  }
  const got = await sha256Hex(data);
  if (got !== want) {
    throw new BundleError(MANIFEST, `sha256 mismatch (file ${got.slice(0, 12)}..., ${MANIFEST_DIGEST} `
      + `${want.slice(0, 12)}...): the manifest is corrupt or was modified; re-export the bundle`);
  }
  checkManifest(man);
  return man;
}

function checkManifest(man) {
  const need = (ok, key, what) => { if (!ok) throw new BundleError(MANIFEST, `key '${key}' must be ${what}`); };
  const isObj = (x) => x !== null && typeof x === "object" && !Array.isArray(x);
  for (const key of ["files", "components", "tokenizer"]) {
    if (!(key in man)) throw new BundleError(MANIFEST, `missing key '${key}'`);
  }
  need(isObj(man.files), "files", "an object of file name -> entry");
  for (const [name, entry] of Object.entries(man.files)) {
    need(isObj(entry) && typeof entry.sha256 === "string", `files.${name}`, "an object with a sha256 string");
  }
  need(isObj(man.components), "components", "an object of component -> entry");
  for (const [comp, entry] of Object.entries(man.components)) {
    need(isObj(entry) && isObj(entry.files ?? {}), `components.${comp}`, "an object with a 'files' object");
    for (const [backend, name] of Object.entries(entry.files ?? {})) {
      need(name in man.files, `components.${comp}.files.${backend}`, `a file listed under 'files' (got ${name})`);
    }
  }
  need(isObj(man.tokenizer) && typeof man.tokenizer.file === "string" && Number.isInteger(man.tokenizer.max_length),
    "tokenizer", "an object with 'file' (string) and 'max_length' (integer)");
  need(isObj(man.dims) && Number.isInteger(man.dims.text) && Number.isInteger(man.dims.image), "dims",
    "an object with integer 'text' and 'image'");
  if ("catalog" in man) {
    const cat = man.catalog;
    need(isObj(cat) && typeof cat.file === "string" && Array.isArray(cat.item_ids), "catalog",
      "an object with 'file' (string) and 'item_ids' (list)");
    need(cat.item_ids.every((i) => typeof i === "string"), "catalog.item_ids", "a list of strings");
    const seen = new Set();
    for (const id of cat.item_ids) {
      if (seen.has(id)) throw new BundleError(MANIFEST, `key 'catalog.item_ids' holds item id '${id}' twice`);
      seen.add(id);
    }
  }
}

/** The verified bytes of bundle file `name` (its sha256 must match the manifest's). */
export async function readBundleFile(baseUrl, man, name, fetchFn = fetch) {
  const entry = man.files[name];
  if (!entry) throw new BundleError(name, "not listed in the manifest");
  const data = await fetchBytes(baseUrl, name, fetchFn);
  const got = await sha256Hex(data);
  if (got !== entry.sha256) {
    throw new BundleError(name, `sha256 mismatch (file ${got.slice(0, 12)}..., manifest ${String(entry.sha256).slice(0, 12)}`
      + "...): the file is corrupt or was modified");
  }
  return data;
}
