// The kubechat web client: plain JavaScript against docs/protocol.md, served
// by the gateway itself (no build step). One tab is one device: the session
// lives in sessionStorage, the sync cursor in localStorage per user and device.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_PAGE = 50;
const TYPING_REPEAT_MS = 3000;
const MARK_DELAY_MS = 300;

const state = {
  user: null,
  device: null,
  token: null,
  ws: null,
  connected: false,
  attempt: 0,
  reconnectTimer: null,
  heartbeatTimer: null,
  nextReq: 1,
  waiting: new Map(), // req -> {resolve, reject}
  channels: new Map(), // channel -> {channel, name, last, unread, unreadCapped, delivered, read, peerMarkers, members}
  messages: new Map(), // channel -> Map(id -> message)
  hasOlder: new Map(), // channel -> bool
  pending: new Map(), // key -> {channel, text, to, el}
  open: null,
  presence: new Map(), // user -> online
  typingTimers: new Map(), // channel -> {user -> timeout}
  lastTypingSent: 0,
  markTimers: new Map(),
  syncing: false,
  resyncAgain: false,
};

// ---- helpers ----------------------------------------------------------------

function peerOf(channel) {
  if (!channel.startsWith("dm:")) return null;
  const [, a, b] = channel.split(":");
  return a === state.user ? b : a;
}

function directChannel(a, b) {
  return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

function titleOf(channel) {
  const entry = state.channels.get(channel);
  return (entry && entry.name) || peerOf(channel) || channel;
}

function cursorKey() {
  return `kubechat.cursor.${state.user}.${state.device}`;
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(text) {
  $("error").textContent = text;
}

function cmpId(a, b) {
  // Ids are decimal strings of 64-bit integers: compare by length, then text.
  return a.length - b.length || (a < b ? -1 : a > b ? 1 : 0);
}

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---- sign in ------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  $("sign-in-error").textContent = "";
  const user = $("user").value.trim();
  const device = $("device").value.trim();
  let token = $("token").value.trim();
  if (!token) {
    try {
      const reply = await fetch(`/dev/token?user=${encodeURIComponent(user)}&device=${encodeURIComponent(device)}`);
      if (reply.status === 404) {
        $("token-field").hidden = false;
        $("sign-in-error").textContent = "This gateway mints no tokens: paste one.";
        return;
      }
      const body = await reply.text();
      if (!reply.ok) {
        let message = body;
        try { message = JSON.parse(body).message; } catch (_) { /* plain text */ }
        $("sign-in-error").textContent = message;
        return;
      }
      token = body.trim();
    } catch (e) {
      $("sign-in-error").textContent = `Could not reach the gateway: ${e}`;
      return;
    }
  }
  sessionStorage.setItem("kubechat.session", JSON.stringify({ user, device, token }));
  start({ user, device, token });
}

function start(session) {
  Object.assign(state, session);
  $("sign-in-view").hidden = true;
  $("chat-view").hidden = false;
  $("sign-out").hidden = false;
  connect();
}

function signOut() {
  request({ type: "logout" }).catch(() => {});
  sessionStorage.removeItem("kubechat.session");
  setTimeout(() => location.reload(), 100);
}

// ---- connection ---------------------------------------------------------------

function socketUrl(base) {
  const url = base ? new URL(base) : new URL("/v1/ws", location.href);
  if (!base) url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", state.token);
  return url.toString();
}

function connect(url) {
  clearTimeout(state.reconnectTimer);
  setStatus("connecting…");
  const ws = new WebSocket(socketUrl(url));
  state.ws = ws;
  let movedOn = false;
  ws.onmessage = (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch (_) { return; }
    if (frame.type === "reconnect") {
      movedOn = true;
      const delay = Math.random() * (frame.within_ms || 0);
      setStatus("moving to another gateway…");
      ws.onclose = null;
      ws.close();
      disconnected();
      state.reconnectTimer = setTimeout(() => connect(frame.url || undefined), delay);
      return;
    }
    handle(frame);
  };
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    disconnected();
    if (event.code === 4001) { // logged out
      sessionStorage.removeItem("kubechat.session");
      setStatus("logged out");
      return;
    }
    if (!movedOn) scheduleReconnect(event.code);
  };
}

function disconnected() {
  state.connected = false;
  clearInterval(state.heartbeatTimer);
  for (const { reject } of state.waiting.values()) reject(new Error("connection lost"));
  state.waiting.clear();
}

function scheduleReconnect(code) {
  // 0.5 s doubling to 30 s, each randomised ±50% (docs/protocol.md).
  const base = Math.min(30000, 500 * 2 ** state.attempt);
  const delay = base * (0.5 + Math.random());
  state.attempt += 1;
  setStatus(`disconnected (${code}); reconnecting in ${(delay / 1000).toFixed(1)} s`);
  state.reconnectTimer = setTimeout(() => connect(), delay);
}

function send(frame) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(frame));
}

function request(frame) {
  const req = String(state.nextReq++);
  return new Promise((resolve, reject) => {
    if (!state.connected) return reject(new Error("not connected"));
    state.waiting.set(req, { resolve, reject });
    send({ ...frame, req });
  });
}

async function connected(hello) {
  state.connected = true;
  state.attempt = 0;
  setStatus(`connected as ${hello.user} (${hello.device})`);
  clearInterval(state.heartbeatTimer);
  state.heartbeatTimer = setInterval(() => send({ type: "heartbeat" }), hello.heartbeat_seconds * 1000);
  try {
    await loadOverview();
    await sync();
    if (state.open) await openChannel(state.open, { reload: true });
    await retryPending();
  } catch (e) {
    showError(`${e.message || e}`);
  }
}

// ---- frames from the server ----------------------------------------------------

function handle(frame) {
  if (frame.req && state.waiting.has(frame.req)) {
    const { resolve, reject } = state.waiting.get(frame.req);
    state.waiting.delete(frame.req);
    if (frame.type === "error") {
      const error = new Error(`${frame.code}: ${frame.message}`);
      error.code = frame.code;
      reject(error);
    } else {
      resolve(frame);
    }
    return;
  }
  switch (frame.type) {
    case "hello": connected(frame); break;
    case "message": received(frame.message, true); break;
    case "resync": sync().catch((e) => showError(`${e.message}`)); break;
    case "receipt": receipt(frame); break;
    case "typing": typing(frame); break;
    case "presence_changed": state.presence.set(frame.user, frame.online); renderChannels(); renderHeader(); break;
    case "error": showError(`${frame.code}: ${frame.message}`); break;
    default: break; // new frame types may be added: ignored
  }
}

function entryOf(channel) {
  if (!state.channels.has(channel)) {
    state.channels.set(channel, {
      channel, name: null, last: null, unread: 0, unreadCapped: false, delivered: "0", read: "0",
      peerMarkers: new Map(),
    });
  }
  return state.channels.get(channel);
}

// A message arrived (live or by sync): remembered once by id.
function received(message, live) {
  const channel = message.channel;
  if (!state.messages.has(channel)) state.messages.set(channel, new Map());
  const known = state.messages.get(channel);
  if (known.has(message.id)) return;
  known.set(message.id, message);
  const entry = entryOf(channel);
  if (!entry.name && channel.startsWith("g:")) refreshName(channel);
  const newer = !entry.last || cmpId(message.id, entry.last.id) > 0;
  if (newer) entry.last = message;
  const fromOthers = message.from !== state.user;
  // Older than the newest known: the overview counted it already.
  if (fromOthers && newer && cmpId(message.id, entry.read) > 0) {
    if (isVisible(channel)) {
      scheduleMark(channel, "read", message.id);
    } else {
      entry.unread += 1;
      if (cmpId(message.id, entry.delivered) > 0) scheduleMark(channel, "delivered", message.id);
    }
  }
  const ownRetry = [...state.pending.values()].find((p) => p.channel === channel && p.id === message.id);
  if (ownRetry) ownRetry.el.remove();
  if (state.open === channel) renderMessage(message, { live });
  renderChannels();
  const typists = state.typingTimers.get(channel);
  if (typists && typists.has(message.from)) { clearTimeout(typists.get(message.from)); typists.delete(message.from); renderHeader(); }
}

function receipt(frame) {
  const entry = entryOf(frame.channel);
  if (frame.user === state.user) {
    entry.delivered = maxId(entry.delivered, frame.delivered_up_to);
    if (cmpId(frame.read_up_to, entry.read) > 0) {
      entry.read = frame.read_up_to;
      entry.unread = countUnread(frame.channel);
    }
  } else {
    entry.peerMarkers.set(frame.user, { delivered: frame.delivered_up_to, read: frame.read_up_to });
    if (state.open === frame.channel) renderReceipts();
  }
  renderChannels();
}

function maxId(a, b) {
  return cmpId(a, b) >= 0 ? a : b;
}

// Unread after a read marker moved elsewhere: what this device has of the
// channel (the overview's count is the server's; this only ever lowers it).
function countUnread(channel) {
  const entry = entryOf(channel);
  const known = state.messages.get(channel);
  if (!known) return entry.last && cmpId(entry.last.id, entry.read) > 0 ? entry.unread : 0;
  let n = 0;
  for (const m of known.values()) if (m.from !== state.user && cmpId(m.id, entry.read) > 0) n += 1;
  return Math.min(n, entry.unread);
}

function typing(frame) {
  if (!state.typingTimers.has(frame.channel)) state.typingTimers.set(frame.channel, new Map());
  const typists = state.typingTimers.get(frame.channel);
  clearTimeout(typists.get(frame.user));
  if (frame.typing) {
    typists.set(frame.user, setTimeout(() => { typists.delete(frame.user); renderHeader(); }, frame.expires_ms));
  } else {
    typists.delete(frame.user);
  }
  renderHeader();
}

// ---- requests -----------------------------------------------------------------

async function loadOverview() {
  const overview = await request({ type: "overview" });
  for (const row of overview.channels) {
    const entry = entryOf(row.channel);
    Object.assign(entry, {
      name: row.name, last: row.last, unread: row.unread, unreadCapped: row.unread_capped,
      delivered: row.delivered_up_to, read: row.read_up_to,
    });
    if (row.last && row.last.from !== state.user && cmpId(row.last.id, row.delivered_up_to) > 0) {
      scheduleMark(row.channel, "delivered", row.last.id);
    }
  }
  renderChannels();
  const peers = [...state.channels.keys()].map(peerOf).filter(Boolean);
  if (peers.length) {
    const presence = await request({ type: "presence", users: peers.slice(0, 500) });
    for (const p of presence.users) state.presence.set(p.user, p.online);
    renderChannels();
  }
}

async function sync() {
  if (state.syncing) { state.resyncAgain = true; return; }
  state.syncing = true;
  try {
    do {
      state.resyncAgain = false;
      let after = localStorage.getItem(cursorKey()) || "0";
      for (;;) {
        const page = await request({ type: "sync", after, limit: 200 });
        for (const entry of page.entries) received(entry.message, false);
        localStorage.setItem(cursorKey(), page.cursor);
        if (!page.has_more) break;
        after = page.next;
      }
    } while (state.resyncAgain);
  } finally {
    state.syncing = false;
  }
}

async function refreshName(channel) {
  const entry = entryOf(channel);
  entry.name = entry.name || "";
  try {
    const reply = await request({ type: "list_members", group: channel });
    entry.name = reply.group.name;
    entry.members = reply.group.members;
    renderChannels();
    if (state.open === channel) renderHeader();
  } catch (_) { entry.name = null; }
}

async function openChannel(channel, { reload = false } = {}) {
  const switching = state.open !== channel;
  state.open = channel;
  showError("");
  $("chat-view").classList.add("open");
  $("conversation").hidden = false;
  $("nothing-open").hidden = true;
  entryOf(channel);
  if (switching || reload) {
    $("messages").replaceChildren();
    renderHeader();
    renderChannels();
    let page = { messages: [], has_more: false };
    try {
      page = await request({ type: "history", channel, limit: HISTORY_PAGE });
    } catch (e) {
      if (e.code !== "not_member" || !channel.startsWith("dm:")) throw e;
      // A direct channel without messages yet: nothing to show.
    }
    if (state.open !== channel) return;
    if (!state.messages.has(channel)) state.messages.set(channel, new Map());
    for (const m of page.messages) state.messages.get(channel).set(m.id, m);
    state.hasOlder.set(channel, page.has_more);
    renderMessages();
    await loadReceipts(channel);
    if (channel.startsWith("g:")) refreshName(channel);
    const peer = peerOf(channel);
    if (peer && !state.presence.has(peer)) {
      request({ type: "presence", users: [peer] })
        .then((r) => { for (const p of r.users) state.presence.set(p.user, p.online); renderHeader(); renderChannels(); })
        .catch(() => {});
    }
  }
  markOpenRead();
  $("composer").focus();
}

async function loadReceipts(channel) {
  try {
    const reply = await request({ type: "receipts", channel });
    const entry = entryOf(channel);
    for (const r of reply.receipts) {
      if (r.user !== state.user) entry.peerMarkers.set(r.user, { delivered: r.delivered_up_to, read: r.read_up_to });
    }
    renderReceipts();
  } catch (_) { /* a direct channel with no message yet */ }
}

async function loadOlder() {
  const channel = state.open;
  const known = [...(state.messages.get(channel) || new Map()).keys()].sort(cmpId);
  if (!known.length) return;
  const page = await request({ type: "history", channel, before: known[0], limit: HISTORY_PAGE });
  for (const m of page.messages) state.messages.get(channel).set(m.id, m);
  state.hasOlder.set(channel, page.has_more);
  const list = $("messages");
  const fromBottom = list.scrollHeight - list.scrollTop;
  renderMessages();
  list.scrollTop = list.scrollHeight - fromBottom;
}

function isVisible(channel) {
  return state.open === channel && document.visibilityState === "visible";
}

function markOpenRead() {
  const channel = state.open;
  const entry = channel && state.channels.get(channel);
  if (!entry || !entry.last || !isVisible(channel)) return;
  if (cmpId(entry.last.id, entry.read) > 0) scheduleMark(channel, "read", entry.last.id);
}

// Marks are sent at most every MARK_DELAY_MS per channel, naming the newest message.
function scheduleMark(channel, kind, id) {
  const key = `${channel} ${kind}`;
  const queued = state.markTimers.get(key);
  if (queued) { queued.id = maxId(queued.id, id); return; }
  const job = { id };
  state.markTimers.set(key, job);
  setTimeout(async () => {
    state.markTimers.delete(key);
    const field = kind === "read" ? "read_up_to" : "delivered_up_to";
    try {
      const reply = await request({ type: "mark", channel, [field]: job.id });
      receipt(reply);
      if (kind === "read") { entryOf(channel).unread = 0; renderChannels(); }
    } catch (_) { /* retried with the next message or the next overview */ }
  }, MARK_DELAY_MS);
}

async function sendMessage(event) {
  event.preventDefault();
  const channel = state.open;
  const text = $("composer").value;
  if (!channel || !text.trim()) return;
  $("composer").value = "";
  stopTyping();
  const to = channel.startsWith("g:") ? { group: channel } : { user: peerOf(channel) };
  const key = newKey();
  const el = renderPending(text);
  const pending = { channel, text, to, key, el, id: null };
  state.pending.set(key, pending);
  await deliverPending(pending);
}

async function deliverPending(pending) {
  try {
    const ack = await request({ type: "send", to: pending.to, text: pending.text, key: pending.key });
    state.pending.delete(pending.key);
    pending.id = ack.id;
    pending.el.remove();
    const message = {
      id: ack.id, channel: ack.channel, from: state.user, from_device: state.device, text: pending.text,
      created_at_ms: ack.created_at_ms,
    };
    if (!state.channels.has(ack.channel)) entryOf(ack.channel);
    received(message, true);
  } catch (e) {
    pending.el.classList.add("failed");
    showError(e.code ? e.message : `${e.message}; it is sent again when the connection is back`);
    if (e.code && e.code !== "rate_limited" && e.code !== "storage_unavailable" && e.code !== "overloaded") {
      // Refused for good (too long, not a member, ...): not retried.
      state.pending.delete(pending.key);
      pending.el.querySelector(".meta").textContent = `not sent: ${e.code}`;
    }
  }
}

async function retryPending() {
  for (const pending of [...state.pending.values()]) {
    pending.el.classList.remove("failed");
    await deliverPending(pending);
  }
}

function onComposerInput() {
  const now = Date.now();
  if (!state.open || !$("composer").value.trim()) { stopTyping(); return; }
  if (now - state.lastTypingSent >= TYPING_REPEAT_MS) {
    state.lastTypingSent = now;
    send({ type: "typing", channel: state.open });
  }
}

function stopTyping() {
  if (state.lastTypingSent && state.open) send({ type: "typing", channel: state.open, typing: false });
  state.lastTypingSent = 0;
}

async function newChat(event) {
  event.preventDefault();
  const peer = $("new-chat-user").value.trim();
  if (!peer || peer === state.user) return;
  $("new-chat-user").value = "";
  const channel = directChannel(state.user, peer);
  entryOf(channel);
  renderChannels();
  await openChannel(channel).catch((e) => showError(e.message));
}

async function newGroup(event) {
  event.preventDefault();
  const name = $("new-group-name").value.trim();
  const members = $("new-group-members").value.split(",").map((m) => m.trim()).filter(Boolean);
  try {
    const reply = await request({ type: "create_group", name, members });
    $("new-group-name").value = "";
    $("new-group-members").value = "";
    const entry = entryOf(reply.group.id);
    entry.name = reply.group.name;
    entry.members = reply.group.members;
    await openChannel(reply.group.id);
  } catch (e) {
    showError(e.message);
  }
}

async function addMember(event) {
  event.preventDefault();
  const user = $("add-member-user").value.trim();
  try {
    const reply = await request({ type: "add_member", group: state.open, user });
    $("add-member-user").value = "";
    entryOf(state.open).members = reply.group.members;
    renderHeader();
  } catch (e) {
    showError(e.message);
  }
}

// ---- rendering ----------------------------------------------------------------

function renderChannels() {
  const list = $("channels");
  const rows = [...state.channels.values()].sort((a, b) => {
    const ids = cmpId(b.last ? b.last.id : "0", a.last ? a.last.id : "0");
    return ids || (a.channel < b.channel ? -1 : 1);
  });
  list.replaceChildren(...rows.map((entry) => {
    const li = document.createElement("li");
    li.className = "channel";
    li.tabIndex = 0;
    li.dataset.channel = entry.channel;
    li.setAttribute("role", "button");
    if (state.open === entry.channel) li.setAttribute("aria-current", "true");
    const peer = peerOf(entry.channel);
    const dot = document.createElement("span");
    dot.className = `dot ${peer ? (state.presence.get(peer) ? "online" : "") : "none"}`;
    dot.setAttribute("aria-label", peer ? (state.presence.get(peer) ? "online" : "offline") : "");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = titleOf(entry.channel);
    const unread = document.createElement("span");
    unread.className = "unread";
    const count = entry.unread > 0 ? (entry.unreadCapped ? "99+" : String(entry.unread)) : "";
    unread.textContent = count;
    if (count) unread.setAttribute("aria-label", `${count} unread`);
    const preview = document.createElement("span");
    preview.className = "preview";
    preview.textContent = entry.last ? `${entry.last.from}: ${entry.last.text.slice(0, 80)}` : "no messages yet";
    li.append(dot, name, unread, preview);
    const open = () => openChannel(entry.channel).catch((e) => showError(e.message));
    li.onclick = open;
    li.onkeydown = (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } };
    return li;
  }));
}

function renderHeader() {
  const channel = state.open;
  if (!channel) return;
  $("conversation-title").textContent = titleOf(channel);
  const peer = peerOf(channel);
  const dot = $("peer-presence");
  dot.className = `dot ${peer ? (state.presence.get(peer) ? "online" : "") : "none"}`;
  dot.title = peer ? (state.presence.get(peer) ? "online" : "offline") : "";
  $("add-member-form").hidden = !channel.startsWith("g:");
  const typists = [...(state.typingTimers.get(channel) || new Map()).keys()];
  $("typing").textContent = typists.length ? `${typists.join(", ")} ${typists.length > 1 ? "are" : "is"} typing…` : "";
}

function renderMessages() {
  const channel = state.open;
  const list = $("messages");
  const known = [...(state.messages.get(channel) || new Map()).values()].sort((a, b) => cmpId(a.id, b.id));
  list.replaceChildren();
  for (const m of known) list.append(messageElement(m));
  for (const pending of state.pending.values()) if (pending.channel === channel) list.append(pending.el);
  $("older").hidden = !state.hasOlder.get(channel);
  renderReceipts();
  list.scrollTop = list.scrollHeight;
}

function messageElement(m) {
  const li = document.createElement("li");
  li.className = `message${m.from === state.user ? " mine" : ""}`;
  li.dataset.id = m.id;
  const meta = document.createElement("span");
  meta.className = "meta";
  const time = new Date(m.created_at_ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  meta.textContent = `${m.from} · ${time}`;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = m.text;
  li.append(meta, text);
  if (m.from === state.user) {
    const ticks = document.createElement("span");
    ticks.className = "meta receipt";
    li.append(ticks);
  }
  return li;
}

function renderMessage(message, { live }) {
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const el = messageElement(message);
  const after = [...list.querySelectorAll(".message[data-id]")].find((li) => cmpId(li.dataset.id, message.id) > 0);
  if (after) list.insertBefore(el, after); else list.insertBefore(el, list.querySelector(".pending"));
  renderReceipts();
  if (live && atBottom) list.scrollTop = list.scrollHeight;
}

function renderPending(text) {
  const li = document.createElement("li");
  li.className = "message mine pending";
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = "sending…";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(meta, body);
  $("messages").append(li);
  $("messages").scrollTop = $("messages").scrollHeight;
  return li;
}

// Under each of my messages: sent, delivered or read (direct channels), or
// how many members read it (groups).
function renderReceipts() {
  const channel = state.open;
  const entry = channel && state.channels.get(channel);
  if (!entry) return;
  const others = [...entry.peerMarkers.entries()];
  for (const li of $("messages").querySelectorAll(".message.mine[data-id]")) {
    const id = li.dataset.id;
    const readers = others.filter(([, m]) => cmpId(m.read, id) >= 0).length;
    const delivered = others.filter(([, m]) => cmpId(m.delivered, id) >= 0).length;
    let text = "sent";
    if (channel.startsWith("dm:")) {
      text = readers ? "read" : delivered ? "delivered" : "sent";
    } else if (others.length) {
      text = readers ? `read by ${readers}` : delivered ? `delivered to ${delivered}` : "sent";
    }
    const ticks = li.querySelector(".receipt");
    if (ticks && ticks.textContent !== text) ticks.textContent = text;
  }
}

// ---- wiring -------------------------------------------------------------------

function init() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("composer-form").addEventListener("submit", sendMessage);
  $("composer").addEventListener("input", onComposerInput);
  $("composer").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer-form").requestSubmit(); }
  });
  $("composer").addEventListener("blur", stopTyping);
  $("new-chat-form").addEventListener("submit", newChat);
  $("new-group-form").addEventListener("submit", newGroup);
  $("add-member-form").addEventListener("submit", addMember);
  $("older").addEventListener("click", () => loadOlder().catch((e) => showError(e.message)));
  $("back").addEventListener("click", () => {
    $("chat-view").classList.remove("open");
    state.open = null;
    renderChannels();
  });
  document.addEventListener("visibilitychange", markOpenRead);
  $("device").value = `web-${Math.random().toString(36).slice(2, 8)}`;
  const saved = sessionStorage.getItem("kubechat.session");
  if (saved) {
    try { start(JSON.parse(saved)); } catch (_) { sessionStorage.removeItem("kubechat.session"); }
  }
}

init();
