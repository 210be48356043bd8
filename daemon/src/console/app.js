// Outpost web console: a small single-page app over the management API (/api/v1). No framework,
// no build step, no external resources. Everything it shows comes from the API, and every value
// reaches the page as text (textContent), never as markup.
'use strict';

const state = { session: null, timers: [], stream: null };
const $ = (sel) => document.querySelector(sel);

// h('p', {class: 'x'}, 'text', child…): an element; attributes starting with "on" are listeners.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Replaces el's children with `children` (nested arrays flattened, null and false skipped).
function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
}

function toast(text) {
  const t = $('#toast');
  t.textContent = text;
  setTimeout(() => { if (t.textContent === text) t.textContent = ''; }, 4000);
}

// One API call. State-changing calls carry the session's CSRF token. A 401 means the session
// ended: back to the sign-in page.
async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET' && state.session && state.session.csrf) headers['X-CSRF-Token'] = state.session.csrf;
  const r = await fetch(path, {
    method, headers, credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (r.status === 401 && path !== '/api/v1/session') {
    state.session = null;
    showChrome();
    location.hash = '#/login';
  }
  if (!r.ok) {
    const message = (data && data.message) || r.statusText;
    const field = data && data.field ? ` (${data.field})` : '';
    throw Object.assign(new Error(message + field), { status: r.status, data });
  }
  return data;
}

const can = (scope) => {
  const order = { read: 1, write: 2, admin: 3 };
  return state.session && order[state.session.scope] >= order[scope];
};

function showChrome() {
  const signedIn = !!state.session;
  $('#nav').hidden = !signedIn;
  $('#signout').hidden = !signedIn;
  $('#who').textContent = signedIn ? `${state.session.name} (${state.session.scope})` : '';
}

function age(ms) {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function render(...nodes) {
  const main = $('#main');
  fill(main, nodes);
  main.focus();
}

function every(ms, f) {
  f();
  state.timers.push(setInterval(f, ms));
}

function leaveView() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  if (state.stream) { state.stream.close(); state.stream = null; }
}

// ---- sign in --------------------------------------------------------------------------------

function loginView() {
  const error = h('p', { class: 'error', role: 'alert' });
  const input = h('input', { id: 'token', type: 'password', autocomplete: 'off', required: true });
  const form = h('form', { class: 'stack', onsubmit: async (e) => {
    e.preventDefault();
    error.textContent = '';
    try {
      state.session = await api('POST', '/api/v1/session', { token: input.value });
      input.value = '';
      showChrome();
      location.hash = '#/overview';
    } catch (err) {
      error.textContent = err.status === 401 ? 'That token is not accepted.' : err.message;
    }
  } },
  h('div', {}, h('label', { for: 'token' }, 'API token'), input),
  h('button', { type: 'submit' }, 'Sign in'),
  error);
  render(h('h1', {}, 'Sign in'),
    h('p', {}, 'Sign in with a management API token (',
      h('code', {}, 'sudo outpost token create --name console --scopes admin'), ' on the gateway).'),
    form);
  input.focus();
}

// ---- overview -------------------------------------------------------------------------------

// A line chart of one or more series over the same samples; `label` is what a screen reader hears.
function chart(label, series) {
  const w = 600, hgt = 120, n = Math.max(...series.map((x) => x.values.length), 1);
  const max = Math.max(1, ...series.flatMap((x) => x.values));
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${hgt}`);
  svg.setAttribute('class', 'spark');
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', `${label}: ${series.map((x) => `${x.name} latest ${fmt(x.values[x.values.length - 1] || 0)}`).join(', ')}; top of the scale ${fmt(max)}`);
  for (const x of series) {
    const line = document.createElementNS(ns, 'polyline');
    line.setAttribute('points', x.values.map((v, i) => `${(i / Math.max(1, n - 1)) * w},${hgt - (v / max) * (hgt - 6) - 3}`).join(' '));
    line.setAttribute('fill', 'none');
    line.setAttribute('stroke', x.colour);
    line.setAttribute('stroke-width', '2');
    line.setAttribute('vector-effect', 'non-scaling-stroke');
    svg.append(line);
  }
  return h('figure', {}, svg, h('figcaption', {}, series.map((x) =>
    h('span', { class: 'legend', style: null }, h('span', { class: `swatch swatch-${x.key}`, 'aria-hidden': 'true' }), ` ${x.name} `)),
  `(top: ${fmt(max)})`));
}

const fmt = (v) => (Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(1));

function card(title, rows) {
  return h('section', { class: 'card', 'aria-label': title }, h('h2', {}, title),
    h('dl', {}, rows.map(([k, v, cls]) => [h('dt', {}, k), h('dd', { class: cls }, v)])));
}

function overviewView() {
  render(h('h1', {}, 'Overview'), h('p', {}, 'Loading…'));
  every(5000, async () => {
    let s, hist;
    try { [s, hist] = await Promise.all([api('GET', '/api/v1/status'), api('GET', '/api/v1/status/history')]); } catch (e) { toast(e.message); return; }
    const samples = hist.samples || [];
    const rate = (key) => samples.slice(1).map((x, i) => Math.max(0, (x[key] - samples[i][key]) / hist.interval_seconds));
    const k = s.kafka || {};
    const host = s.host || {};
    const alarms = s.alarms || [];
    const main = $('#main');
    const focus = document.activeElement === main;
    fill(main, 
      h('h1', {}, 'Overview'),
      h('div', { class: 'cards' },
        card('Gateway', [['Id', s.gateway_id], ['Version', `${s.version} (${s.build.arch})`],
          ['Up', `${Math.round(s.uptime_seconds / 60)} min`]]),
        card('Outbox', [['Records', s.outbox.records], ['Size', `${bytes(s.outbox.bytes)} of ${bytes(s.outbox.max_bytes)}`],
          ['Oldest', age(s.outbox.oldest_received_ms)], ['Dead letters', s.outbox.dead_letters],
          ['Disk', s.outbox.disk_full ? 'full' : 'ok', s.outbox.disk_full ? 'alarm' : '']]),
        card('Kafka', k.state ? [['State', k.state, `state-${k.state}`], ['Delivered', k.delivered ?? '–'],
          ['Backlog', k.backlog_records ?? '–'], ['Last error', k.last_error || 'none']] : [['State', 'forwarding off (kafka.enabled = false)']]),
        card('Host', [['Memory (resident)', bytes(host.rss_bytes)],
          ['Disk free', host.disk_total_bytes ? `${bytes(host.disk_free_bytes)} of ${bytes(host.disk_total_bytes)}` : '–']])),
      h('h2', {}, 'The last hour'),
      samples.length < 2 ? h('p', {}, 'Collecting: a sample every 10 s.') : [
        chart('Records per second', [
          { key: 'in', name: 'ingested/s', colour: '#0b5cad', values: rate('appended') },
          { key: 'out', name: 'forwarded/s', colour: '#116329', values: rate('forwarded') }]),
        chart('Outbox backlog', [{ key: 'backlog', name: 'records waiting', colour: '#a40e26', values: samples.map((x) => x.backlog) }])],
      h('h2', {}, 'Alarms'),
      alarms.length ? h('ul', {}, alarms.map((a) => h('li', { class: 'alarm' }, `${a.subsystem}: ${a.message}`)))
        : h('p', {}, 'No alarms.'),
      h('h2', {}, 'Subsystems'),
      h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Name'), h('th', { scope: 'col' }, 'State'),
          h('th', { scope: 'col' }, 'Reason'), h('th', { scope: 'col' }, 'Restarts'))),
        h('tbody', {}, (s.subsystems || []).map((x) => h('tr', {},
          h('td', {}, x.name), h('td', { class: `state-${x.state}` }, x.state),
          h('td', {}, x.reason || ''), h('td', {}, x.restarts)))))));
    if (focus) main.focus();
  });
}

// ---- devices --------------------------------------------------------------------------------

function examples(id, secret) {
  const host = location.hostname;
  return [
    ['MQTT', `mosquitto_pub -h ${host} -p 1883 -u ${id} -P ${secret} -q 1 -t devices/${id}/temp -m '{"t":21.5}'`],
    ['HTTP', `curl -u ${id}:${secret} -H 'Content-Type: application/json' -d '{"t":21.5}' http://${location.host}/api/v1/ingest/devices/${id}/temp`],
    // CoAP is plain (no secret): accepted only from coap.plain_networks (docs/COAP.md).
    ['CoAP', `coap-client -m post -t 50 -e '{"t":21.5}' 'coap://${host}/t/devices/${id}/temp?d=${id}'`],
  ];
}

function copyButton(text, label) {
  return h('button', { type: 'button', class: 'secondary', onclick: async () => {
    try { await navigator.clipboard.writeText(text); toast('Copied.'); } catch (_) { toast('Copy failed: select the text instead.'); }
  } }, label);
}

function secretPanel(id, secret) {
  return h('div', { class: 'secret', id: 'secret-panel' },
    h('p', {}, h('strong', {}, `Secret of ${id}`), ' — shown this once; the gateway keeps only a hash.'),
    h('pre', {}, h('code', { id: 'secret' }, secret)), copyButton(secret, 'Copy secret'),
    examples(id, secret).map(([name, cmd]) => [h('h2', {}, name), h('pre', {}, h('code', {}, cmd)), copyButton(cmd, `Copy ${name} example`)]));
}

function addDeviceForm(onAdded) {
  const error = h('p', { class: 'error', role: 'alert' });
  const field = (id, label, attrs) => h('div', {}, h('label', { for: id }, label), h('input', { id, type: 'text', ...attrs }));
  const form = h('form', { class: 'stack', 'aria-label': 'Add a device', onsubmit: async (e) => {
    e.preventDefault();
    error.textContent = '';
    const v = (id) => form.querySelector(`#${id}`).value.trim();
    const body = { id: v('new-id') };
    if (v('new-name')) body.name = v('new-name');
    if (v('new-location')) body.location = v('new-location');
    if (v('new-tags')) body.tags = v('new-tags').split(',').map((t) => t.trim()).filter(Boolean);
    const protocols = [...form.querySelectorAll('input[name=protocol]:checked')].map((c) => c.value);
    if (protocols.length < 3) body.protocols = protocols;
    try {
      const d = await api('POST', '/api/v1/devices', body);
      onAdded(d);
    } catch (err) { error.textContent = err.message; }
  } },
  field('new-id', 'Device id', { required: true, pattern: '[A-Za-z0-9._:\\-]{1,128}', autocomplete: 'off' }),
  field('new-name', 'Name'), field('new-location', 'Location'),
  field('new-tags', 'Tags (comma-separated)'),
  h('fieldset', {}, h('legend', {}, 'Protocols'), ['mqtt', 'http', 'coap'].map((p) =>
    h('span', {}, h('input', { type: 'checkbox', name: 'protocol', value: p, id: `proto-${p}`, checked: true }), ' ',
      h('label', { for: `proto-${p}`, style: null }, p.toUpperCase()), ' '))),
  h('button', { type: 'submit' }, 'Add device'), error);
  return form;
}

function devicesView() {
  const search = h('input', { id: 'search', type: 'search', placeholder: 'id, name, tag, location' });
  const stateSel = h('select', { id: 'state' }, ['', 'online', 'offline', 'disabled'].map((s) => h('option', { value: s }, s || 'any')));
  const body = h('tbody');
  const count = h('p', { 'aria-live': 'polite' });
  let all = [];
  const draw = () => {
    const q = search.value.trim().toLowerCase();
    const rows = all.filter((d) => (!stateSel.value || d.state === stateSel.value) &&
      (!q || [d.id, d.name, d.location, ...(d.tags || [])].some((x) => x && x.toLowerCase().includes(q))));
    count.textContent = `${rows.length} of ${all.length} devices`;
    fill(body, ...rows.map((d) => h('tr', {},
      h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id)),
      h('td', {}, d.name || ''), h('td', { class: `state-${d.state}` }, d.state),
      h('td', {}, age(d.last_seen_ms)), h('td', {}, (d.protocols || []).join(', ')),
      h('td', {}, (d.tags || []).join(', ')))));
  };
  search.addEventListener('input', draw);
  stateSel.addEventListener('change', draw);
  const load = async () => {
    try {
      all = [];
      let cursor = null;
      do {
        const page = await api('GET', `/api/v1/devices?limit=500${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);
        all.push(...page.devices);
        cursor = page.next_cursor;
      } while (cursor);
      draw();
    } catch (e) { toast(e.message); }
  };
  const adding = h('div');
  const addButton = can('write') ? h('button', { type: 'button', id: 'add-device', onclick: () => {
    fill(adding, h('h2', {}, 'Add a device'), addDeviceForm((d) => {
      const id = d.device.id;
      fill(adding, secretPanel(id, d.secret),
        h('p', {}, h('a', { href: `#/devices/${encodeURIComponent(id)}`, id: 'open-new' }, `Open ${id}`)));
      load();
    }));
    adding.querySelector('#new-id').focus();
  } }, 'Add device') : null;
  render(h('h1', {}, 'Devices'),
    h('div', { class: 'toolbar' },
      h('div', {}, h('label', { for: 'search' }, 'Search'), search),
      h('div', {}, h('label', { for: 'state' }, 'State'), stateSel), addButton),
    adding, count,
    h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, ['Id', 'Name', 'State', 'Last seen', 'Protocols', 'Tags'].map((c) => h('th', { scope: 'col' }, c)))),
      body)));
  every(10000, load);
}

function deviceView(id) {
  const path = `/api/v1/devices/${encodeURIComponent(id)}`;
  const info = h('div', { class: 'cards' });
  const actions = h('div', { class: 'toolbar' });
  const extra = h('div');
  const editing = h('div');
  const commands = h('tbody');
  const readings = h('ol', { class: 'readings', id: 'readings', 'aria-live': 'polite', 'aria-label': 'Live readings' });
  const streamState = h('span', { id: 'stream-state', 'data-state': 'connecting' }, 'connecting…');
  let received = 0;
  let refreshPending = false;
  const counter = h('span', { id: 'reading-count' }, '0');
  const loadDevice = async () => {
    let d, st;
    try { [d, st] = await Promise.all([api('GET', path), api('GET', `${path}/status`)]); } catch (e) {
      if (e.status === 404) render(h('h1', {}, id), h('p', { class: 'error' }, 'No such device.'));
      else toast(e.message);
      return;
    }
    fill(info, 
      card('Device', [['Name', d.name || '–'], ['Model', d.model || '–'], ['Location', d.location || '–'],
        ['Tags', (d.tags || []).join(', ') || '–'], ['Protocols', (d.protocols || []).join(', ')], ['Source', d.source || '–']]),
      card('Traffic', [['State', st.state, `state-${st.state}`], ['Last seen', age(st.last_seen_ms)],
        ['Messages', st.messages], ['Bytes', bytes(st.bytes)],
        ['Errors', Object.entries(st.errors || {}).map(([k, v]) => `${k} ${v}`).join(', ') || 'none']]));
    const buttons = [];
    if (can('write')) {
      buttons.push(h('button', { type: 'button', id: d.enabled ? 'disable' : 'enable', class: d.enabled ? 'danger' : '',
        onclick: async () => {
          try { await api('POST', `${path}/${d.enabled ? 'disable' : 'enable'}`); toast(`${id} ${d.enabled ? 'disabled' : 'enabled'}.`); loadDevice(); } catch (e) { toast(e.message); }
        } }, d.enabled ? 'Disable' : 'Enable'));
    }
    if (can('admin')) {
      buttons.push(h('button', { type: 'button', class: 'secondary', id: 'rotate', onclick: async () => {
        if (!confirm(`Give ${id} a new secret? The old one stops working at once.`)) return;
        try { const r = await api('POST', `${path}/rotate-secret`); fill(extra, secretPanel(id, r.secret)); } catch (e) { toast(e.message); }
      } }, 'Rotate secret'));
    }
    fill(actions, ...buttons);
    if (can('write') && !editing.dataset.ready) {
      editing.dataset.ready = '1';
      const error = h('p', { class: 'error', role: 'alert' });
      const field = (key, label, value) => h('div', {}, h('label', { for: `edit-${key}` }, label),
        h('input', { id: `edit-${key}`, type: 'text', value: value || '' }));
      const form = h('form', { class: 'stack', 'aria-label': 'Edit the device', onsubmit: async (e) => {
        e.preventDefault();
        error.textContent = '';
        const v = (key) => form.querySelector(`#edit-${key}`).value.trim();
        const changes = { tags: v('tags') ? v('tags').split(',').map((t) => t.trim()).filter(Boolean) : [] };
        for (const key of ['name', 'model', 'location']) if (v(key)) changes[key] = v(key);
        try { await api('PATCH', path, changes); toast('Saved.'); loadDevice(); } catch (err) { error.textContent = err.message; }
      } },
      field('name', 'Name', d.name), field('model', 'Model', d.model), field('location', 'Location', d.location),
      field('tags', 'Tags (comma-separated)', (d.tags || []).join(', ')),
      h('button', { type: 'submit' }, 'Save'), error);
      fill(editing, h('details', {}, h('summary', {}, 'Edit'), form));
    }
  };
  const loadCommands = async () => {
    try {
      const list = await api('GET', `${path}/commands`);
      fill(commands, ...(list.commands || []).map((c) => h('tr', {},
        h('td', {}, c.id), h('td', {}, h('code', {}, JSON.stringify(c.payload))), h('td', {}, c.state), h('td', {}, age(c.created_at_ms)))));
    } catch (e) { /* shown by the device part */ }
  };
  let commandForm = null;
  if (can('write')) {
    const error = h('p', { class: 'error', role: 'alert' });
    const payload = h('textarea', { id: 'command-payload', rows: 3 }, '{"action": "ping"}');
    const ttl = h('input', { id: 'command-ttl', type: 'text', value: '10m' });
    commandForm = h('form', { class: 'stack', 'aria-label': 'Send a command', onsubmit: async (e) => {
      e.preventDefault();
      error.textContent = '';
      let value;
      try { value = JSON.parse(payload.value); } catch (_) { error.textContent = 'The payload must be JSON.'; return; }
      try { await api('POST', `${path}/commands`, { payload: value, ttl: ttl.value }); toast('Command queued.'); loadCommands(); } catch (err) { error.textContent = err.message; }
    } },
    h('div', {}, h('label', { for: 'command-payload' }, 'Payload (JSON)'), payload),
    h('div', {}, h('label', { for: 'command-ttl' }, 'Expires after'), ttl),
    h('button', { type: 'submit' }, 'Send command'), error);
  }
  render(h('p', {}, h('a', { href: '#/devices' }, '← Devices')), h('h1', {}, id), info, actions, extra, editing,
    h('h2', {}, 'Live readings ', h('small', {}, '(', streamState, ', ', counter, ' received)')), readings,
    h('h2', {}, 'Commands'), commandForm,
    h('div', { class: 'table-wrap' }, h('table', {}, h('thead', {}, h('tr', {},
      ['Id', 'Payload', 'State', 'Created'].map((c) => h('th', { scope: 'col' }, c)))), commands)));
  const es = new EventSource(`${path}/readings`);
  state.stream = es;
  es.onopen = () => { streamState.textContent = 'live'; streamState.dataset.state = 'open'; };
  es.onerror = () => { streamState.textContent = 'reconnecting…'; streamState.dataset.state = 'error'; };
  es.addEventListener('reading', (ev) => {
    const r = JSON.parse(ev.data);
    received += 1;
    counter.textContent = String(received);
    readings.prepend(h('li', {}, h('span', { class: 'meta' }, `${new Date(r.received_at_ms).toLocaleTimeString()} ${r.source} ${r.topic}`),
      h('code', {}, r.payload !== undefined ? r.payload : `base64:${r.payload_base64}`)));
    while (readings.children.length > 100) readings.lastChild.remove();
    // The traffic figures follow the readings, at most once a second.
    if (!refreshPending) { refreshPending = true; setTimeout(() => { refreshPending = false; loadDevice(); }, 1000); }
  });
  es.addEventListener('lagged', (ev) => toast(`Missed ${JSON.parse(ev.data).missed} readings (too many to show).`));
  every(10000, loadDevice);
  every(10000, loadCommands);
}

// ---- drivers, apps, configuration ----------------------------------------------------------

function table(columns, rows) {
  return h('div', { class: 'table-wrap' }, h('table', {},
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, rows)));
}

function driversView() {
  const permit = can('write') ? h('form', { class: 'stack', 'aria-label': 'Zigbee permit join', onsubmit: async (e) => {
    e.preventDefault();
    const seconds = Number(permit.querySelector('#permit-seconds').value);
    try { const r = await api('POST', '/api/v1/zigbee/permit-join', { duration: seconds }); toast(`Zigbee devices may join for ${r.duration}.`); } catch (err) { toast(err.message); }
  } }, h('div', {}, h('label', { for: 'permit-seconds' }, 'Zigbee: let new devices join for (seconds)'),
    h('input', { id: 'permit-seconds', type: 'text', inputmode: 'numeric', value: '60' })),
  h('button', { type: 'submit' }, 'Permit join')) : null;
  const body = h('div');
  render(h('h1', {}, 'Drivers'), body);
  every(5000, async () => {
    let s;
    try { s = await api('GET', '/api/v1/status'); } catch (e) { toast(e.message); return; }
    const drivers = s.drivers || [];
    fill(body, 
      drivers.length ? table(['Driver', 'Kind', 'Port', 'Frames ok', 'Bad', 'Dropped', 'Reopens', 'Last error', 'Details'],
        drivers.map((d) => h('tr', {}, h('td', {}, d.name), h('td', {}, d.kind),
          h('td', { class: d.up ? 'state-ACTIVE' : 'state-down' }, d.up ? 'up' : 'down'),
          h('td', {}, d.frames_ok), h('td', {}, d.frames_bad), h('td', {}, d.frames_dropped), h('td', {}, d.reopens),
          h('td', {}, d.last_error || ''), h('td', {}, Object.entries(d.details || {}).map(([k, v]) => `${k}: ${v}`).join(', ')))))
        : h('p', {}, 'No drivers configured ([[drivers]] in the configuration).'),
      drivers.some((d) => d.kind === 'zigbee') ? permit : null);
  });
}

function appsView() {
  const body = h('div');
  const detail = h('div');
  render(h('h1', {}, 'Apps'), body, detail);
  const show = async (name) => {
    try {
      const [ev, logs] = await Promise.all([api('GET', `/api/v1/apps/${encodeURIComponent(name)}/events`),
        fetch(`/api/v1/apps/${encodeURIComponent(name)}/logs?tail=50`, { credentials: 'same-origin' }).then((r) => r.text())]);
      fill(detail, h('h2', {}, `${name}: events`),
        h('ul', {}, (ev.events || []).slice(-20).map((x) => h('li', {}, typeof x === 'string' ? x : JSON.stringify(x)))),
        h('h2', {}, `${name}: last 50 lines of output`), h('pre', {}, logs));
    } catch (e) { toast(e.message); }
  };
  every(5000, async () => {
    let list;
    try { list = await api('GET', '/api/v1/apps'); } catch (e) {
      fill(body, h('p', {}, e.status === 409 ? 'The apps subsystem is off (apps.enabled = false).' : e.message));
      return;
    }
    fill(body, 
      list.engine_problem ? h('p', { class: 'error' }, `Container engine: ${list.engine_problem}`) : null,
      list.items.length ? table(['App', 'Image', 'State', 'Restarts', 'Last exit', 'Reason', ''],
        list.items.map((a) => h('tr', {}, h('td', {}, a.name), h('td', {}, a.spec.image),
          h('td', { class: `state-${a.status.state}` }, a.status.state), h('td', {}, a.status.restart_count),
          h('td', {}, a.status.last_exit_code ?? ''), h('td', {}, a.status.reason || ''),
          h('td', {}, h('button', { type: 'button', class: 'secondary', onclick: () => show(a.name) }, 'Events and logs'),
            can('write') ? [' ', h('button', { type: 'button', onclick: async () => {
              try { await api('POST', `/api/v1/apps/${encodeURIComponent(a.name)}/restart`); toast(`${a.name} restarting.`); } catch (e) { toast(e.message); }
            } }, 'Restart')] : null))))
        : h('p', {}, 'No apps.'));
  });
}

function configView() {
  const body = h('div');
  render(h('h1', {}, 'Configuration'), body);
  const load = async () => {
    let check = null, s;
    try {
      s = await api('GET', '/api/v1/status');
      if (can('admin')) check = await api('GET', '/api/v1/config/check');
    } catch (e) { toast(e.message); return; }
    const reload = s.config || {};
    const list = (items) => h('ul', {}, items.map((p) => h('li', {}, h('code', {}, p.path), `: ${p.message}`)));
    fill(body, 
      h('p', {}, 'File: ', h('code', {}, reload.file || 'none (built-in defaults)')),
      check ? [h('h2', {}, 'The file now'), check.ok ? h('p', { class: 'state-ACTIVE', id: 'config-ok' }, 'Loads without problems.')
        : [h('p', { class: 'error', id: 'config-bad' }, 'Does not load; a reload would change nothing:'), check.problems.length ? list(check.problems) : h('pre', {}, check.error)],
      check.warnings.length ? [h('h2', {}, 'Warnings'), list(check.warnings)] : null]
        : h('p', {}, 'Checking the file needs the admin scope.'),
      h('h2', {}, 'Last reload'),
      h('p', {}, reload.reloads ? `${reload.reloads} reload(s), the last ${age(reload.last_reload_ms)}.` : 'No reload since start (systemctl reload outpost).'),
      reload.error ? h('p', { class: 'error' }, reload.error) : null,
      (reload.needs_restart || []).length ? [h('p', {}, 'Changed in the file, applied at the next restart:'),
        h('ul', {}, reload.needs_restart.map((k) => h('li', {}, h('code', {}, k))))] : null,
      h('p', {}, h('button', { type: 'button', class: 'secondary', onclick: load }, 'Check again')));
  };
  load();
}

// ---- routing --------------------------------------------------------------------------------

async function route() {
  leaveView();
  const hash = location.hash || '#/overview';
  if (!state.session && hash !== '#/login') {
    try { state.session = await api('GET', '/api/v1/session'); } catch (_) { state.session = null; }
    showChrome();
    if (!state.session) { location.hash = '#/login'; return; }
  }
  for (const a of document.querySelectorAll('#nav a')) {
    if (hash.startsWith(a.getAttribute('href'))) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const device = hash.match(/^#\/devices\/(.+)$/);
  if (hash === '#/login') loginView();
  else if (device) deviceView(decodeURIComponent(device[1]));
  else if (hash === '#/devices') devicesView();
  else if (hash === '#/drivers') driversView();
  else if (hash === '#/apps') appsView();
  else if (hash === '#/config') configView();
  else overviewView();
}

$('#signout').addEventListener('click', async () => {
  try { await api('DELETE', '/api/v1/session'); } catch (_) { /* signed out anyway */ }
  state.session = null;
  showChrome();
  location.hash = '#/login';
});
window.addEventListener('hashchange', route);
route();
