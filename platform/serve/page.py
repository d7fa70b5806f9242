"""The page at / for a person to try the API: it opens on a user (the one in the URL, `/?user=3`, else
the first known one) with a few others to click, shows the history and the recommendations with their
per-task scores; click an item to add an event (with the write token) and watch the list change; the
URL names the user shown. Plain HTML and JavaScript calling the same endpoints as any client; data is
written with textContent, never parsed as HTML."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>genrec</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
 header { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }
 #model { color: #555; } #status { color: #a00; min-height: 1.2em; }
 main { display: grid; grid-template-columns: 1fr 1fr; gap: 2em; }
 ol { padding-left: 1.5em; } li { margin: .25em 0; }
 #recs li { cursor: pointer; } #recs li:hover { background: #eef; }
 .meta, .scores { color: #666; font-size: 12px; } .cold { color: #a60; }
 #picks a { margin-right: .6em; }
</style></head>
<body>
<header>
 <h1>genrec</h1>
 <span id="model">loading model...</span>
 <label>user <input id="user" list="users" size="12"><datalist id="users"></datalist></label>
 <button id="load">show</button>
 <label>action <select id="action"></select></label>
 <label>write token <input id="token" type="password" size="16"></label>
 <a href="/docs">API docs</a>
</header>
<p id="picks" class="meta">known users: </p>
<p id="status"></p>
<main>
 <section><h2>History <span class="meta">(most recent last)</span></h2><ol id="history"></ol></section>
 <section><h2>Recommendations <span id="cold" class="cold"></span></h2>
  <p class="meta">click an item to add an event for this user</p><ol id="recs"></ol></section>
</main>
<script>
const $ = (id) => document.getElementById(id);
const tokenBox = $("token");
tokenBox.value = localStorage.getItem("genrec-token") || "";
tokenBox.onchange = () => localStorage.setItem("genrec-token", tokenBox.value);

async function call(method, path, body) {
  const headers = {"content-type": "application/json"};
  if (method === "POST" && path === "/v1/events" && tokenBox.value) headers.authorization = "Bearer " + tokenBox.value;
  const response = await fetch(path, {method, headers, body: body ? JSON.stringify(body) : undefined});
  const data = await response.json();
  if (!response.ok) throw new Error(response.status + ": " + problems(data.detail));
  return data;
}
// an error body: {detail: [{loc, msg, type}]}
function problems(detail) {
  if (!Array.isArray(detail)) return String(detail);
  return detail.map((d) => (d.loc && d.loc.length ? d.loc.join(".") + ": " : "") + d.msg).join("; ");
}
function line(text, cls) { const span = document.createElement("span"); span.textContent = text; if (cls) span.className = cls; return span; }
function name(item) { return item.title || ("item " + item.item_id); }
function meta(item) { return item.genres ? " (" + item.genres.join(", ") + ")" : ""; }

async function show() {
  const user = $("user").value.trim();
  if (!user) return;
  history.replaceState(null, "", "?user=" + encodeURIComponent(user));  // the URL opens this user again
  $("status").textContent = "";
  try {
    const [past, recs] = await Promise.all([
      call("GET", "/v1/users/" + encodeURIComponent(user) + "/history?limit=20"),
      call("POST", "/v1/recommend", {user_id: user, k: 10})]);
    const h = $("history"); h.replaceChildren();
    if (!past.known) h.append(line("unknown user: cold start", "cold"));
    for (const e of past.events) {
      const li = document.createElement("li");
      li.append(line(name(e)), line(meta(e) + " - " + e.action + " - " + new Date(e.timestamp * 1000).toISOString().slice(0, 16).replace("T", " "), "meta"));
      h.append(li);
    }
    $("cold").textContent = recs.cold_start ? "(cold start: popular items)" : "";
    const r = $("recs"); r.replaceChildren();
    for (const item of recs.items) {
      const li = document.createElement("li");
      li.dataset.item = item.item_id;
      const scores = item.scores ? Object.entries(item.scores).map(([t, v]) => t + " " + v.toFixed(3)).join(", ") : "";
      // a cold-start item has no model score: its popularity (events in the store) ordered it
      const value = item.score === null ? " popularity " + item.popularity : " score " + item.score.toFixed(3);
      li.append(line(name(item)), line(meta(item) + value + (scores ? " [" + scores + "]" : ""), "scores"));
      li.onclick = () => addEvent(user, item.item_id);
      r.append(li);
    }
  } catch (err) { $("status").textContent = err.message; }
}
async function addEvent(user, item) {
  try {
    await call("POST", "/v1/events", {user_id: user, events: [{item_id: item, action: $("action").value}]});
    await show();
  } catch (err) { $("status").textContent = err.message; }
}
$("load").onclick = show;
$("user").onkeydown = (e) => { if (e.key === "Enter") show(); };
(async () => {
  try {
    const info = await call("GET", "/v1/model");
    $("model").textContent = info.name + " v" + info.version + " - tasks: " + info.tasks.join(", ");
    for (const a of info.actions) { const o = document.createElement("option"); o.textContent = a; $("action").append(o); }
    const users = await call("GET", "/v1/users?limit=50");
    for (const u of users) { const o = document.createElement("option"); o.value = u; $("users").append(o); }
    for (const u of users.slice(0, 10)) {
      const a = document.createElement("a");
      a.href = "?user=" + encodeURIComponent(u); a.textContent = u;
      a.onclick = (e) => { e.preventDefault(); $("user").value = u; show(); };
      $("picks").append(a);
    }
    // first load: the user the URL names, else the first known one
    $("user").value = new URLSearchParams(location.search).get("user") || users[0] || "";
    await show();
  } catch (err) { $("status").textContent = err.message; }
})();
</script>
</body></html>
"""
