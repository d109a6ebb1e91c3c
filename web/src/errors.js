// Typed errors, as in the Python runtime (client/runtime_bundle.py): a bundle problem names the file, a bad
// request names the argument.

/** A bundle file is missing, corrupt, tampered with (sha256) or from an incompatible version. */
export class BundleError extends Error {
  constructor(file, problem) {
    super(`${file}: ${problem}`);
    this.name = "BundleError";
    this.file = String(file);
    this.problem = problem;
  }
}

/** A request to the runtime is invalid; `field` names the argument (query, candidateIds, ...). */
export class RerankInputError extends Error {
  constructor(field, problem) {
    super(`${field}: ${problem}`);
    this.name = "RerankInputError";
    this.field = field;
    this.problem = problem;
  }
}
