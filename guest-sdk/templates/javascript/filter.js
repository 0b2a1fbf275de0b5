// A Sluicegate filter in JavaScript: copy this folder, rename it, edit.
//
// It sets one request header (from its config) and adds `x-filter:
// javascript` to every response. Config:
//
//   [filters.config.my-filter]
//   header = "x-hello"
//   value = "world"

import { write as log } from 'sluicegate:filter/log@0.1.0';

// Module state lives as long as the wasm instance: the host calls `init`
// once per instance, then reuses the instance for many requests.
let settings = { header: 'x-hello', value: 'world' };

export const handler = {
  init(config) {
    const c = JSON.parse(config);
    if (c.header !== undefined && typeof c.header !== 'string') {
      // A thrown string is init's error: this version does not go live and
      // the operator sees the message.
      throw 'header must be a string';
    }
    settings = { ...settings, ...c };
    log('info', 'javascript filter ready');
    return { requestPhase: true, responsePhase: true, requestBody: false, responseBody: false };
  },

  onRequest(req) {
    req.setHeader(settings.header, String(settings.value));
    return { tag: 'continue' };
  },

  onRequestBody(_req, _body) {
    return { tag: 'continue' };
  },

  onResponse(_req, resp) {
    resp.setHeader('x-filter', 'javascript');
    return { tag: 'continue' };
  },

  onResponseBody(_req, _resp, _body) {
    return { tag: 'continue' };
  },
};
