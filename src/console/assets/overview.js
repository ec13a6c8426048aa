// Overview: sessions by status, the running sessions with live progress, and the last hour.
// Counts come from /v1/stats; on a server without it, they are counted from bounded pages of
// /v1/sessions (and say so).

import * as api from './api.js';
import { h, fill, svg, heading, statusBadge, table, num, rate, duration, message, STATUSES } from './dom.js';

const FALLBACK_PAGE = 500;
const FALLBACK_PAGES = 4;

export function render(main) {
  const live = h('p', { class: 'live', role: 'status' }, 'Connecting…');
  const counts = h('section', { 'aria-labelledby': 'counts-h' }, h('h2', { id: 'counts-h' }, 'Sessions by status'), h('p', {}, 'Loading…'));
  const running = h('section', { 'aria-labelledby': 'running-h' }, h('h2', { id: 'running-h' }, 'Running now'), h('p', {}, 'Loading…'));
  const hour = h('section', { 'aria-labelledby': 'hour-h' }, h('h2', { id: 'hour-h' }, 'Last hour'), h('p', {}, 'Loading…'));
  main.append(heading('Overview', live), counts, running, hour);

  const rows = new Map(); // session id -> view of the running sessions
  let stopped = false;
  let timer = null;
  let lastFallbackHour = 0;

  async function refreshCounts() {
    timer = null;
    if (stopped) return;
    lastRefresh = Date.now();
    try {
      // A server without /v1/stats answers 404 once; this page then stops asking.
      const stats = fallback ? null : await api.getOptional('/v1/stats');
      if (stopped) return;
      fallback = !stats;
      if (stats) {
        drawCounts(counts, stats.by_status || {}, false, stats.clients || []);
        if (stats.last_hour) drawHour(hour, stats.last_hour, null);
      } else {
        drawCounts(counts, await fallbackCounts(), true, []);
        if (Date.now() - lastFallbackHour > 30000) {
          lastFallbackHour = Date.now();
          const [series, seen] = await fallbackHour();
          if (!stopped) drawHour(hour, series, seen);
        }
      }
    } catch (e) {
      if (!stopped) fill(counts, h('h2', { id: 'counts-h' }, 'Sessions by status'), message('error', e.message));
    }
  }

  // Progress comes up to twice a second per session: redraw at most every half second.
  let drawTimer = null;
  function drawSoon() {
    if (drawTimer || stopped) return;
    drawTimer = setTimeout(() => {
      drawTimer = null;
      if (!stopped) drawRunning(running, rows);
    }, 500);
  }

  // Counting from the session list reads up to 2,500 sessions: then at most every 5 s.
  let fallback = false;
  let lastRefresh = 0;
  function soon(ms) {
    if (timer || stopped) return;
    const gap = (fallback ? 5000 : 1000) - (Date.now() - lastRefresh);
    timer = setTimeout(refreshCounts, Math.max(ms, gap));
  }

  async function loadRunning() {
    try {
      const page = await api.get('/v1/sessions?status=RUNNING&limit=100');
      for (const s of page.sessions) rows.set(s.id, s);
      drawRunning(running, rows);
    } catch (e) {
      fill(running, h('h2', { id: 'running-h' }, 'Running now'), message('error', e.message));
    }
  }

  const stop = api.subscribe('/v1/events', (kind, data) => {
    const s = data && data.session;
    if (!s) {
      if (kind === 'removed') rows.delete(data.session_id);
    } else if (s.status === 'RUNNING') rows.set(s.id, s);
    else rows.delete(s.id);
    drawSoon();
    if (kind !== 'progress') soon(1000);
  }, {
    onState: (st) => {
      live.textContent = st === 'live' ? '● Live' : st === 'reconnecting' ? 'Reconnecting…' : 'Not live';
      // Whatever was missed while disconnected is read again.
      if (st === 'live') {
        loadRunning();
        soon(0);
      }
    },
  });
  // Counts change without events too (cleanup removes sessions); a slow poll keeps them honest.
  const poll = setInterval(() => soon(0), 30000);

  return () => {
    stopped = true;
    stop();
    clearInterval(poll);
    if (timer) clearTimeout(timer);
    if (drawTimer) clearTimeout(drawTimer);
  };
}

async function fallbackCounts() {
  const out = {};
  await Promise.all(STATUSES.map(async (st) => {
    const page = await api.get('/v1/sessions?status=' + st + '&limit=' + FALLBACK_PAGE);
    out[st] = page.next_cursor ? FALLBACK_PAGE + '+' : page.sessions.length;
  }));
  return out;
}

/** Finished sessions and their records per minute of the last hour, from the newest sessions. */
async function fallbackHour() {
  const now = Date.now();
  const finished = new Array(60).fill(0);
  const records = new Array(60).fill(0);
  let cursor = null;
  let seen = 0;
  for (let i = 0; i < FALLBACK_PAGES; i++) {
    const page = await api.get(api.withQuery('/v1/sessions', { limit: FALLBACK_PAGE, cursor }));
    for (const s of page.sessions) {
      seen++;
      const end = s.metrics.end_time ? Date.parse(s.metrics.end_time) : NaN;
      const ago = Math.floor((now - end) / 60000);
      if (ago >= 0 && ago < 60) {
        finished[59 - ago]++;
        records[59 - ago] += s.records;
      }
    }
    cursor = page.next_cursor;
    const oldest = page.sessions[page.sessions.length - 1];
    if (!cursor || (oldest && now - Date.parse(oldest.created_at) > 86400000)) break;
  }
  return [{ finished_per_minute: finished, records_per_minute: records }, cursor ? seen : null];
}

function drawCounts(section, byStatus, approximate, clients) {
  const cards = STATUSES.map((st) => h('li', { class: 'count count-' + st.toLowerCase(), 'data-status': st },
    h('span', { class: 'count-n' }, typeof byStatus[st] === 'string' ? byStatus[st] : num(byStatus[st] || 0)),
    h('a', { href: '#/sessions?status=' + st }, statusBadge(st))));
  const parts = [h('h2', { id: 'counts-h' }, 'Sessions by status'), h('ul', { class: 'counts' }, cards)];
  if (approximate) parts.push(h('p', { class: 'help' }, 'Counted from the session list (this server has no /v1/stats); "+" means at least.'));
  if (clients.length > 1) {
    parts.push(table('Sessions by client and status', ['Client', ...STATUSES],
      clients.map((c) => h('tr', {}, h('td', {}, c.client_id || '(none)'),
        STATUSES.map((st) => h('td', { class: 'n' }, num((c.by_status || {})[st] || 0)))))));
  }
  fill(section, ...parts);
}

function drawRunning(section, rows) {
  const list = [...rows.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  const head = h('h2', { id: 'running-h' }, 'Running now ', h('span', { class: 'muted' }, '(' + list.length + ')'));
  if (!list.length) {
    fill(section, head, h('p', { class: 'muted' }, 'No session is running.'));
    return;
  }
  fill(section, head, table('Running sessions', ['Session', 'Client', 'Pages', 'Records', 'Rate', 'Running for'],
    list.map((s) => h('tr', { 'data-id': s.id },
      h('td', {}, h('a', { href: '#/sessions/' + encodeURIComponent(s.id) }, s.id)),
      h('td', {}, s.client.client_id || '—'),
      h('td', { class: 'n', 'data-field': 'pages' }, num(s.metrics.pages_processed)),
      h('td', { class: 'n', 'data-field': 'records' }, num(s.metrics.processed_elements)),
      h('td', { class: 'n' }, rate(s.metrics.processing_rate)),
      h('td', { class: 'n' }, duration(s.metrics.duration_secs)))), { stack: true }));
}

function drawHour(section, lastHour, seen) {
  const parts = [h('h2', { id: 'hour-h' }, 'Last hour')];
  parts.push(h('div', { class: 'charts' },
    chart('Sessions finished per minute', lastHour.finished_per_minute || [], 'sessions'),
    chart('Records per minute', lastHour.records_per_minute || [], 'records')));
  if (seen) parts.push(h('p', { class: 'help' }, 'From the newest ' + num(seen) + ' sessions only (this server has no /v1/stats).'));
  fill(section, ...parts);
}

function chart(title, series, unit) {
  const data = series.slice(-60);
  const total = data.reduce((a, b) => a + b, 0);
  const max = Math.max(1, ...data);
  const peak = Math.max(0, ...data);
  const summary = num(total) + ' ' + unit + ' in the last hour; at most ' + num(peak) + ' in one minute.';
  const bars = data.map((v, i) => {
    const bh = v ? Math.max(2, Math.round((v / max) * 96)) : 0;
    return svg('rect', { x: i * 10 + 1, y: 100 - bh, width: 8, height: bh, class: 'bar' },
      svg('title', {}, (59 - i ? (59 - i) + ' min ago' : 'this minute') + ': ' + num(v)));
  });
  return h('figure', { class: 'chart' },
    h('figcaption', {}, h('strong', {}, title), h('span', { class: 'chart-sum' }, summary)),
    svg('svg', { viewBox: '0 0 600 100', preserveAspectRatio: 'none', role: 'img', 'aria-label': title + ': ' + summary },
      svg('line', { x1: 0, y1: 100, x2: 600, y2: 100, class: 'axis' }), ...bars),
    h('div', { class: 'chart-axis', 'aria-hidden': 'true' }, h('span', {}, '60 min ago'), h('span', {}, 'now')));
}
