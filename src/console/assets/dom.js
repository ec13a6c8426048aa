// Building the page: elements are created one by one and every value is set as text, never parsed
// as HTML, so a title, record or log line holding "<script>" shows as those characters.

/**
 * h('a', {href: '#/x', class: 'c'}, 'text', child, ...): an element. Attributes starting with
 * "on" are listeners; `false`, null and undefined attributes and children are skipped; strings and
 * numbers become text nodes.
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.append(c);
    else el.append(document.createTextNode(String(c)));
  }
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** An SVG element (for the small charts). */
export function svg(tag, attrs, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  append(el, children);
  return el;
}

const STATUS_MARK = { PENDING: '○', RUNNING: '◐', COMPLETED: '✓', FAILED: '✗', CANCELLED: '⊘' };

/** A status as text with a mark (colour only repeats what the words say). */
export function statusBadge(status) {
  return h('span', { class: 'status status-' + String(status).toLowerCase() },
    h('span', { 'aria-hidden': 'true' }, (STATUS_MARK[status] || '•') + ' '), String(status));
}

export const STATUSES = ['PENDING', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED'];
export const isActive = (s) => s === 'PENDING' || s === 'RUNNING';

const numberFormat = new Intl.NumberFormat('en-US');
export const num = (n) => (n === null || n === undefined ? '—' : numberFormat.format(n));
export const rate = (r) => (r ? r.toFixed(r < 10 ? 1 : 0) + '/s' : '0/s');

export function bytes(n) {
  if (!n) return '0 B';
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return (i ? n.toFixed(1) : String(n)) + ' ' + units[i];
}

export function duration(secs) {
  if (secs === null || secs === undefined) return '—';
  if (secs < 60) return secs.toFixed(secs < 10 ? 1 : 0) + ' s';
  const m = Math.floor(secs / 60);
  if (m < 60) return m + ' min ' + Math.floor(secs % 60) + ' s';
  return Math.floor(m / 60) + ' h ' + (m % 60) + ' min';
}

const pad = (n) => String(n).padStart(2, '0');

/** A time as local "YYYY-MM-DD HH:MM:SS" in a <time> element with the exact instant. */
export function time(t) {
  if (!t) return h('span', {}, '—');
  const d = new Date(t);
  if (isNaN(d)) return h('span', {}, String(t));
  const text = d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' +
    pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  return h('time', { datetime: d.toISOString(), title: d.toISOString() }, text);
}

/** Any JSON value as one line of text (strings as they are). */
export function plain(v) {
  if (v === null || v === undefined) return '';
  if (typeof v === 'string') return v;
  return JSON.stringify(v);
}

/** A <dl> of [term, value] pairs; values may be nodes. */
export function dl(pairs, cls) {
  return h('dl', { class: cls || 'facts' }, pairs.filter(Boolean).map(([k, v]) =>
    h('div', {}, h('dt', {}, k), h('dd', {}, v === undefined || v === null || v === '' ? '—' : v))));
}

/**
 * A table in a horizontally scrollable, keyboard-focusable region. With `opts.stack`, narrow
 * screens show each row as a card of "column: value" lines (the labels come from `head`).
 */
export function table(caption, head, rows, opts = {}) {
  if (opts.stack) {
    for (const tr of rows) {
      [...tr.children].forEach((cell, i) => {
        if (typeof head[i] === 'string') cell.setAttribute('data-label', head[i]);
      });
    }
  }
  const cls = [opts.class, opts.stack ? 'stack' : ''].filter(Boolean).join(' ');
  return h('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': caption },
    h('table', { class: cls },
      h('caption', { class: 'visually-hidden' }, caption),
      h('thead', {}, h('tr', {}, head.map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, rows)));
}

/** A message line: kind 'error', 'ok' or 'info'; announced to screen readers. */
export function message(kind, text) {
  return h('p', { class: 'msg msg-' + kind, role: kind === 'error' ? 'alert' : 'status' },
    kind === 'error' ? 'Error: ' : '', text);
}

/** A page heading, focused so keyboard and screen-reader users land on the new page. */
export function heading(text, ...extra) {
  return h('div', { class: 'page-head' }, h('h1', { tabindex: '-1' }, text), ...extra);
}

/**
 * Asks for confirmation in a modal <dialog> (Escape or "Keep" declines). Resolves true when the
 * user confirms.
 */
export function confirmDialog(title, text, confirmLabel) {
  return new Promise((resolve) => {
    const no = h('button', { type: 'button', class: 'secondary', value: 'no' }, 'Keep');
    const yes = h('button', { type: 'button', class: 'danger', value: 'yes' }, confirmLabel);
    const dlg = h('dialog', { class: 'confirm', 'aria-labelledby': 'dlg-title' },
      h('h2', { id: 'dlg-title' }, title),
      h('p', {}, text),
      h('div', { class: 'actions' }, no, yes));
    let answer = false;
    no.addEventListener('click', () => dlg.close());
    yes.addEventListener('click', () => {
      answer = true;
      dlg.close();
    });
    dlg.addEventListener('close', () => {
      dlg.remove();
      resolve(answer);
    });
    document.body.append(dlg);
    dlg.showModal();
    no.focus();
  });
}

/** Reads a chosen file as text. */
export const readFile = (file) => file.text();
