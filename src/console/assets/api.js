// The console's only way to the server: the public /v1 API with the tab's bearer token, and its
// Server-Sent Events read with fetch() (EventSource cannot send an Authorization header).

const TOKEN_KEY = 'harvest.token';

/** The token of this tab (session storage: gone when the tab closes, never in a cookie or URL). */
export function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  } catch {
    return '';
  }
}

export function setToken(value) {
  try {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // Storage refused (private mode): the token lives as long as this page.
  }
}

let unauthorized = () => {};

/** What to do when the server answers 401 (the app shows the token page). */
export function onUnauthorized(fn) {
  unauthorized = fn;
}

/** An error answer of the API: HTTP status, the API's code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra) {
  const h = new Headers(extra || {});
  const t = token();
  if (t) h.set('Authorization', 'Bearer ' + t);
  return h;
}

async function failure(resp) {
  let code = 'http_' + resp.status;
  let message = resp.status + ' ' + resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // Not the API's error shape: keep the status line.
  }
  if (resp.status === 401) unauthorized(message);
  return new ApiError(resp.status, code, message);
}

/** Calls the API; resolves with the JSON body, rejects with an ApiError. */
export async function call(method, path, body, opts = {}) {
  const init = { method, headers: headers(), cache: 'no-store', signal: opts.signal };
  if (body !== undefined) {
    init.headers.set('Content-Type', 'application/json');
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'the server did not answer (' + e.message + ')');
  }
  if (!resp.ok) throw await failure(resp);
  if (opts.raw) return resp;
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

export const get = (path, opts) => call('GET', path, undefined, opts);
export const post = (path, body, opts) => call('POST', path, body === undefined ? {} : body, opts);
export const put = (path, body, opts) => call('PUT', path, body, opts);
export const del = (path, opts) => call('DELETE', path, undefined, opts);

/** The JSON of a GET, or null when the server answers 404 (an endpoint or a part it lacks). */
export async function getOptional(path, opts) {
  try {
    return await get(path, opts);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return null;
    throw e;
  }
}

/** A path with a query string built from the defined, non-empty values of `params`. */
export function withQuery(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? path + '?' + s : path;
}

export const enc = encodeURIComponent;

/**
 * Downloads a GET answer as a file. Without a token a plain link lets the browser stream it;
 * with one, the body is fetched with the Authorization header and saved from memory.
 */
export async function download(path, filename) {
  const a = document.createElement('a');
  a.download = filename;
  let url = path;
  if (token()) {
    const resp = await call('GET', path, undefined, { raw: true });
    url = URL.createObjectURL(await resp.blob());
  }
  a.href = url;
  document.body.append(a);
  a.click();
  a.remove();
  if (url !== path) setTimeout(() => URL.revokeObjectURL(url), 60000);
}

/**
 * Reads a Server-Sent Events stream, reconnecting with backoff (and Last-Event-ID when the server
 * gave ids) until stopped, or until the stream ends after an event of a kind in `opts.final`.
 * `onEvent(kind, data)` gets each event (data parsed as JSON when it is JSON); `opts.onState`
 * gets 'live', 'reconnecting', 'ended' or 'gone' (404: nothing to follow). Returns a stop function.
 */
export function subscribe(path, onEvent, opts = {}) {
  const final = new Set(opts.final || []);
  const ctl = new AbortController();
  let stopped = false;
  let lastId = '';
  let retryMs = 1000;
  const state = (s) => {
    if (!stopped && opts.onState) opts.onState(s);
  };
  (async () => {
    let backoff = retryMs;
    while (!stopped) {
      let sawFinal = false;
      try {
        const h = headers({ Accept: 'text/event-stream' });
        if (lastId) h.set('Last-Event-ID', lastId);
        const resp = await fetch(path, { headers: h, cache: 'no-store', signal: ctl.signal });
        if (resp.status === 404) {
          state('gone');
          return;
        }
        if (!resp.ok) throw await failure(resp);
        state('live');
        backoff = retryMs;
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        const parser = sseParser((ev) => {
          if (ev.id) lastId = ev.id;
          if (ev.retry) retryMs = ev.retry;
          let data = ev.data;
          try {
            data = JSON.parse(ev.data);
          } catch {
            // Plain text data.
          }
          if (final.has(ev.event)) sawFinal = true;
          if (!stopped) onEvent(ev.event, data);
        });
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser(value);
        }
      } catch (e) {
        if (stopped) return;
        if (e instanceof ApiError && e.status === 401) return;
      }
      if (stopped) return;
      if (sawFinal) {
        state('ended');
        return;
      }
      state('reconnecting');
      const wait = backoff + Math.random() * backoff * 0.3;
      backoff = Math.min(backoff * 2, 15000);
      await new Promise((r) => setTimeout(r, wait));
    }
  })();
  return () => {
    stopped = true;
    ctl.abort();
  };
}

/** An incremental parser of text/event-stream: feed it text chunks; it calls `emit` per event. */
export function sseParser(emit) {
  let buf = '';
  let ev = { event: '', data: [], id: '', retry: 0 };
  return (chunk) => {
    buf += chunk;
    for (;;) {
      const m = /\r\n|\n|\r/.exec(buf);
      // A lone \r at the end may be the first half of \r\n: wait for more.
      if (!m || (m[0] === '\r' && m.index === buf.length - 1)) return;
      const line = buf.slice(0, m.index);
      buf = buf.slice(m.index + m[0].length);
      if (line === '') {
        if (ev.data.length) {
          emit({ event: ev.event || 'message', data: ev.data.join('\n'), id: ev.id, retry: ev.retry });
        }
        ev = { event: '', data: [], id: ev.id, retry: 0 };
        continue;
      }
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') ev.event = value;
      else if (field === 'data') ev.data.push(value);
      else if (field === 'id' && !value.includes('\0')) ev.id = value;
      else if (field === 'retry' && /^\d+$/.test(value)) ev.retry = Number(value);
    }
  };
}
