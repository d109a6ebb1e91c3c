// Reader for numpy's .npz (a zip of .npy files, as np.savez writes them) and .npy arrays, in the browser.
//
// np.savez writes a zip with ZIP_STORED entries and zip64 extra fields (force_zip64), so this reads the central
// directory, honours zip64 sizes and offsets, and inflates deflated entries (np.savez_compressed) with the
// platform's DecompressionStream. Arrays come back as typed arrays (copied, so they are aligned) with their
// shape: { dtype: "<f4", shape: [N, D], data: Float32Array }.

import { BundleError } from "./errors.js";

const DTYPES = {
  "|i1": Int8Array, "i1": Int8Array, "|u1": Uint8Array, "u1": Uint8Array, "|b1": Uint8Array, "b1": Uint8Array,
  "<i2": Int16Array, "<u2": Uint16Array, "<i4": Int32Array, "<u4": Uint32Array,
  "<f4": Float32Array, "<f8": Float64Array, "<i8": BigInt64Array, "<u8": BigUint64Array,
};

/** The arrays of an .npz file: { name (without .npy): {dtype, shape, data} }. `file` names it in errors. */
export async function readNpz(bytes, file) {
  const entries = zipEntries(bytes, file);
  const out = {};
  for (const e of entries) {
    if (!e.name.endsWith(".npy")) continue;
    const raw = await entryBytes(bytes, e, file);
    out[e.name.slice(0, -4)] = readNpy(raw, `${file}:${e.name}`);
  }
  return out;
}

/** One .npy array from its bytes. */
export function readNpy(bytes, file) {
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
  if (bytes.length < 10 || magic.some((m, i) => bytes[i] !== m)) throw new BundleError(file, "not a .npy array");
  const major = bytes[6];
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = major === 1 ? dv.getUint16(8, true) : dv.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + headerLen));
  const descr = /'descr':\s*'([^']+)'/.exec(header);
  const fortran = /'fortran_order':\s*(True|False)/.exec(header);
  const shapeM = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || !shapeM) throw new BundleError(file, `unreadable .npy header ${JSON.stringify(header)}`);
  if (fortran[1] === "True") throw new BundleError(file, "Fortran-ordered arrays are not supported");
  const Type = DTYPES[descr[1]];
  if (!Type) throw new BundleError(file, `unsupported dtype ${descr[1]}`);
  const shape = shapeM[1].split(",").map((s) => s.trim()).filter((s) => s.length).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const dataStart = start + headerLen;
  const nbytes = count * Type.BYTES_PER_ELEMENT;
  if (bytes.length - dataStart < nbytes) {
    throw new BundleError(file, `truncated: ${bytes.length - dataStart} data bytes for shape (${shape}) ${descr[1]}`);
  }
  const copy = bytes.slice(dataStart, dataStart + nbytes); // a fresh, aligned buffer
  return { dtype: descr[1], shape, data: new Type(copy.buffer, 0, count) };
}

function zipEntries(bytes, file) {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let eocd = -1;
  for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 22 - 65535); i--) {
    if (dv.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) throw new BundleError(file, "not a zip (.npz) file: no end-of-central-directory record");
  let count = dv.getUint16(eocd + 10, true);
  let cdOffset = dv.getUint32(eocd + 16, true);
  if (cdOffset === 0xffffffff || count === 0xffff) { // zip64: locator just before the EOCD
    const loc = eocd - 20;
    if (loc < 0 || dv.getUint32(loc, true) !== 0x07064b50) throw new BundleError(file, "broken zip64 locator");
    const rec = Number(dv.getBigUint64(loc + 8, true));
    count = Number(dv.getBigUint64(rec + 32, true));
    cdOffset = Number(dv.getBigUint64(rec + 48, true));
  }
  const entries = [];
  let p = cdOffset;
  for (let k = 0; k < count; k++) {
    if (p + 46 > bytes.length || dv.getUint32(p, true) !== 0x02014b50) {
      throw new BundleError(file, "corrupt zip central directory");
    }
    const method = dv.getUint16(p + 10, true);
    let csize = dv.getUint32(p + 20, true);
    let usize = dv.getUint32(p + 24, true);
    const nameLen = dv.getUint16(p + 28, true);
    const extraLen = dv.getUint16(p + 30, true);
    const commentLen = dv.getUint16(p + 32, true);
    let offset = dv.getUint32(p + 42, true);
    const name = new TextDecoder().decode(bytes.subarray(p + 46, p + 46 + nameLen));
    let q = p + 46 + nameLen;
    const end = q + extraLen;
    while (q + 4 <= end) { // zip64 extended information: only the fields whose 32-bit value is 0xffffffff
      const id = dv.getUint16(q, true);
      const size = dv.getUint16(q + 2, true);
      if (id === 0x0001) {
        let r = q + 4;
        if (usize === 0xffffffff) { usize = Number(dv.getBigUint64(r, true)); r += 8; }
        if (csize === 0xffffffff) { csize = Number(dv.getBigUint64(r, true)); r += 8; }
        if (offset === 0xffffffff) { offset = Number(dv.getBigUint64(r, true)); r += 8; }
      }
      q += 4 + size;
    }
    entries.push({ name, method, csize, usize, offset });
    p = end + commentLen;
  }
  return entries;
}

async function entryBytes(bytes, e, file) {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (e.offset + 30 > bytes.length || dv.getUint32(e.offset, true) !== 0x04034b50) {
    throw new BundleError(file, `corrupt zip entry ${e.name}`);
  }
  const start = e.offset + 30 + dv.getUint16(e.offset + 26, true) + dv.getUint16(e.offset + 28, true);
  if (start + e.csize > bytes.length) throw new BundleError(file, `truncated zip entry ${e.name}`);
  const data = bytes.subarray(start, start + e.csize);
  if (e.method === 0) return data;
  if (e.method === 8) {
    const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  throw new BundleError(file, `zip entry ${e.name}: compression method ${e.method} is not supported`);
}
