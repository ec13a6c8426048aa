// One session: status, client, options, attempts, metrics and usage (live from its event stream),
// error, log (tail, refreshed as it runs), records (paged table, JSONL and CSV downloads), context
// variables when it has them; cancel, close (after a confirmation), run again.

import * as api from './api.js';
import {
  h, fill, heading, statusBadge, table, dl, num, rate, bytes, duration, time, plain, message,
  confirmDialog, isActive,
} from './dom.js';

const RECORDS_PAGE = 25;
const LOG_LINES = 200;

export function render(main, [id]) {
  const base = '/v1/sessions/' + api.enc(id);
  const live = h('p', { class: 'live', role: 'status' }, 'Connecting…');
  const badge = h('span', { id: 'status' });
  const actions = h('div', { class: 'toolbar' });
  const notice = h('div', { 'aria-live': 'polite', id: 'session-msg' });
  const summary = h('section', { 'aria-labelledby': 'sum-h' });
  const progress = h('section', { 'aria-labelledby': 'prog-h' });
  const attempts = h('section', { 'aria-labelledby': 'att-h', hidden: true });
  const context = h('section', { 'aria-labelledby': 'ctx-h', hidden: true });
  const logSec = h('section', { 'aria-labelledby': 'log-h' }, h('h2', { id: 'log-h' }, 'Log'));
  const logBox = h('ol', { class: 'log', tabindex: '0', 'aria-label': 'Log, oldest line first' });
  logSec.append(logBox);
  const recCount = h('span', { class: 'muted', id: 'records-count' }, '');
  const recBody = h('div', {}, h('p', {}, 'Loading…'));
  const dlBtn = (fmt, label) => h('button', {
    type: 'button', class: 'secondary', id: 'download-' + fmt,
    onclick: async () => {
      try {
        await api.download(base + '/records?format=' + fmt, id + '.' + fmt);
      } catch (e) {
        fill(notice, message('error', 'download: ' + e.message));
      }
    },
  }, label);
  const recSec = h('section', { 'aria-labelledby': 'rec-h' },
    h('h2', { id: 'rec-h' }, 'Records ', recCount),
    h('div', { class: 'toolbar' }, dlBtn('jsonl', 'Download JSONL'), dlBtn('csv', 'Download CSV')),
    recBody);
  const optSec = h('section', { 'aria-labelledby': 'opt-h' });
  main.append(
    heading('Session', badge, live),
    h('p', { class: 'session-id' }, h('code', { id: 'session-id' }, id)),
    actions, notice, summary, progress, attempts, context, recSec, logSec, optSec);

  let session = null;
  let stopped = false;
  let offset = 0;
  let shownRecords = -1;
  const timers = new Set();
  const later = (fn, ms) => {
    const t = setTimeout(() => {
      timers.delete(t);
      if (!stopped) fn();
    }, ms);
    timers.add(t);
  };
  // Throttled refreshes: the log and the records page follow progress at most once a second.
  const pending = {};
  const soon = (name, fn, ms) => {
    if (pending[name]) return;
    pending[name] = true;
    later(() => {
      pending[name] = false;
      fn();
    }, ms);
  };

  const shown = {};
  const redraw = (name, key, draw) => {
    if (shown[name] === key) return;
    shown[name] = key;
    draw();
  };

  function update(s) {
    // Views from events carry no job; keep the one the first GET gave.
    if (session && session.job && !s.job) s.job = session.job;
    session = s;
    // Parts with buttons or links are rebuilt only when what they show changed, so keyboard
    // focus stays put while progress streams in.
    redraw('badge', s.status, () => fill(badge, statusBadge(s.status)));
    redraw('actions', [s.status, s.cancel_requested, !!s.job].join(), drawActions);
    redraw('summary', JSON.stringify([s.status, s.attempt, s.error, s.metrics.start_time, s.metrics.end_time, s.cleanup_at, s.client]),
      () => drawSummary(summary, s));
    drawProgress(progress, s);
    redraw('options', JSON.stringify([s.options, s.job && s.job.params]), () => drawOptions(optSec, s));
    redraw('attempts', JSON.stringify(s.attempts || null), () => drawAttempts(attempts, s));
    if (s.records !== shownRecords) soon('records', loadRecords, 1000);
  }

  function drawActions() {
    const s = session;
    const cancel = h('button', { type: 'button', id: 'cancel', class: 'secondary', onclick: doCancel }, 'Cancel');
    const again = h('button', {
      type: 'button', id: 'run-again', class: 'secondary', onclick: runAgain, disabled: !s.job,
      title: s.job ? null : 'this server does not show the session\'s config',
    }, 'Run again');
    const close = h('button', { type: 'button', id: 'close', class: 'danger', onclick: doClose }, 'Close…');
    fill(actions, isActive(s.status) && !s.cancel_requested ? cancel : null, again, close);
    if (s.cancel_requested && isActive(s.status)) actions.prepend(h('span', { class: 'muted' }, 'Cancel requested…'));
  }

  async function doCancel() {
    try {
      update(await api.post(base + '/cancel'));
      fill(notice, message('ok', 'Cancel sent.'));
    } catch (e) {
      fill(notice, message('error', e.message));
    }
  }

  async function doClose() {
    const ok = await confirmDialog('Close this session?',
      'Closing removes session ' + id + ' and all its records and log now. This cannot be undone.', 'Close session');
    if (!ok) return;
    try {
      await api.del(base);
      closed('Session ' + id + ' was closed: it and its records are removed.');
    } catch (e) {
      fill(notice, message('error', e.message));
    }
  }

  function closed(text) {
    stopped = true;
    stop();
    fill(main, heading('Session closed'), message('ok', text), h('p', {}, h('a', { href: '#/sessions' }, 'Back to the sessions')));
    main.querySelector('h1').focus();
  }

  async function runAgain() {
    const s = session;
    if (!s || !s.job) return;
    const options = { ...s.options };
    delete options.run_at;
    const body = { config: s.job.config, params: s.job.params, options, client: { metadata: s.client.metadata } };
    if (s.client.client_id) body.client.client_id = s.client.client_id;
    try {
      const created = await api.post('/v1/sessions', body);
      location.hash = '#/sessions/' + encodeURIComponent(created.id);
    } catch (e) {
      fill(notice, message('error', 'run again: ' + e.message));
    }
  }

  async function loadLog() {
    try {
      const log = await api.get(base + '/log?limit=' + LOG_LINES);
      if (stopped) return;
      const atEnd = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
      fill(logBox, log.lines.length ? log.lines.map((l) => h('li', { class: 'log-' + l.level },
        time(l.at), ' ', h('span', { class: 'level' }, l.level.toUpperCase()), ' ', h('span', { class: 'text' }, l.message)))
        : h('li', { class: 'muted' }, 'Nothing logged yet.'));
      if (atEnd) logBox.scrollTop = logBox.scrollHeight;
    } catch (e) {
      if (!stopped) fill(logBox, h('li', {}, message('error', e.message)));
    }
  }

  async function loadRecords() {
    if (!session) return;
    const total = session.records;
    try {
      const rows = await api.get(base + '/records?format=json&offset=' + offset + '&limit=' + RECORDS_PAGE);
      if (stopped) return;
      shownRecords = total;
      drawRecords(rows, total);
    } catch (e) {
      if (!stopped) fill(recBody, message('error', e.message));
    }
  }

  function drawRecords(rows, total) {
    const cols = [];
    for (const r of rows) {
      if (r && typeof r === 'object' && !Array.isArray(r)) {
        for (const k of Object.keys(r)) if (!cols.includes(k)) cols.push(k);
      } else if (!cols.includes('value')) cols.push('value');
    }
    const cell = (r, c) => (r && typeof r === 'object' && !Array.isArray(r) ? r[c] : c === 'value' ? r : undefined);
    const first = rows.length ? offset + 1 : 0;
    recCount.textContent = '(' + num(total) + ')';
    if (!rows.length && offset === 0) {
      fill(recBody, h('p', { class: 'muted' }, 'No records yet.'));
      return;
    }
    fill(recBody,
      table('Records ' + first + ' to ' + (offset + rows.length), ['#', ...cols],
        rows.map((r, i) => h('tr', {}, h('td', { class: 'n' }, String(offset + i + 1)),
          cols.map((c) => h('td', { class: 'rec' }, plain(cell(r, c)))))), { class: 'records' }),
      h('nav', { class: 'pager', 'aria-label': 'Record pages' },
        h('button', { type: 'button', class: 'secondary', disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - RECORDS_PAGE); loadRecords(); } }, '← Previous'),
        h('span', { class: 'muted' }, 'Records ' + num(first) + '–' + num(offset + rows.length) + ' of ' + num(total)),
        h('button', { type: 'button', class: 'secondary', id: 'records-next', disabled: offset + rows.length >= total, onclick: () => { offset += RECORDS_PAGE; loadRecords(); } }, 'Next →')));
  }

  async function loadContext() {
    try {
      const ctx = await api.getOptional(base + '/context');
      if (stopped || !ctx || !ctx.variables) return;
      const names = Object.keys(ctx.variables);
      if (!names.length) return;
      context.hidden = false;
      fill(context, h('h2', { id: 'ctx-h' }, 'Context variables'),
        dl(names.map((n) => {
          const v = ctx.variables[n];
          return [n, Array.isArray(v) ? h('ol', { class: 'values' }, v.map((x) => h('li', {}, plain(x)))) : plain(v)];
        })));
    } catch {
      // Context is an extra: without it the page is complete.
    }
  }

  async function reload() {
    try {
      const s = await api.get(base);
      if (stopped) return;
      update(s);
      loadLog();
      loadRecords();
      loadContext();
    } catch (e) {
      if (stopped) return;
      if (e.status === 404) closed('There is no session ' + id + ' (it may have been closed or cleaned up).');
      else fill(notice, message('error', e.message));
    }
  }

  const stop = api.subscribe(base + '/events', (kind, data) => {
    if (kind === 'removed') {
      closed('Session ' + id + ' was removed.');
      return;
    }
    if (!data || !data.session) return;
    update(data.session);
    soon('log', loadLog, 1000);
    if (!isActive(data.session.status)) {
      // The end: read everything once more (the last records, log lines and context).
      later(reload, 0);
    }
  }, {
    final: ['completed', 'failed', 'cancelled', 'removed'],
    onState: (st) => {
      live.textContent = st === 'live' ? '● Live' : st === 'reconnecting' ? 'Reconnecting…' : st === 'ended' ? 'Ended' : '';
    },
  });

  reload();
  return () => {
    stopped = true;
    stop();
    for (const t of timers) clearTimeout(t);
  };
}

function drawSummary(section, s) {
  const meta = Object.keys(s.client.metadata || {});
  fill(section, h('h2', { id: 'sum-h', class: 'visually-hidden' }, 'Summary'),
    s.error ? h('div', { class: 'error-box', role: 'alert' }, h('strong', {}, 'Error ' + s.error.kind + ': '), s.error.message) : null,
    dl([
      ['Status', statusBadge(s.status)],
      ['Client', s.client.client_id || '—'],
      ['Agent', s.agent ? h('a', { href: '#/agents' }, s.agent) : '—'],
      ['Attempt', String(s.attempt)],
      ['Created', time(s.created_at)],
      ['Started', time(s.metrics.start_time)],
      ['Ended', time(s.metrics.end_time)],
      ['Removed after', time(s.cleanup_at)],
      meta.length ? ['Metadata', dl(meta.map((k) => [k, plain(s.client.metadata[k])]), 'facts inner')] : null,
    ]));
}

function drawProgress(section, s) {
  const m = s.metrics;
  const u = s.usage;
  fill(section, h('h2', { id: 'prog-h' }, 'Progress'),
    h('ul', { class: 'counts small' },
      h('li', { class: 'count' }, h('span', { class: 'count-n', id: 'm-pages' }, num(m.pages_processed)), 'pages'),
      h('li', { class: 'count' }, h('span', { class: 'count-n', id: 'm-records' }, num(m.processed_elements)), 'records'),
      h('li', { class: 'count' }, h('span', { class: 'count-n', id: 'm-rate' }, rate(m.processing_rate)), 'records per second'),
      h('li', { class: 'count' }, h('span', { class: 'count-n' }, duration(m.duration_secs)), 'duration')),
    h('h3', {}, 'Usage'),
    dl([
      ['HTTP requests', num(u.http_requests)],
      ['HTTP errors', num(u.http_errors)],
      ['Bytes received', bytes(u.bytes_received)],
      ['Retries', num(u.retries)],
      ['robots.txt blocks', num(u.robots_blocked)],
    ], 'facts cols'));
}

function drawOptions(section, s) {
  const o = s.options;
  const secs = (v) => (v === null || v === undefined ? 'none' : duration(v));
  fill(section, h('h2', { id: 'opt-h' }, 'Options'), dl([
    ['Max duration', secs(o.max_duration_secs)],
    ['Session timeout', secs(o.session_timeout_secs)],
    ['Max attempts', o.max_attempts === null ? '—' : String(o.max_attempts)],
    ['Priority', String(o.priority)],
    ['Run at', time(o.run_at)],
    ['Token tracking', o.token_tracking ? 'on' : 'off'],
    ['Remove after export', o.remove_after_export ? 'yes' : 'no'],
    ['Clean up external rows', o.cleanup_external ? 'yes' : 'no'],
    s.job ? ['Params', Object.keys(s.job.params).length
      ? dl(Object.entries(s.job.params).map(([k, v]) => [k, v]), 'facts inner') : 'none'] : null,
  ], 'facts cols'));
}

function drawAttempts(section, s) {
  if (!Array.isArray(s.attempts)) return;
  section.hidden = false;
  fill(section, h('h2', { id: 'att-h' }, 'Attempts'),
    table('Attempts', ['Attempt', 'Started', 'Ended', 'Outcome'], s.attempts.map((a) => h('tr', {},
      h('td', { class: 'n' }, String(a.attempt)), h('td', {}, time(a.started_at)), h('td', {}, time(a.ended_at)),
      h('td', {}, plain(a.outcome)))), { stack: true }));
}
