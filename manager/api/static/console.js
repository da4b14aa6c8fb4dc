// taskmgr console: times in the viewer's timezone, and the live board (games from
// /api/v1/games, their scores kept current by the event stream /api/v1/events/stream).
// No framework and no build step.
"use strict";

const fmtFull = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const fmtPrecise = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 1, month: "short", day: "numeric",
});
const fmtShort = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

function localTimes(root) {
  root.querySelectorAll("time[datetime]").forEach((el) => {
    const d = new Date(el.getAttribute("datetime"));
    if (isNaN(d)) return;
    const f = el.hasAttribute("data-precise") ? fmtPrecise : el.hasAttribute("data-short") ? fmtShort : fmtFull;
    el.textContent = f.format(d);
    el.title = d.toISOString();
  });
}

// -- the live board ---------------------------------------------------------------------

const GAME_KEYS = [
  "live_game.game.started", "live_game.score.changed", "live_game.period.ended", "live_game.game.final",
  "live_game.game.postponed", "live_game.game.cancelled", "stat_correction.score.corrected",
];
const LEAGUE_NAMES = { nba: "NBA", mlb: "MLB", nhl: "NHL", "basketball/nba": "NBA (ESPN)" };
const games = new Map(); // game key -> {data, el}
let lastSeen = Date.now();

function periodLabel(g) {
  if (g.period == null) return "";
  if (g.league === "mlb") return `Inning ${g.period}`;
  if (g.league === "nhl") return `Period ${g.period}`;
  return `Q${g.period}`;
}

function ago(iso) {
  if (!iso) return "";
  const s = Math.max(0, Math.round((Date.now() - new Date(iso)) / 1000));
  return s < 60 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}

function paint(g, el) {
  el.className = `game ${g.status}`;
  el.dataset.game = g.game_key;
  el.dataset.task = g.task_id;
  const status = { scheduled: "pre-game", live: "live", final: "final" }[g.status] || g.status;
  el.querySelector(".status").textContent = status;
  el.querySelector(".period").textContent = g.status === "live" ? periodLabel(g) : "";
  const away = el.querySelector(".away");
  away.textContent = g.away || `Game ${g.game_id}`;
  away.classList.toggle("unknown", !g.away);
  el.querySelector(".home").textContent = g.home || (g.away ? "" : "teams when it starts");
  el.querySelector(".home").classList.toggle("unknown", !g.home);
  el.querySelector(".away-score").textContent = g.away_score ?? "–";
  el.querySelector(".home-score").textContent = g.home_score ?? "–";
  const task = el.querySelector(".task");
  task.href = `/tasks/${g.task_id}`;
  task.textContent = `task ${g.state.toLowerCase()}`;
  el.querySelector(".start").textContent = "starts " + fmtShort.format(new Date(g.due_at));
  el.querySelector(".runner").textContent = g.runner_id ? `polled by ${g.runner_id}` : "no runner yet";
  el.querySelector(".updated").textContent = g.last_event_at ? `updated ${ago(g.last_event_at)}` : "";
}

function render(list) {
  const board = document.getElementById("board");
  if (!list.length) {
    board.innerHTML = '<p class="sub">No games today.</p>';
    return;
  }
  const byLeague = new Map();
  for (const g of list) {
    const k = `${g.provider} · ${LEAGUE_NAMES[g.league] || g.league}`;
    if (!byLeague.has(k)) byLeague.set(k, []);
    byLeague.get(k).push(g);
  }
  const tpl = document.getElementById("game-card");
  const frag = document.createDocumentFragment();
  for (const [league, gs] of [...byLeague].sort()) {
    const sec = document.createElement("section");
    sec.className = "league";
    const live = gs.filter((g) => g.status === "live").length;
    const n = `${gs.length} game${gs.length === 1 ? "" : "s"}${live ? `, ${live} live` : ""}`;
    sec.innerHTML = `<h2>${league}<span class="sub">${n}</span></h2>`;
    const grid = document.createElement("div");
    grid.className = "games";
    for (const g of gs) {
      const known = games.get(g.game_key);
      const el = known ? known.el : tpl.content.firstElementChild.cloneNode(true);
      // A score the stream brought in since is newer than the list's.
      if (known && known.data.last_event_at && (!g.last_event_at || known.data.last_event_at > g.last_event_at)) {
        Object.assign(g, pick(known.data, ["home_score", "away_score", "status", "period", "last_event_at"]));
      }
      games.set(g.game_key, { data: g, el });
      paint(g, el);
      grid.appendChild(el);
    }
    sec.appendChild(grid);
    frag.appendChild(sec);
  }
  board.replaceChildren(frag);
}

function pick(o, keys) {
  return Object.fromEntries(keys.map((k) => [k, o[k]]));
}

async function loadGames() {
  const from = new Date();
  from.setHours(0, 0, 0, 0);
  const to = new Date(from.getTime() + 24 * 3600 * 1000);
  document.getElementById("day").textContent = from.toLocaleDateString(undefined, { dateStyle: "full" });
  const q = new URLSearchParams({ due_from: from.toISOString(), due_to: to.toISOString() });
  const r = await fetch(`/api/v1/games?${q}`, { credentials: "same-origin" });
  if (r.status === 401) { location.href = "/login?next=/"; return; }
  if (!r.ok) throw new Error(`games: ${r.status}`);
  render(await r.json());
}

function onEvent(msg) {
  lastSeen = Date.now();
  const e = JSON.parse(msg.data);
  const d = e.data || {};
  const known = games.get(`${d.provider}:${d.game_id}`);
  if (!known) return;
  const g = known.data;
  if (d.home_team) {
    g.home = d.home_team;
    g.away = d.away_team;
  }
  if (e.task_id === g.task_id && e.task_type === "live_game") {
    // Its poller sent this: the task runs there (the list says so at its next refresh).
    g.runner_id = e.runner_id;
    if (!["FINISHED", "FAILED", "CANCELLED"].includes(g.state)) g.state = "RUNNING";
  }
  if (e.kind === "score.changed" || e.kind === "game.final") {
    g.home_score = d.home_score;
    g.away_score = d.away_score;
  }
  if (e.kind === "score.corrected" && d.after) {
    g.home_score = d.after.home_score;
    g.away_score = d.after.away_score;
  }
  if (e.kind === "score.changed" && d.period != null) g.period = d.period;
  if (e.kind === "period.ended" && d.period != null) g.period = d.period + 1;
  if (e.kind === "game.started" || e.kind === "score.changed") g.status = g.status === "final" ? "final" : "live";
  if (e.kind === "game.final") g.status = "final";
  if (e.kind === "game.postponed") g.status = "postponed";
  if (e.kind === "game.cancelled") g.status = "cancelled";
  if (!g.last_event_at || e.time > g.last_event_at) g.last_event_at = e.time;
  paint(g, known.el);
  known.el.classList.add("flash");
  setTimeout(() => known.el.classList.remove("flash"), 900);
}

function connect() {
  const pill = document.getElementById("live");
  const text = document.getElementById("live-text");
  const q = new URLSearchParams({ keys: GAME_KEYS.join(",") });
  const es = new EventSource(`/api/v1/events/stream?${q}`);
  es.onopen = () => { pill.classList.add("on"); text.textContent = "live"; };
  es.onerror = () => { pill.classList.remove("on"); text.textContent = "reconnecting…"; };
  for (const k of GAME_KEYS) es.addEventListener(k, onEvent);
}

async function board() {
  try {
    await loadGames();
  } catch (err) {
    document.getElementById("board").innerHTML = `<div class="error">Could not load the games (${err.message}).</div>`;
  }
  connect();
  // States, runners and new games change without an event: the list again now and then.
  setInterval(() => loadGames().catch(() => {}), 10000);
  setInterval(() => games.forEach(({ data, el }) => paint(data, el)), 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  if (document.body.dataset.page === "board") board();
});
