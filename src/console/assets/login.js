// The token page: with [[clients]] configured, every API call needs one client's bearer token.
// It is kept in this tab's session storage only.

import * as api from './api.js';
import { h, heading, message } from './dom.js';

export function render(main, _params, _query, ctx) {
  const input = h('input', {
    id: 'token', type: 'password', name: 'token', autocomplete: 'off', required: true,
    'aria-describedby': 'token-help',
  });
  const out = h('div', { 'aria-live': 'polite' });
  const form = h('form', { class: 'card narrow', novalidate: true },
    h('label', { for: 'token' }, 'Bearer token'),
    input,
    h('p', { id: 'token-help', class: 'help' },
      'This server has clients configured: enter the token of yours (a [[clients]] entry of its config.toml). ' +
      'It stays in this browser tab only and is sent as the API\'s Authorization header.'),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Sign in')),
    out);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const value = input.value.trim();
    out.replaceChildren();
    if (!value) {
      out.append(message('error', 'enter a token'));
      input.focus();
      return;
    }
    api.setToken(value);
    try {
      await api.get('/v1/agents');
      ctx.signedIn();
    } catch (err) {
      api.setToken('');
      out.append(message('error', err.status === 401 ? 'this token is not one of the server\'s clients' : err.message));
      input.focus();
    }
  });
  main.append(heading('Sign in'), form);
  input.focus();
  return null;
}
