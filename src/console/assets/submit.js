// Submit: paste or upload a config (TOML or JSON), check it with the server, set params and
// options, submit, and go to the new session's page. A config error is shown beside the text,
// with the field it names and a button that selects that line.

import * as api from './api.js';
import { h, fill, heading, message, readFile } from './dom.js';

export function render(main, _params, _query, ctx) {
  const config = h('textarea', {
    id: 'config', name: 'config', rows: '20', wrap: 'off', spellcheck: 'false', autocomplete: 'off', required: true,
    'aria-describedby': 'config-help config-errors', class: 'code',
  });
  const file = h('input', { id: 'config-file', type: 'file', accept: '.toml,.json,text/plain,application/json,application/toml' });
  const errors = h('div', { id: 'config-errors', class: 'beside', 'aria-live': 'polite' },
    h('p', { class: 'help' }, 'Check the config to see errors here, next to the text.'));
  const params = h('textarea', { id: 'params', name: 'params', rows: '3', spellcheck: 'false', class: 'code', 'aria-describedby': 'params-help' });
  const fields = {
    session_id: h('input', { id: 'o-session-id', name: 'session_id', type: 'text', autocomplete: 'off', 'aria-describedby': 'o-session-id-help' }),
    client_id: ctx.needsToken ? null : h('input', { id: 'o-client', name: 'client_id', type: 'text', autocomplete: 'off' }),
    metadata: h('textarea', { id: 'o-metadata', name: 'metadata', rows: '2', spellcheck: 'false', class: 'code', placeholder: '{"team": "shop"}' }),
    priority: h('input', { id: 'o-priority', name: 'priority', type: 'number', step: '1', inputmode: 'numeric' }),
    max_attempts: h('input', { id: 'o-attempts', name: 'max_attempts', type: 'number', min: '1', max: '10000', step: '1', inputmode: 'numeric' }),
    max_duration_secs: h('input', { id: 'o-max-duration', name: 'max_duration_secs', type: 'number', min: '1', step: '1', inputmode: 'numeric' }),
    session_timeout_secs: h('input', { id: 'o-timeout', name: 'session_timeout_secs', type: 'number', min: '0', step: '1', inputmode: 'numeric' }),
    run_at: h('input', { id: 'o-run-at', name: 'run_at', type: 'datetime-local', step: '1' }),
    token_tracking: h('input', { id: 'o-tracking', name: 'token_tracking', type: 'checkbox', checked: true }),
    remove_after_export: h('input', { id: 'o-remove', name: 'remove_after_export', type: 'checkbox' }),
  };
  const out = h('div', { id: 'submit-msg', 'aria-live': 'polite' });
  const field = (input, label, help) => h('div', { class: 'field' },
    h('label', { for: input.id }, label), input, help ? h('p', { class: 'help', id: input.id + '-help' }, help) : null);
  const check = (input, label) => h('div', { class: 'field check' }, input, h('label', { for: input.id }, label));

  const form = h('form', { class: 'submit-form', novalidate: true },
    h('div', { class: 'editor' },
      h('div', { class: 'editor-text' },
        h('label', { for: 'config' }, 'Config (TOML or JSON)'),
        h('p', { class: 'help', id: 'config-help' }, 'Paste a scraper config below, or upload a .toml or .json file.'),
        h('div', { class: 'upload' }, h('label', { for: 'config-file' }, 'Upload a file'), file),
        config),
      errors),
    h('fieldset', {}, h('legend', {}, 'Params'),
      h('p', { class: 'help', id: 'params-help' }, 'One "name = value" per line; they override the config\'s [vars].'),
      h('label', { for: 'params', class: 'visually-hidden' }, 'Params'), params),
    h('fieldset', { class: 'options' }, h('legend', {}, 'Options'),
      h('div', { class: 'grid' },
        field(fields.session_id, 'Session id', 'Optional; 1–128 of A–Z a–z 0–9 . _ : -'),
        fields.client_id ? field(fields.client_id, 'Client id') : null,
        field(fields.priority, 'Priority'),
        field(fields.max_attempts, 'Max attempts'),
        field(fields.max_duration_secs, 'Max duration (seconds)'),
        field(fields.session_timeout_secs, 'Keep after the end (seconds)'),
        field(fields.run_at, 'Not before (local time)')),
      field(fields.metadata, 'Metadata (a JSON object)'),
      h('div', { class: 'grid' }, check(fields.token_tracking, 'Track usage'), check(fields.remove_after_export, 'Remove records once read'))),
    h('div', { class: 'actions' },
      h('button', { type: 'button', class: 'secondary', id: 'validate' }, 'Check config'),
      h('button', { type: 'submit', id: 'submit' }, 'Submit session')),
    out);
  main.append(heading('Submit a session'), form);

  file.addEventListener('change', async () => {
    const f = file.files && file.files[0];
    if (!f) return;
    try {
      config.value = await readFile(f);
      fill(errors, h('p', { class: 'help' }, 'Loaded ' + f.name + '. Check it or submit it.'));
    } catch (e) {
      fill(errors, message('error', 'cannot read ' + f.name + ': ' + e.message));
    }
  });

  form.querySelector('#validate').addEventListener('click', async () => {
    fill(out);
    const parsed = readParams();
    if (parsed.error) return showError(parsed.error, 'params');
    if (!config.value.trim()) return showConfigError('the config is empty: paste one or upload a file');
    try {
      await api.post('/v1/configs/validate', { config: configValue(config.value), params: parsed.params });
      config.removeAttribute('aria-invalid');
      fill(errors, message('ok', 'The config is valid.'));
    } catch (e) {
      if (e.status === 404 && e.code === 'not_found' && /no route/.test(e.message)) {
        fill(errors, h('p', { class: 'help' }, 'This server cannot check a config on its own: it is checked when you submit.'));
      } else if (e.status === 400) showError(e.message, e.code);
      else fill(errors, message('error', e.message));
    }
  });

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    fill(out);
    const parsed = readParams();
    if (parsed.error) return showError(parsed.error, 'params');
    if (!config.value.trim()) return showConfigError('the config is empty: paste one or upload a file');
    const body = { config: configValue(config.value), params: parsed.params, options: {} };
    const o = body.options;
    for (const k of ['priority', 'max_attempts', 'max_duration_secs', 'session_timeout_secs']) {
      if (fields[k].value !== '') o[k] = Number(fields[k].value);
    }
    if (fields.run_at.value) o.run_at = new Date(fields.run_at.value).toISOString();
    o.token_tracking = fields.token_tracking.checked;
    o.remove_after_export = fields.remove_after_export.checked;
    if (fields.session_id.value.trim()) body.session_id = fields.session_id.value.trim();
    const client = {};
    if (fields.client_id && fields.client_id.value.trim()) client.client_id = fields.client_id.value.trim();
    if (fields.metadata.value.trim()) {
      try {
        client.metadata = JSON.parse(fields.metadata.value);
        if (!client.metadata || typeof client.metadata !== 'object' || Array.isArray(client.metadata)) throw new Error('not an object');
      } catch (err) {
        fill(out, message('error', 'metadata: must be a JSON object, like {"team": "shop"} (' + err.message + ')'));
        fields.metadata.focus();
        return;
      }
    }
    if (Object.keys(client).length) body.client = client;
    const button = form.querySelector('#submit');
    button.disabled = true;
    try {
      const s = await api.post('/v1/sessions', body);
      location.hash = '#/sessions/' + encodeURIComponent(s.id);
    } catch (err) {
      button.disabled = false;
      if (err.status === 400) showError(err.message, err.code);
      else fill(out, message('error', err.message));
    }
  });

  function readParams() {
    const out = {};
    const lines = params.value.split('\n');
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i].trim();
      if (!line || line.startsWith('#')) continue;
      const eq = line.indexOf('=');
      if (eq < 1) return { error: 'params: line ' + (i + 1) + ' is not "name = value": ' + line };
      let v = line.slice(eq + 1).trim();
      if (v.length >= 2 && v.startsWith('"') && v.endsWith('"')) v = v.slice(1, -1);
      out[line.slice(0, eq).trim()] = v;
    }
    return { params: out };
  }

  function showError(text, code) {
    if (code === 'invalid_config') return showConfigError(text);
    fill(out, message('error', text));
    if (code === 'params' || /^params/.test(text)) params.focus();
    else if (/session id/.test(text)) fields.session_id.focus();
  }

  function showConfigError(text) {
    const where = locate(text, config.value);
    config.setAttribute('aria-invalid', 'true');
    fill(errors,
      h('p', { class: 'msg msg-error', role: 'alert' }, 'Error in the config' + (where.field ? ' at ' : ''),
        where.field ? h('code', { class: 'field-path' }, where.field) : null,
        where.line ? ' (line ' + where.line + ')' : ''),
      h('pre', { class: 'error-text' }, text),
      where.line ? h('button', { type: 'button', class: 'secondary', onclick: () => selectLine(config, where.line) }, 'Show line ' + where.line) : null);
  }
}

/** A TOML or JSON text as the API takes it: JSON as an object, TOML as a string. */
function configValue(text) {
  const t = text.trim();
  if (t.startsWith('{')) {
    try {
      return JSON.parse(t);
    } catch {
      // Let the server say what is wrong with it (it names the line).
    }
  }
  return text;
}

/** The field path and line an error message names, the line found in the text when only a field is. */
export function locate(message, text) {
  const out = { field: '', line: 0 };
  const at = /at line (\d+)/.exec(message) || /line (\d+), column/.exec(message);
  if (at) out.line = Number(at[1]);
  // "invalid config: pages.product.fields.price.regex: ..." names the field after the prefix
  // (older servers said "invalid config: config: ...").
  let rest = message;
  for (let m; (m = /^(invalid config: |config: )/.exec(rest));) rest = rest.slice(m[0].length);
  const f = /^([A-Za-z0-9_.[\]-]+): /.exec(rest);
  if (f && !/^invalid$/.test(f[1])) out.field = f[1];
  if (!out.line && out.field) out.line = lineOf(out.field, text);
  return out;
}

function lineOf(path, text) {
  const parts = path.replace(/\[\d+\]/g, '').split('.').filter(Boolean);
  const lines = text.split('\n');
  const last = parts[parts.length - 1];
  const isKey = (line, key) => new RegExp('^\\s*(["\']?)' + key.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + '\\1\\s*[=:]').test(line) ||
    line.includes('"' + key + '"') || new RegExp('(^|[\\s.{,])' + key.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + '\\s*=').test(line);
  // Prefer a match after the header of the longest table prefix of the path ([pages.product]).
  for (let n = parts.length - 1; n >= 1; n--) {
    const header = '[' + parts.slice(0, n).join('.') + ']';
    const start = lines.findIndex((l) => l.trim().startsWith(header) || l.trim().startsWith('[' + header));
    if (start >= 0) {
      for (let i = start; i < lines.length; i++) if (isKey(lines[i], last)) return i + 1;
      return start + 1;
    }
  }
  const i = lines.findIndex((l) => isKey(l, last));
  return i >= 0 ? i + 1 : 0;
}

/** Selects line `n` (1-based) of a textarea and scrolls it into view. */
function selectLine(area, n) {
  const lines = area.value.split('\n');
  let start = 0;
  for (let i = 0; i < n - 1 && i < lines.length; i++) start += lines[i].length + 1;
  const end = start + (lines[n - 1] || '').length;
  area.focus();
  area.setSelectionRange(start, end);
  const lh = parseFloat(getComputedStyle(area).lineHeight) || 18;
  area.scrollTop = Math.max(0, (n - 3) * lh);
}
