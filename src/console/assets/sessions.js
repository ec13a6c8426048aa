// Sessions: newest first, filtered by status and client, paged by cursor; find one by id; select
// several active ones and cancel them. Rows on screen follow the event stream.

import * as api from './api.js';
import { h, fill, heading, statusBadge, table, num, time, message, confirmDialog, STATUSES, isActive } from './dom.js';

const PAGE = 25;

export function render(main, _params, query) {
  const state = {
    status: query.get('status') || '',
    client: query.get('client_id') || '',
    cursors: [null], // cursor of each page shown so far; the last is the current page's
    next: null,
    sessions: new Map(),
    selected: new Set(),
  };
  const live = h('p', { class: 'live', role: 'status' }, '');
  const statusSel = h('select', { id: 'f-status', name: 'status' },
    h('option', { value: '' }, 'Any'), STATUSES.map((s) => h('option', { value: s }, s)));
  statusSel.value = state.status;
  const clientIn = h('input', { id: 'f-client', name: 'client_id', type: 'text', value: state.client, autocomplete: 'off' });
  const filters = h('form', { class: 'filters', 'aria-label': 'Filter sessions' },
    h('div', { class: 'field' }, h('label', { for: 'f-status' }, 'Status'), statusSel),
    h('div', { class: 'field' }, h('label', { for: 'f-client' }, 'Client'), clientIn),
    h('div', { class: 'field end' }, h('button', { type: 'submit' }, 'Apply')));
  const idIn = h('input', { id: 'f-id', name: 'id', type: 'search', autocomplete: 'off', required: true });
  const findOut = h('div', { 'aria-live': 'polite' });
  const find = h('form', { class: 'filters', role: 'search', 'aria-label': 'Find a session by id' },
    h('div', { class: 'field grow' }, h('label', { for: 'f-id' }, 'Session id'), idIn),
    h('div', { class: 'field end' }, h('button', { type: 'submit' }, 'Find')));
  const out = h('div', { 'aria-live': 'polite', id: 'list-msg' });
  const selectAll = h('input', { type: 'checkbox', id: 'select-all' });
  const cancelBtn = h('button', { type: 'button', class: 'danger', id: 'cancel-selected', disabled: true }, 'Cancel selected');
  const list = h('div', {}, h('p', {}, 'Loading…'));
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
  main.append(heading('Sessions', live), filters, find, findOut,
    h('div', { class: 'toolbar' },
      h('div', { class: 'field check' }, selectAll, h('label', { for: 'select-all' }, 'Select the active sessions on this page')),
      cancelBtn, h('a', { href: '#/submit', class: 'button secondary' }, 'Submit a session')),
    out, list, pager);

  let stopped = false;

  async function load() {
    const cursor = state.cursors[state.cursors.length - 1];
    try {
      const page = await api.get(api.withQuery('/v1/sessions', {
        status: state.status, client_id: state.client, limit: PAGE, cursor,
      }));
      if (stopped) return;
      state.sessions = new Map(page.sessions.map((s) => [s.id, s]));
      state.next = page.next_cursor;
      for (const id of [...state.selected]) if (!state.sessions.has(id)) state.selected.delete(id);
      draw();
    } catch (e) {
      if (stopped) return;
      fill(list, message('error', e.status === 404 && state.client
        ? 'no sessions of client "' + state.client + '" are visible to you'
        : e.message));
      fill(pager);
    }
  }

  function draw() {
    const rows = [...state.sessions.values()];
    const active = rows.filter((s) => isActive(s.status));
    selectAll.disabled = !active.length;
    selectAll.checked = active.length > 0 && active.every((s) => state.selected.has(s.id));
    selectAll.onchange = () => {
      for (const s of active) selectAll.checked ? state.selected.add(s.id) : state.selected.delete(s.id);
      draw();
    };
    if (!rows.length) {
      fill(list, h('p', { class: 'muted' }, state.cursors.length > 1 ? 'No more sessions.' : 'No sessions match.'));
    } else {
      fill(list, table('Sessions, newest first', ['Select', 'Session', 'Status', 'Client', 'Agent', 'Created', 'Pages', 'Records', 'Attempt'],
        rows.map((s) => h('tr', { 'data-id': s.id },
          h('td', {}, h('input', {
            type: 'checkbox', class: 'pick', 'aria-label': 'Select session ' + s.id,
            disabled: !isActive(s.status), checked: state.selected.has(s.id),
            onchange: (e) => {
              e.target.checked ? state.selected.add(s.id) : state.selected.delete(s.id);
              drawCancel();
            },
          })),
          h('td', {}, h('a', { href: '#/sessions/' + encodeURIComponent(s.id) }, s.id)),
          h('td', { class: 'st' }, statusBadge(s.status)),
          h('td', {}, s.client.client_id || '—'),
          h('td', {}, s.agent || '—'),
          h('td', {}, time(s.created_at)),
          h('td', { class: 'n' }, num(s.metrics.pages_processed)),
          h('td', { class: 'n' }, num(s.records)),
          h('td', { class: 'n' }, String(s.attempt)))), { stack: true }));
    }
    const page = state.cursors.length;
    fill(pager,
      h('button', { type: 'button', class: 'secondary', disabled: page === 1, onclick: () => { state.cursors.pop(); load(); } }, '← Newer'),
      h('span', { class: 'muted' }, 'Page ' + page),
      h('button', { type: 'button', class: 'secondary', id: 'next-page', disabled: !state.next, onclick: () => { state.cursors.push(state.next); load(); } }, 'Older →'));
    drawCancel();
  }

  function drawCancel() {
    const n = state.selected.size;
    cancelBtn.disabled = n === 0;
    cancelBtn.textContent = n ? 'Cancel selected (' + n + ')' : 'Cancel selected';
  }

  cancelBtn.addEventListener('click', async () => {
    const ids = [...state.selected];
    if (!ids.length) return;
    const ok = await confirmDialog('Cancel ' + ids.length + ' session' + (ids.length > 1 ? 's' : '') + '?',
      'Pending sessions end at once; running ones finish the step in flight, then end CANCELLED.', 'Cancel sessions');
    if (!ok) return;
    const results = await Promise.allSettled(ids.map((id) => api.post('/v1/sessions/' + api.enc(id) + '/cancel')));
    const failed = [];
    results.forEach((r, i) => {
      if (r.status === 'fulfilled') {
        state.selected.delete(ids[i]);
        state.sessions.set(ids[i], r.value);
      } else failed.push(ids[i] + ': ' + r.reason.message);
    });
    fill(out, failed.length
      ? message('error', 'could not cancel ' + failed.join('; '))
      : message('ok', 'Cancel sent to ' + ids.length + ' session' + (ids.length > 1 ? 's' : '') + '.'));
    draw();
  });

  filters.addEventListener('submit', (e) => {
    e.preventDefault();
    state.status = statusSel.value;
    state.client = clientIn.value.trim();
    state.cursors = [null];
    state.selected.clear();
    // The filters live in the address (shareable, kept on reload) without re-rendering the page.
    history.replaceState(null, '', api.withQuery('#/sessions', { status: state.status, client_id: state.client }));
    load();
  });

  find.addEventListener('submit', async (e) => {
    e.preventDefault();
    const id = idIn.value.trim();
    fill(findOut);
    if (!id) return;
    try {
      const s = await api.get('/v1/sessions/' + api.enc(id));
      location.hash = '#/sessions/' + encodeURIComponent(s.id);
    } catch (err) {
      fill(findOut, message('error', err.status === 404 ? 'no session with id "' + id + '"' : err.message));
    }
  });

  const stop = api.subscribe('/v1/events', (kind, data) => {
    const s = data && data.session;
    if (!s || !state.sessions.has(s.id)) return;
    state.sessions.set(s.id, s);
    if (!isActive(s.status)) state.selected.delete(s.id);
    redrawSoon();
  }, { onState: (st) => { live.textContent = st === 'live' ? '● Live' : st === 'reconnecting' ? 'Reconnecting…' : ''; } });

  let redraw = null;
  function redrawSoon() {
    if (redraw) return;
    redraw = setTimeout(() => {
      redraw = null;
      if (!stopped) draw();
    }, 500);
  }

  load();
  return () => {
    stopped = true;
    stop();
    if (redraw) clearTimeout(redraw);
  };
}
