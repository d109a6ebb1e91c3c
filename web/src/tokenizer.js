// BERT WordPiece tokenisation from a Hugging Face tokenizer.json, matching the Python runtime's `tokenizers`
// (client/runtime.py: Tokenizer.from_str, no padding, truncation at the manifest's max_length) id for id.
//
// Supported pipeline (what MiniLM's and other BERT-style tokenizer.json files hold; anything else is a
// BundleError naming the field): added tokens (matched in the raw text when not normalized), BertNormalizer
// (clean text, CJK spacing, accent stripping, lower-casing), BertPreTokenizer (whitespace, punctuation),
// WordPiece (greedy longest match, continuing-subword prefix, max chars per word), TemplateProcessing /
// BertProcessing ([CLS] $A [SEP]). Truncation keeps the special tokens and cuts the text's tokens at the end.

import { BundleError } from "./errors.js";

const RE_OTHER = /[\p{Cc}\p{Cf}\p{Cn}\p{Co}\p{Cs}]/u; // Rust unicode_categories is_other()
const RE_WS = /\p{White_Space}/u;
const RE_PUNCT = /\p{P}/u;
const RE_MN = /\p{Mn}/gu;

function isChinese(cp) {
  return (cp >= 0x4e00 && cp <= 0x9fff) || (cp >= 0x3400 && cp <= 0x4dbf) || (cp >= 0x20000 && cp <= 0x2a6df)
    || (cp >= 0x2a700 && cp <= 0x2b73f) || (cp >= 0x2b740 && cp <= 0x2b81f) || (cp >= 0x2b920 && cp <= 0x2ceaf)
    || (cp >= 0xf900 && cp <= 0xfaff) || (cp >= 0x2f800 && cp <= 0x2fa1f);
}
const isWhitespace = (c) => c === "\t" || c === "\n" || c === "\r" || RE_WS.test(c);
const isControl = (c) => !(c === "\t" || c === "\n" || c === "\r") && RE_OTHER.test(c);
function isBertPunct(c) {
  const cp = c.codePointAt(0);
  const asciiPunct = (cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) || (cp >= 123 && cp <= 126);
  return asciiPunct || RE_PUNCT.test(c);
}

export class WordPieceTokenizer {
  /**
   * @param {object} json the parsed tokenizer.json
   * @param {number} maxLength truncation, special tokens included (the manifest's tokenizer.max_length)
   * @param {string} file the file's name, for errors
   */
  constructor(json, maxLength, file = "tokenizer.json") {
    const need = (ok, field, what) => { if (!ok) throw new BundleError(file, `${field}: ${what}`); };
    need(json && typeof json === "object", "(root)", "expected a JSON object");
    const model = json.model;
    need(model && model.type === "WordPiece", "model.type", `only WordPiece is supported, got ${model && model.type}`);
    need(model.vocab && typeof model.vocab === "object", "model.vocab", "expected an object of token -> id");
    this.vocab = new Map(Object.entries(model.vocab));
    this.unk = model.unk_token ?? "[UNK]";
    need(this.vocab.has(this.unk), "model.unk_token", `${this.unk} is not in the vocabulary`);
    this.prefix = model.continuing_subword_prefix ?? "##";
    this.maxChars = model.max_input_chars_per_word ?? 100;
    const norm = json.normalizer;
    need(norm == null || norm.type === "BertNormalizer", "normalizer.type",
      `only BertNormalizer is supported, got ${norm && norm.type}`);
    this.norm = norm ? {
      clean: norm.clean_text !== false, chinese: norm.handle_chinese_chars !== false,
      lower: norm.lowercase !== false, strip: norm.strip_accents ?? (norm.lowercase !== false),
    } : null;
    const pre = json.pre_tokenizer;
    need(pre == null || pre.type === "BertPreTokenizer", "pre_tokenizer.type",
      `only BertPreTokenizer is supported, got ${pre && pre.type}`);
    this.added = (json.added_tokens ?? []).map((t, i) => {
      need(typeof t.content === "string" && Number.isInteger(t.id), `added_tokens[${i}]`, "needs content and id");
      need(!t.single_word && !t.lstrip && !t.rstrip && t.normalized !== true, `added_tokens[${i}]`,
        "single_word / lstrip / rstrip / normalized added tokens are not supported");
      return { content: t.content, id: t.id };
    }).sort((a, b) => b.content.length - a.content.length);
    [this.prefixIds, this.suffixIds] = this.specials(json.post_processor, need);
    this.maxLength = maxLength;
  }

  /** Tokens in the vocabulary, added tokens included (as `tokenizers`' get_vocab_size()). */
  get vocabSize() {
    return this.vocab.size + this.added.filter((a) => !this.vocab.has(a.content)).length;
  }

  specials(post, need) {
    if (post == null) return [[], []];
    const id = (tok) => {
      need(this.vocab.has(tok) || this.added.some((a) => a.content === tok), "post_processor", `unknown token ${tok}`);
      return this.added.find((a) => a.content === tok)?.id ?? this.vocab.get(tok);
    };
    if (post.type === "BertProcessing") return [[post.cls[1]], [post.sep[1]]];
    need(post.type === "TemplateProcessing", "post_processor.type",
      `only TemplateProcessing / BertProcessing are supported, got ${post.type}`);
    const before = [];
    const after = [];
    let seen = false;
    for (const piece of post.single) {
      if (piece.Sequence) { seen = true; continue; }
      need(piece.SpecialToken, "post_processor.single", "expected SpecialToken / Sequence pieces");
      const ids = post.special_tokens?.[piece.SpecialToken.id]?.ids ?? [id(piece.SpecialToken.id)];
      (seen ? after : before).push(...ids);
    }
    return [before, after];
  }

  /** Token ids with the special tokens, truncated to maxLength (as `tokenizers`' encode(...).ids). */
  encode(text) {
    let ids = [];
    for (const [segment, addedId] of this.splitAdded(text)) {
      if (addedId !== null) { ids.push(addedId); continue; }
      for (const word of this.preTokenize(this.normalize(segment))) ids.push(...this.wordPiece(word));
    }
    const room = Math.max(this.maxLength - this.prefixIds.length - this.suffixIds.length, 0);
    if (ids.length > room) ids = ids.slice(0, room);
    return [...this.prefixIds, ...ids, ...this.suffixIds];
  }

  /** [[text, null] | [token, id], ...]: the raw text split around added tokens (leftmost, longest first). */
  splitAdded(text) {
    const out = [];
    let rest = text;
    const raw = this.added.filter((a) => a.content.length);
    while (rest.length) {
      let best = null;
      for (const a of raw) {
        const at = rest.indexOf(a.content);
        if (at >= 0 && (best === null || at < best.at)) best = { at, a };
      }
      if (best === null) { out.push([rest, null]); break; }
      if (best.at > 0) out.push([rest.slice(0, best.at), null]);
      out.push([best.a.content, best.a.id]);
      rest = rest.slice(best.at + best.a.content.length);
    }
    return out;
  }

  normalize(text) {
    if (!this.norm) return text;
    let chars = Array.from(text);
    if (this.norm.clean) {
      chars = chars.filter((c) => c !== "\0" && c !== "\ufffd" && !isControl(c)).map((c) => (isWhitespace(c) ? " " : c));
    }
    if (this.norm.chinese) chars = chars.flatMap((c) => (isChinese(c.codePointAt(0)) ? [" ", c, " "] : [c]));
    let s = chars.join("");
    if (this.norm.strip) s = s.normalize("NFD").replace(RE_MN, "");
    if (this.norm.lower) s = Array.from(s, (c) => c.toLowerCase()).join(""); // per character, like Rust
    return s;
  }

  preTokenize(text) {
    const words = [];
    let cur = "";
    for (const c of text) {
      if (isWhitespace(c)) {
        if (cur) words.push(cur);
        cur = "";
      } else if (isBertPunct(c)) {
        if (cur) words.push(cur);
        words.push(c);
        cur = "";
      } else {
        cur += c;
      }
    }
    if (cur) words.push(cur);
    return words;
  }

  wordPiece(word) {
    const chars = Array.from(word);
    if (chars.length > this.maxChars) return [this.vocab.get(this.unk)];
    const ids = [];
    let start = 0;
    while (start < chars.length) {
      let end = chars.length;
      let found = null;
      while (start < end) {
        const piece = (start > 0 ? this.prefix : "") + chars.slice(start, end).join("");
        if (this.vocab.has(piece)) { found = this.vocab.get(piece); break; }
        end -= 1;
      }
      if (found === null) return [this.vocab.get(this.unk)];
      ids.push(found);
      start = end;
    }
    return ids;
  }
}
