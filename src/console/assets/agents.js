// Agents: saved configs with their schedule, next and last run and concurrency rule; run one now
// (optionally under a chosen session id), create, edit and delete them.

import * as api from './api.js';
import { h, fill, heading, statusBadge, table, time, message, confirmDialog, readFile } from './dom.js';
import { locate } from './submit.js';

const LAST_RUN_LOOKUPS = 100;

export function render(main) {
  const out = h('div', { id: 'agents-msg', 'aria-live': 'polite' });
  const list = h('div', {}, h('p', {}, 'Loading…'));
  const editor = h('section', { 'aria-labelledby': 'edit-h', hidden: true, class: 'card' });
  const create = h('button', { type: 'button', id: 'new-agent', onclick: () => edit(null) }, 'New agent');
  main.append(heading('Agents'), h('div', { class: 'toolbar' }, create), out, editor, list);
  let stopped = false;

  async function load() {
    try {
      const { agents } = await api.get('/v1/agents');
      if (stopped) return;
      draw(agents, new Map());
      // Last runs: one small query per agent (bounded), drawn when they arrive.
      const last = new Map();
      await Promise.all(agents.slice(0, LAST_RUN_LOOKUPS).map(async (a) => {
        try {
          const page = await api.get(api.withQuery('/v1/sessions', { agent: a.name, limit: 1 }));
          last.set(a.name, page.sessions[0] || null);
        } catch {
          last.set(a.name, undefined);
        }
      }));
      if (!stopped) draw(agents, last);
    } catch (e) {
      if (!stopped) fill(list, message('error', e.message));
    }
  }

  function draw(agents, last) {
    if (!agents.length) {
      fill(list, h('p', { class: 'muted' }, 'No agents yet. An agent is a saved config you can run by name, or on a schedule.'));
      return;
    }
    fill(list, table('Agents', ['Name', 'Schedule', 'Next run', 'Last run', 'Sessions', 'Actions'],
      agents.map((a) => {
        const run = last.get(a.name);
        return h('tr', { 'data-agent': a.name },
          h('th', { scope: 'row', class: 'name' }, a.name),
          h('td', {}, a.schedule ? h('code', {}, a.schedule) : h('span', { class: 'muted' }, 'none')),
          h('td', {}, a.next_run_at ? time(a.next_run_at) : '—'),
          h('td', {}, run ? h('span', {}, h('a', { href: '#/sessions/' + encodeURIComponent(run.id) }, run.id), ' ', statusBadge(run.status))
            : run === null ? h('span', { class: 'muted' }, 'never') : '—'),
          h('td', {}, a.sessions),
          h('td', { class: 'row-actions' },
            h('button', { type: 'button', class: 'run', onclick: () => runNow(a) }, 'Run now…'),
            h('button', { type: 'button', class: 'secondary edit', onclick: () => edit(a) }, 'Edit'),
            h('button', { type: 'button', class: 'danger delete', onclick: () => remove(a) }, 'Delete…')));
      }), { stack: true }));
  }

  function runNow(a) {
    const idIn = h('input', { id: 'run-session-id', type: 'text', autocomplete: 'off', 'aria-describedby': 'run-help' });
    const err = h('div', { 'aria-live': 'polite' });
    const cancel = h('button', { type: 'button', class: 'secondary' }, 'Cancel');
    const form = h('form', {},
      h('h2', { id: 'run-h' }, 'Run agent ' + a.name),
      h('div', { class: 'field' }, h('label', { for: 'run-session-id' }, 'Session id (optional)'), idIn,
        h('p', { class: 'help', id: 'run-help' }, 'Leave empty for a new UUID.')),
      err,
      h('div', { class: 'actions' }, cancel, h('button', { type: 'submit', id: 'run-go' }, 'Run')));
    const dlg = h('dialog', { 'aria-labelledby': 'run-h' }, form);
    cancel.addEventListener('click', () => dlg.close());
    dlg.addEventListener('close', () => dlg.remove());
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const body = {};
      if (idIn.value.trim()) body.session_id = idIn.value.trim();
      try {
        const s = await api.post('/v1/agents/' + api.enc(a.name) + '/run', body);
        dlg.close();
        location.hash = '#/sessions/' + encodeURIComponent(s.id);
      } catch (ex) {
        fill(err, message('error', ex.message));
        idIn.focus();
      }
    });
    document.body.append(dlg);
    dlg.showModal();
    idIn.focus();
  }

  async function remove(a) {
    const ok = await confirmDialog('Delete agent ' + a.name + '?',
      'Its schedule stops; sessions it already ran stay until their own cleanup.', 'Delete agent');
    if (!ok) return;
    try {
      await api.del('/v1/agents/' + api.enc(a.name));
      fill(out, message('ok', 'Agent ' + a.name + ' deleted.'));
      load();
    } catch (e) {
      fill(out, message('error', e.message));
    }
  }

  function edit(a) {
    const name = h('input', { id: 'a-name', type: 'text', required: true, autocomplete: 'off', value: a ? a.name : '', readonly: !!a, 'aria-describedby': 'a-name-help' });
    const config = h('textarea', { id: 'a-config', rows: '14', wrap: 'off', spellcheck: 'false', class: 'code', required: true, 'aria-describedby': 'a-config-errors' });
    config.value = a ? JSON.stringify(a.config, null, 2) : '';
    const file = h('input', { id: 'a-file', type: 'file', accept: '.toml,.json,text/plain,application/json' });
    const errors = h('div', { id: 'a-config-errors', class: 'beside', 'aria-live': 'polite' });
    const params = h('textarea', { id: 'a-params', rows: '3', spellcheck: 'false', class: 'code', 'aria-describedby': 'a-params-help' });
    params.value = a ? Object.entries(a.params).map(([k, v]) => k + ' = ' + v).join('\n') : '';
    const schedule = h('input', { id: 'a-schedule', type: 'text', autocomplete: 'off', value: a && a.schedule ? a.schedule : '', 'aria-describedby': 'a-schedule-help' });
    const sessions = h('select', { id: 'a-sessions' }, h('option', { value: 'multiple' }, 'multiple: runs may overlap'), h('option', { value: 'single' }, 'single: one run at a time, only the last run kept'));
    sessions.value = a ? a.sessions : 'multiple';
    const msg = h('div', { 'aria-live': 'polite' });
    const form = h('form', { novalidate: true },
      h('h2', { id: 'edit-h' }, a ? 'Edit agent ' + a.name : 'New agent'),
      h('div', { class: 'field' }, h('label', { for: 'a-name' }, 'Name'), name,
        h('p', { class: 'help', id: 'a-name-help' }, a ? 'The name cannot change; save under a new name with "New agent".' : '1–128 of A–Z a–z 0–9 . _ : -')),
      h('div', { class: 'editor' },
        h('div', { class: 'editor-text' },
          h('label', { for: 'a-config' }, 'Config (TOML or JSON)'),
          h('div', { class: 'upload' }, h('label', { for: 'a-file' }, 'Upload a file'), file),
          config),
        errors),
      h('div', { class: 'grid' },
        h('div', { class: 'field' }, h('label', { for: 'a-schedule' }, 'Schedule (cron, optional)'), schedule,
          h('p', { class: 'help', id: 'a-schedule-help' }, 'Six fields with seconds: sec min hour day month weekday, e.g. 0 */15 * * * *')),
        h('div', { class: 'field' }, h('label', { for: 'a-sessions' }, 'Sessions'), sessions)),
      h('div', { class: 'field' }, h('label', { for: 'a-params' }, 'Default params'), params,
        h('p', { class: 'help', id: 'a-params-help' }, 'One "name = value" per line.')),
      msg,
      h('div', { class: 'actions' },
        h('button', { type: 'button', class: 'secondary', onclick: close }, 'Cancel'),
        h('button', { type: 'submit', id: 'save-agent' }, 'Save agent')));
    file.addEventListener('change', async () => {
      const f = file.files && file.files[0];
      if (f) config.value = await readFile(f);
    });
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      fill(msg);
      fill(errors);
      const p = {};
      for (const line of params.value.split('\n')) {
        const t = line.trim();
        if (!t || t.startsWith('#')) continue;
        const eq = t.indexOf('=');
        if (eq < 1) {
          fill(msg, message('error', 'params: "' + t + '" is not "name = value"'));
          params.focus();
          return;
        }
        p[t.slice(0, eq).trim()] = t.slice(eq + 1).trim();
      }
      let cfg = config.value;
      if (cfg.trim().startsWith('{')) {
        try {
          cfg = JSON.parse(cfg);
        } catch {
          // The server names the line.
        }
      }
      const body = { config: cfg, params: p, sessions: sessions.value };
      if (schedule.value.trim()) body.schedule = schedule.value.trim();
      if (a) body.options = a.options;
      try {
        await api.put('/v1/agents/' + api.enc(name.value.trim()), body);
        fill(out, message('ok', 'Agent ' + name.value.trim() + ' saved.'));
        close();
        load();
      } catch (ex) {
        if (ex.code === 'invalid_config') {
          const where = locate(ex.message, config.value);
          config.setAttribute('aria-invalid', 'true');
          fill(errors, h('p', { class: 'msg msg-error', role: 'alert' }, 'Error in the config' + (where.line ? ' (line ' + where.line + ')' : '')),
            h('pre', { class: 'error-text' }, ex.message));
        } else fill(msg, message('error', ex.message));
      }
    });
    fill(editor, form);
    editor.hidden = false;
    (a ? config : name).focus();
  }

  function close() {
    editor.hidden = true;
    fill(editor);
    create.focus();
  }

  load();
  return () => {
    stopped = true;
  };
}
