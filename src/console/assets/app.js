// The console's entry: hash routes (#/sessions/ID), the token page when the server asks for one,
// and the header. Each page module exports render(main, params, query) and returns a function that
// stops what it started (event streams, timers) when the user leaves the page.

import * as api from './api.js';
import { h, fill } from './dom.js';
import * as login from './login.js';
import * as overview from './overview.js';
import * as sessions from './sessions.js';
import * as session from './session.js';
import * as submit from './submit.js';
import * as agents from './agents.js';

const routes = [
  [/^\/?$/, overview, 'overview', 'Overview'],
  [/^\/sessions$/, sessions, 'sessions', 'Sessions'],
  [/^\/sessions\/([^/]+)$/, session, 'sessions', 'Session'],
  [/^\/submit$/, submit, 'submit', 'Submit'],
  [/^\/agents$/, agents, 'agents', 'Agents'],
  [/^\/login$/, login, '', 'Token'],
];

let leave = null;
// Whether the server wants a token (it has [[clients]]); learnt from its first answer.
let needsToken = false;

function header() {
  const who = document.getElementById('who');
  if (!needsToken) {
    fill(who);
    return;
  }
  if (api.token()) {
    fill(who, h('span', { class: 'muted' }, 'Token set'), ' ',
      h('button', { type: 'button', class: 'link', id: 'sign-out', onclick: signOut }, 'Sign out'));
  } else {
    fill(who, h('a', { href: '#/login' }, 'Enter token'));
  }
}

function signOut() {
  api.setToken('');
  location.hash = '#/login';
}

function parse() {
  const raw = location.hash.startsWith('#') ? location.hash.slice(1) : '';
  const [path, qs] = raw.split('?');
  return { path: path || '/', query: new URLSearchParams(qs || '') };
}

function route(event) {
  const moved = !!event;
  const hash = location.hash;
  // In-page anchors (the skip link's #main) are not routes.
  if (hash && !hash.startsWith('#/')) return;
  const { path, query } = parse();
  const main = document.getElementById('main');
  if (leave) {
    leave();
    leave = null;
  }
  if (needsToken && !api.token() && path !== '/login') {
    sessionStorage.setItem('harvest.after', location.hash);
    location.replace('#/login');
    return;
  }
  const found = routes.find(([re]) => re.test(path));
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (found && a.dataset.nav === found[2]) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  header();
  fill(main);
  if (!found) {
    document.title = 'Not found · harvest';
    fill(main, h('h1', {}, 'Not found'), h('p', {}, 'No page here. ', h('a', { href: '#/' }, 'Go to the overview')));
    return;
  }
  const [re, page, , title] = found;
  document.title = title + ' · harvest';
  const params = path.match(re).slice(1).map(decodeURIComponent);
  leave = page.render(main, params, query, { needsToken, signedIn: signedIn }) || null;
  // Keyboard and screen-reader users land on the new page's heading.
  if (moved) main.querySelector('h1')?.focus();
}

function signedIn() {
  needsToken = true;
  const after = sessionStorage.getItem('harvest.after');
  sessionStorage.removeItem('harvest.after');
  location.hash = after && after !== '#/login' ? after : '#/';
  header();
}

async function start() {
  api.onUnauthorized(() => {
    needsToken = true;
    if (location.hash !== '#/login') {
      api.setToken('');
      sessionStorage.setItem('harvest.after', location.hash);
      location.hash = '#/login';
    }
  });
  // One small call without a token tells whether this server has clients (then it answers 401).
  try {
    const resp = await fetch('/v1/agents', { cache: 'no-store' });
    needsToken = resp.status === 401;
  } catch {
    needsToken = !!api.token();
  }
  document.getElementById('loading')?.remove();
  window.addEventListener('hashchange', route);
  route();
}

start();
