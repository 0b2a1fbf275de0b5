// js-validate: JSON request-body validation, written in JavaScript.
//
// Config (the `[filters.config.js-validate]` table, handed to `init` as JSON):
//
//   [filters.config.js-validate]
//   methods = ["POST", "PUT", "PATCH"]   # methods whose body is checked (this is the default)
//   required = ["name", "email"]         # top-level keys the object must have (default none)
//   max_bytes = 65536                    # larger bodies are refused with 413 (default 1 MiB)
//
// A checked request whose body is not a JSON object, or lacks a required key,
// is answered `400` with a JSON error `{"error": "..."}` and never reaches the
// upstream. Any other request passes unchanged. The host buffers the body for
// this filter because `init` asks for the request-body phase.
//
// Built with componentize-js (see scripts/build-lang-filters.sh):
//
//   componentize-js --wit wit --world-name filter -d random clocks http fetch-event \
//       -o js-validate.wasm filters/js-validate/filter.js

import { write as logWrite } from 'sluicegate:filter/log@0.1.0';
import { counterAdd } from 'sluicegate:filter/metrics@0.1.0';

const KNOWN_KEYS = ['methods', 'required', 'max_bytes'];

// Set once by `init`, before any request reaches this instance.
let settings = null;

function parseConfig(text) {
  let c;
  try {
    c = JSON.parse(text);
  } catch (e) {
    throw `config is not JSON: ${e.message}`;
  }
  if (c === null || typeof c !== 'object' || Array.isArray(c)) {
    throw 'config must be a table';
  }
  for (const key of Object.keys(c)) {
    if (!KNOWN_KEYS.includes(key)) throw `unknown config key ${JSON.stringify(key)}`;
  }
  const methods = c.methods ?? ['POST', 'PUT', 'PATCH'];
  if (!Array.isArray(methods) || !methods.every((m) => typeof m === 'string' && m.length > 0)) {
    throw 'methods: a list of method names is required';
  }
  const required = c.required ?? [];
  if (!Array.isArray(required) || !required.every((k) => typeof k === 'string')) {
    throw 'required: a list of key names is required';
  }
  const maxBytes = c.max_bytes ?? 1024 * 1024;
  if (!Number.isInteger(maxBytes) || maxBytes <= 0) {
    throw 'max_bytes: a positive integer is required';
  }
  return { methods: methods.map((m) => m.toUpperCase()), required, maxBytes };
}

// The verdict on one body: null when it passes, else [status, message].
function check(body) {
  if (body.length > settings.maxBytes) {
    return [413, `body is ${body.length} bytes; the limit is ${settings.maxBytes}`];
  }
  let doc;
  try {
    doc = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(body));
  } catch (e) {
    return [400, `invalid JSON: ${e.message}`];
  }
  if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) {
    return [400, 'the body must be a JSON object'];
  }
  for (const key of settings.required) {
    if (!Object.prototype.hasOwnProperty.call(doc, key)) {
      return [400, `missing required field ${JSON.stringify(key)}`];
    }
  }
  return null;
}

function reject(status, message) {
  const body = new TextEncoder().encode(JSON.stringify({ error: message }) + '\n');
  return {
    tag: 'respond',
    val: { status, headers: [['content-type', 'application/json']], body },
  };
}

export const handler = {
  init(config) {
    settings = parseConfig(config);
    return { requestPhase: false, responsePhase: false, requestBody: true, responseBody: false };
  },

  onRequest(_req) {
    return { tag: 'continue' };
  },

  onRequestBody(req, body) {
    if (!settings.methods.includes(req.method())) {
      return { tag: 'continue' };
    }
    const verdict = check(body);
    if (verdict === null) {
      counterAdd('valid', 1n);
      return { tag: 'continue' };
    }
    const [status, message] = verdict;
    counterAdd('invalid', 1n);
    logWrite('debug', `${req.method()} ${req.path()}: ${status} ${message}`);
    return reject(status, message);
  },

  onResponse(_req, _resp) {
    return { tag: 'continue' };
  },

  onResponseBody(_req, _resp, _body) {
    return { tag: 'continue' };
  },
};
