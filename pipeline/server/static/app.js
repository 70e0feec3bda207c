// dataengine dashboard: Overview, Browse, Sample, Models & runs. Plain JS, hash routing.
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const fmt = (v, d = 3) => v === null || v === undefined ? "–" : (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(d)) : esc(v));
const main = () => $("#main");
const PAST = {approve: "approved", reject: "rejected"};

async function api(path, opts = {}) {
  const init = {credentials: "same-origin", ...opts};
  if (opts.body !== undefined) {
    init.method = opts.method || "POST";
    init.headers = {"Content-Type": "application/json"};
    init.body = JSON.stringify(opts.body);
  }
  const r = await fetch(path, init);
  const data = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (r.status === 401 && location.pathname !== "/login") { location.href = "/login"; }
  if (!r.ok) throw new Error((data && data.error) || `${r.status} ${r.statusText}`);
  return data;
}

function toast(msg, isErr = false) {
  const t = $("#toast");
  t.textContent = msg; t.hidden = false; t.className = isErr ? "err" : "";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 3000);
}

function parseHash() {
  const h = location.hash.replace(/^#\/?/, "") || "overview";
  const [path, query] = h.split("?");
  const parts = path.split("/").map(decodeURIComponent);
  return {page: parts[0], args: parts.slice(1), params: new URLSearchParams(query || "")};
}

async function route() {
  const {page, args, params} = parseHash();
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page || (page === "sample" && a.dataset.page === "browse")));
  if (window.annotateLeave) window.annotateLeave(page);
  try {
    if (page === "overview") await pageOverview();
    else if (page === "browse") await pageBrowse(params);
    else if (page === "sample") await pageSample(args.join("/"), params);
    else if (page === "models") await pageModels();
    else if (page === "annotate" && window.pageAnnotate) await window.pageAnnotate(args, params);
    else main().innerHTML = `<p class="err">Unknown page ${esc(page)}</p>`;
  } catch (e) {
    main().innerHTML = `<p class="err">Error: ${esc(e.message)}</p>`;
  }
}

// ---------------------------------------------------------------- charts (inline SVG)
function lineChart(title, xs, ys, {w = 300, h = 150, color = "#1f77b4", xlabel = "round"} = {}) {
  const pts = xs.map((x, i) => [x, ys[i]]).filter((p) => p[1] !== null && p[1] !== undefined && isFinite(p[1]));
  let body = "";
  if (!pts.length) body = `<text x="${w / 2}" y="${h / 2}" text-anchor="middle" fill="#999">no data</text>`;
  else {
    const x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
    const y0 = Math.min(0, ...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1])) || 1;
    const sx = (x) => 36 + (x1 === x0 ? (w - 50) / 2 : (x - x0) / (x1 - x0) * (w - 50));
    const sy = (y) => h - 22 - (y - y0) / ((y1 - y0) || 1) * (h - 40);
    body += `<line x1="36" y1="${h - 22}" x2="${w - 10}" y2="${h - 22}" stroke="#999"/><line x1="36" y1="10" x2="36" y2="${h - 22}" stroke="#999"/>`;
    body += `<text x="32" y="${sy(y1) + 4}" text-anchor="end" font-size="10">${fmt(y1, 2)}</text><text x="32" y="${h - 22}" text-anchor="end" font-size="10">${fmt(y0, 2)}</text>`;
    body += `<text x="${sx(x0)}" y="${h - 8}" font-size="10" text-anchor="middle">${x0}</text><text x="${sx(x1)}" y="${h - 8}" font-size="10" text-anchor="middle">${x1}</text><text x="${w / 2}" y="${h - 2}" font-size="9" text-anchor="middle" fill="#666">${esc(xlabel)}</text>`;
    body += `<polyline fill="none" stroke="${color}" stroke-width="2" points="${pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" ")}"/>`;
    if (pts.length < 60) body += pts.map((p) => `<circle cx="${sx(p[0])}" cy="${sy(p[1])}" r="3" fill="${color}"><title>${p[0]}: ${fmt(p[1])}</title></circle>`).join("");
  }
  return `<div class="chart"><div class="title">${esc(title)}</div><svg width="${w}" height="${h}">${body}</svg></div>`;
}

function table(rows, cols) {
  if (!rows.length) return `<p class="muted">none</p>`;
  return `<table><tr>${cols.map((c) => `<th>${esc(c[1])}</th>`).join("")}</tr>${rows.map((r) => `<tr>${cols.map((c) => `<td>${typeof c[2] === "function" ? c[2](r) : fmt(r[c[0]])}</td>`).join("")}</tr>`).join("")}</table>`;
}

// ---------------------------------------------------------------- overview
async function pageOverview() {
  const o = await api("/api/overview");
  const pr = o.per_round;
  const rounds = pr.map((r) => r.round);
  const card = (label, v) => `<div class="card">${esc(label)}<b>${fmt(v)}</b></div>`;
  let progress = "";
  try {
    const p = await api("/api/annotate/progress");
    if (p.rounds.length) progress = `<h3>Annotation progress (people)</h3>` + table(p.rounds, [["round", "round"], ["stage", "stage"], ["model_version", "model"], ["queued", "images"], ["done", "submitted"], ["skipped", "skipped"], ["leased", "leased"], ["masks", "masks"]]) +
      `<h3>Per annotator</h3>` + table(p.annotators, [["round", "round"], ["annotator", "annotator"], ["images", "images"], ["masks", "masks"], ["clicks_per_mask", "clicks/mask"], ["seconds_per_mask", "s/mask"]]);
  } catch (e) { /* annotation routes optional */ }
  try {
    const a = await api("/api/annotate/annotators");
    if (a.annotators.length) progress += `<h3>People: speed, honeypots, agreement</h3>` + table(a.annotators, [["annotator", "annotator"], ["masks", "masks"], ["clicks_per_mask", "clicks/mask"], ["seconds_per_mask", "s/mask"], ["honeypot_images", "honeypots"], ["honeypot_iou", "honeypot IoU"], ["reviewed_images", "reviewed images"], ["agreement", "agreement IoU"]]);
  } catch (e) { /* curators only */ }
  main().innerHTML = `<h2>Overview <span class="muted">${esc(o.root)}</span></h2>
  <div class="cards">${card("images", o.images)}${card("shards", o.shards)}${card("masks", o.masks)}${card("rounds", o.rounds)}${card("model versions", o.model_versions.length)}
  ${card("rejected masks", o.curation.rejected)}${card("approved masks", o.curation.approved)}${card("rejected images", o.curation.rejected_images)}${card("quarantined", o.quarantine.total)}</div>
  <p>Splits: ${Object.entries(o.splits).map(([k, v]) => `${esc(k)} ${v}`).join(", ") || "–"} · Stages: ${Object.entries(o.stages).map(([k, v]) => `${esc(k)} ${v}`).join(", ")} · Model versions: ${o.model_versions.map(esc).join(", ") || "–"}
  · <a href="/api/decisions/export?format=jsonl">export decisions (jsonl)</a> · <a href="/api/decisions/export?format=csv">csv</a> · <a href="/api/decisions/export?format=parquet">parquet</a></p>
  <div class="charts">
    ${lineChart("masks per image", rounds, pr.map((r) => r.masks_per_image))}
    ${lineChart("clicks per mask", rounds, pr.map((r) => r.clicks_per_mask), {color: "#d62728"})}
    ${lineChart("seconds per mask", rounds, pr.map((r) => r.seconds_per_mask), {color: "#9467bd"})}
    ${lineChart("held-out mIoU@1", rounds, pr.map((r) => r.heldout_miou1), {color: "#2ca02c"})}
    ${lineChart("held-out NoC@90", rounds, pr.map((r) => r.heldout_noc90), {color: "#ff7f0e"})}
  </div>
  <h3>Rounds</h3>${table(pr, [["round", "round", (r) => `<a href="#/browse?round=${r.round}">${r.round}</a>`], ["stage", "stage"], ["model_version", "model"], ["complete", "complete"], ["images", "images"], ["masks", "masks"], ["masks_per_image", "masks/img"], ["clicks_per_mask", "clicks/mask"], ["seconds_per_mask", "s/mask"], ["prefilled", "pre-filled"], ["heldout_miou1", "mIoU@1"], ["heldout_noc90", "NoC@90"], ["nomodel_miou1", "no-model mIoU@1"], ["nomodel_noc90", "no-model NoC@90"]])}
  ${progress}
  <h3>SAM versions</h3>${table(o.sam_models, [["version", "version"], ["miou1", "held-out mIoU@1"], ["noc90", "NoC@90"], ["nomodel_miou1", "no-model mIoU@1"], ["nomodel_noc90", "no-model NoC@90"], ["promoted", "promoted"]])}
  <h3>Quarantine</h3>${table(o.quarantine.reasons.map(([reason, n]) => ({reason, n})), [["reason", "reason"], ["n", "count"]])}
  ${o.engine_reports.length ? `<h3>Engine reports</h3>` + o.engine_reports.map((r) => `<details ${r.png ? "open" : ""}><summary>${esc(r.name)}</summary>${r.png ? `<img src="${esc(r.png)}" style="max-width:900px" alt="engine report plot">` : ""}<pre>${esc(JSON.stringify(r.report ?? r.error, null, 1))}</pre></details>`).join("") : ""}`;
}

// ---------------------------------------------------------------- browse
const FILTERS = ["view", "round", "stage", "model_version", "state", "min_iou", "max_iou", "min_stability", "max_stability", "min_area", "max_area", "sort", "order", "per_page"];

async function pageBrowse(params) {
  const page = parseInt(params.get("page") || "0", 10);
  const q = new URLSearchParams();
  for (const k of [...FILTERS, "page", "key"]) if (params.get(k)) q.set(k, params.get(k));
  const view = params.get("view") || "masks";
  const sel = (name, opts, cur) => `<select name="${name}">${opts.map((o) => `<option ${o === cur ? "selected" : ""}>${o}</option>`).join("")}</select>`;
  const inp = (name, label, type = "text") => `<label>${label}<input type="${type}" step="any" name="${name}" value="${esc(params.get(name) || "")}"></label>`;
  main().innerHTML = `<h2>Browse</h2>
  <form class="filters" id="filters">
    <label>view${sel("view", ["masks", "images"], view)}</label>
    ${inp("round", "round(s)")}
    <label>stage${sel("stage", ["", "imported", "manual", "semi", "auto"], params.get("stage") || "")}</label>
    ${inp("model_version", "model version")}
    <label>curation${sel("state", ["", "pending", "approved", "rejected"], params.get("state") || "")}</label>
    ${inp("min_iou", "pred. IoU ≥", "number")}${inp("max_iou", "pred. IoU ≤", "number")}
    ${inp("min_stability", "stability ≥", "number")}${inp("max_stability", "stability ≤", "number")}
    ${inp("min_area", "area ≥", "number")}${inp("max_area", "area ≤", "number")}
    <label>sort${sel("sort", ["predicted_iou", "stability_score", "area", "round", "n_clicks", "seconds", "key", "mask_id", "model_version", "stage", "n_masks"], params.get("sort") || "predicted_iou")}</label>
    <label>order${sel("order", ["asc", "desc"], params.get("order") || "asc")}</label>
    <label>per page${sel("per_page", ["24", "48", "96", "200"], params.get("per_page") || "48")}</label>
    <button type="submit" id="apply">Apply</button>
  </form>
  <div id="results"><p>Loading…</p></div>`;
  $("#filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const p = new URLSearchParams();
    for (const [k, v] of new FormData(ev.target).entries()) if (v !== "") p.set(k, v);
    location.hash = "#/browse?" + p.toString();
  });
  let res;
  try { res = await api("/api/browse?" + q.toString()); } catch (e) { $("#results").innerHTML = `<p class="err">${esc(e.message)}</p>`; return; }
  const pages = Math.max(1, Math.ceil(res.total / res.per_page));
  const nav = (p) => { const n = new URLSearchParams(params); n.set("page", p); return "#/browse?" + n.toString(); };
  const pager = `<div class="pager"><span>${res.total} ${res.view} · page ${page + 1}/${pages}</span>${page > 0 ? `<a href="${nav(page - 1)}">‹ prev</a>` : ""}${page + 1 < pages ? `<a href="${nav(page + 1)}" id="next">next ›</a>` : ""}</div>`;
  let tiles;
  if (res.view === "masks") {
    tiles = res.items.map((m) => `<div class="tile ${m.state}" data-mask="${esc(m.mask_id)}">
      <a href="#/sample/${encodeURIComponent(m.key)}?mask=${encodeURIComponent(m.mask_id)}"><img loading="lazy" src="/api/maskthumb/${esc(m.mask_id)}?size=192" alt="${esc(m.mask_id)}"></a>
      <div class="acts"><button class="ok" title="approve" data-act="approve">✓</button><button class="no" title="reject" data-act="reject">✗</button></div>
      <div class="meta">r${m.round} ${esc(m.stage)} ${esc(m.model_version)} · IoU ${fmt(m.predicted_iou, 2)} · stab ${fmt(m.stability_score, 2)} · area ${m.area} · <span class="state-${m.state}">${m.state}</span></div></div>`).join("");
  } else {
    tiles = res.items.map((m) => `<div class="tile" data-key="${esc(m.key)}">
      <a href="#/sample/${encodeURIComponent(m.key)}"><img loading="lazy" src="/api/overlay/${esc(m.key)}?size=192" alt="${esc(m.key)}"></a>
      <div class="meta">${esc(m.key)} · ${m.n_masks} masks · min IoU ${fmt(m.predicted_iou, 2)}</div></div>`).join("");
  }
  $("#results").innerHTML = pager + `<div class="grid">${tiles}</div>` + pager;
  $("#results").addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-act]");
    if (!b) return;
    const tile = b.closest(".tile");
    const reason = b.dataset.act === "reject" ? (prompt("Reason for rejecting this mask?", "") ?? null) : "";
    if (reason === null) return;
    try {
      const r = await api("/api/decisions", {body: {decisions: [{target_type: "mask", target: tile.dataset.mask, decision: b.dataset.act, reason}]}});
      const st = r.states[tile.dataset.mask];
      tile.className = "tile " + st;
      tile.querySelector(".meta span").className = "state-" + st;
      tile.querySelector(".meta span").textContent = st;
      toast(`${PAST[b.dataset.act]} ${tile.dataset.mask}`);
    } catch (e) { toast(e.message, true); }
  });
}

// ---------------------------------------------------------------- sample
async function pageSample(key, params) {
  const s = await api(`/api/sample/${encodeURIComponent(key)}`);
  const img = new Image();
  img.src = `/api/image/${encodeURIComponent(key)}`;
  await img.decode().catch(() => {});
  const W = img.naturalWidth || s.image.width, H = img.naturalHeight || s.image.height;
  const masks = s.masks.map((m) => {
    const box = rleDecodeBox(m.rle, m.height, m.width);
    const rgb = colorOf(m.mask_id);
    return {...m, box, rgb, canvas: maskCanvas(box, rgb, 0.35), hi: null, visible: m.state !== "rejected"};
  });
  const dec = s.image_decision;
  main().innerHTML = `<h2>Sample ${esc(key)} <span class="muted">${W}×${H} · ${esc(s.image.split || "")} · ${esc(s.image.source || "")}</span></h2>
  <div class="sample">
    <div class="stage"><canvas id="cv" width="${W}" height="${H}"></canvas><div id="detail" class="muted">Hover a mask to highlight it; click to pin and see its clicks.</div></div>
    <div class="side">
      <p>Image: ${dec ? `<span class="state-${PAST[dec.decision]}">${PAST[dec.decision]}</span> by ${esc(dec.who)} ${dec.reason ? "(" + esc(dec.reason) + ")" : ""}` : `<span class="muted">no image decision</span>`}</p>
      <p><label>Reason <input type="text" id="reason" size="30" placeholder="why (optional)"></label>
      <button class="ok" id="img-approve">Approve image</button> <button class="no" id="img-reject">Reject image</button></p>
      <p><button id="show-all">show all</button> <button id="hide-all">hide all</button> <button id="hide-rej">hide rejected</button> <span class="muted">${masks.length} masks</span></p>
      <table class="masklist"><tr><th></th><th></th><th>mask</th><th>round</th><th>stage</th><th>model</th><th>IoU</th><th>stab</th><th>area</th><th>clicks</th><th>state</th><th></th></tr>
      ${masks.map((m, i) => `<tr data-i="${i}" id="row-${i}"><td><input type="checkbox" data-vis="${i}" ${m.visible ? "checked" : ""}></td><td><span class="swatch" style="background:rgb(${m.rgb})"></span></td>
      <td>${esc(m.mask_id.split("/").pop())}</td><td>${m.round}</td><td>${esc(m.stage)}</td><td>${esc(m.model_version)}</td><td>${fmt(m.predicted_iou, 2)}</td><td>${fmt(m.stability_score, 2)}</td><td>${m.area}</td><td>${m.n_clicks}</td>
      <td class="state-${m.state}" id="st-${i}" title="${m.decision ? esc(m.decision.who + ": " + m.decision.reason) : ""}">${m.state}</td>
      <td><button class="ok" data-dec="approve" data-i="${i}">✓</button><button class="no" data-dec="reject" data-i="${i}">✗</button></td></tr>`).join("")}
      </table>
      <p><button id="more-like">More like this</button></p><div id="similar"></div>
    </div>
  </div>`;
  $("#more-like").onclick = async () => {
    try {
      const r = await api(`/api/similar/${encodeURIComponent(key)}?k=12`);
      $("#similar").innerHTML = `<p class="muted">nearest by ${esc(r.model_version)} embeddings</p><div class="grid similar">${r.neighbours.map((n) => `<div><a href="#/sample/${encodeURIComponent(n.key)}"><img loading="lazy" src="/api/thumb/${encodeURIComponent(n.key)}?size=128" alt="${esc(n.key)}"></a><div class="muted">${fmt(n.similarity, 3)} · ${esc(n.split || "")}</div></div>`).join("") || "<p class=\"muted\">none</p>"}</div>`;
    } catch (e) { $("#similar").innerHTML = `<p class="err">${esc(e.message)}</p>`; }
  };
  const cv = $("#cv"), ctx = cv.getContext("2d");
  let hover = -1, pinned = -1, clicks = [];
  const draw = () => {
    ctx.drawImage(img, 0, 0, W, H);
    masks.forEach((m, i) => { if (m.visible && i !== hover && i !== pinned) ctx.drawImage(m.canvas, m.box.x0, m.box.y0); });
    for (const i of [pinned, hover]) {
      if (i < 0) continue;
      const m = masks[i];
      if (!m.hi) m.hi = maskCanvas(m.box, m.rgb, 0.7);
      ctx.drawImage(m.hi, m.box.x0, m.box.y0);
      ctx.strokeStyle = "#fff"; ctx.lineWidth = 2; ctx.strokeRect(m.box.x0, m.box.y0, m.box.w, m.box.h);
    }
    for (const c of clicks) {
      ctx.beginPath(); ctx.arc(c.x, c.y, 5, 0, 7); ctx.fillStyle = c.label ? "#0f0" : "#f00"; ctx.fill(); ctx.strokeStyle = "#000"; ctx.stroke();
    }
  };
  const hit = (x, y) => {
    let best = -1, bestArea = Infinity;
    masks.forEach((m, i) => {
      if (!m.visible) return;
      const b = m.box, lx = x - b.x0, ly = y - b.y0;
      if (lx < 0 || ly < 0 || lx >= b.w || ly >= b.h) return;
      if (b.bits[ly * b.w + lx] && b.area < bestArea) { best = i; bestArea = b.area; }
    });
    return best;
  };
  const setHover = (i) => {
    if (i === hover) return;
    if (hover >= 0) $(`#row-${hover}`)?.classList.remove("hover");
    hover = i;
    if (hover >= 0) $(`#row-${hover}`)?.classList.add("hover");
    draw();
  };
  const pin = async (i) => {
    if (pinned >= 0) $(`#row-${pinned}`)?.classList.remove("selected");
    pinned = i; clicks = [];
    if (i < 0) { draw(); return; }
    $(`#row-${i}`)?.classList.add("selected");
    const m = masks[i];
    draw();
    try {
      const d = await api(`/api/mask/${m.mask_id}`);
      clicks = (d.record && d.record.clicks) || [];
      $("#detail").innerHTML = `<b>${esc(m.mask_id)}</b> round ${m.round} · ${esc(m.stage)} · model ${esc(m.model_version || "–")} · annotator ${esc(m.annotator || "–")} · ${m.n_clicks} clicks · ${fmt(m.seconds, 1)} s · IoU ${fmt(m.predicted_iou)} · stability ${fmt(m.stability_score)} · area ${m.area}${m.category ? " · " + esc(m.category) : ""}`;
      draw();
    } catch (e) { $("#detail").textContent = e.message; }
  };
  const toCanvas = (ev) => { const r = cv.getBoundingClientRect(); return [Math.floor((ev.clientX - r.left) * W / r.width), Math.floor((ev.clientY - r.top) * H / r.height)]; };
  cv.addEventListener("mousemove", (ev) => setHover(hit(...toCanvas(ev))));
  cv.addEventListener("mouseleave", () => setHover(-1));
  cv.addEventListener("click", (ev) => pin(hit(...toCanvas(ev))));
  $(".masklist").addEventListener("mouseover", (ev) => { const tr = ev.target.closest("tr[data-i]"); if (tr) setHover(+tr.dataset.i); });
  $(".masklist").addEventListener("click", async (ev) => {
    const vis = ev.target.closest("input[data-vis]");
    if (vis) { masks[+vis.dataset.vis].visible = vis.checked; draw(); return; }
    const b = ev.target.closest("button[data-dec]");
    if (b) {
      const m = masks[+b.dataset.i];
      try {
        const r = await api("/api/decisions", {body: {decisions: [{target_type: "mask", target: m.mask_id, decision: b.dataset.dec, reason: $("#reason").value}]}});
        m.state = r.states[m.mask_id];
        const td = $(`#st-${b.dataset.i}`); td.textContent = m.state; td.className = "state-" + m.state;
        toast(`${PAST[b.dataset.dec]} mask ${m.mask_id}`);
      } catch (e) { toast(e.message, true); }
      return;
    }
    const tr = ev.target.closest("tr[data-i]");
    if (tr) pin(+tr.dataset.i);
  });
  const setAll = (f) => { masks.forEach((m, i) => { m.visible = f(m); const c = document.querySelector(`input[data-vis="${i}"]`); if (c) c.checked = m.visible; }); draw(); };
  $("#show-all").onclick = () => setAll(() => true);
  $("#hide-all").onclick = () => setAll(() => false);
  $("#hide-rej").onclick = () => setAll((m) => m.state !== "rejected");
  for (const d of ["approve", "reject"]) {
    $(`#img-${d}`).onclick = async () => {
      try {
        await api("/api/decisions", {body: {decisions: [{target_type: "image", target: key, decision: d, reason: $("#reason").value}]}});
        toast(`${PAST[d]} image ${key}`);
        route();
      } catch (e) { toast(e.message, true); }
    };
  }
  draw();
  const want = params.get("mask");
  if (want) { const i = masks.findIndex((m) => m.mask_id === want); if (i >= 0) pin(i); }
}

// ---------------------------------------------------------------- models and runs
function curves(obj) {
  // Find loss-like series in metrics JSON: arrays of numbers, or arrays of {step, <name>: number}.
  const out = [];
  const walk = (o, path) => {
    if (Array.isArray(o)) {
      if (o.length > 1 && o.every((v) => typeof v === "number")) out.push({name: path, xs: o.map((_, i) => i), ys: o});
      else if (o.length > 1 && o.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
        const keys = Object.keys(o[0]).filter((k) => typeof o[0][k] === "number" && k !== "step" && k !== "epoch");
        const xk = "step" in o[0] ? "step" : ("epoch" in o[0] ? "epoch" : null);
        for (const k of keys) out.push({name: `${path}.${k}`, xs: o.map((v, i) => xk ? v[xk] : i), ys: o.map((v) => v[k])});
      }
    } else if (o && typeof o === "object") for (const [k, v] of Object.entries(o)) walk(v, path ? `${path}.${k}` : k);
  };
  walk(obj, "");
  return out;
}

async function pageModels() {
  const m = await api("/api/models");
  let html = `<h2>Models and runs</h2>`;
  for (const kind of ["sam", "detector", "vae", "ldm"]) {
    const versions = m[kind] || [];
    html += `<h3>${kind.toUpperCase()} (${versions.length})</h3>`;
    if (!versions.length) { html += `<p class="muted">no versions under models/${kind}/</p>`; continue; }
    html += table(versions, [["version", "version"], ["published", "published"], ["promoted", "promoted"], ["miou1", "held-out mIoU@1"], ["noc90", "NoC@90"]]);
    for (const v of versions) {
      const cs = [];
      for (const [name, j] of Object.entries(v.json)) for (const c of curves(j)) cs.push({...c, name: `${name}:${c.name}`});
      html += `<details ${cs.length || v.pngs.length ? "open" : ""}><summary><b>${kind}/${esc(v.version)}</b> ${v.promoted === true ? "✔ promoted" : v.promoted === false ? "✘ not promoted" : ""}</summary>
      <div class="charts">${cs.slice(0, 8).map((c) => lineChart(c.name, c.xs, c.ys, {xlabel: "step"})).join("")}</div>
      <div class="sample-grid">${v.pngs.map((p) => `<a href="/api/file/models/${kind}/${esc(v.version)}/${esc(p)}" target="_blank"><img src="/api/file/models/${kind}/${esc(v.version)}/${esc(p)}" alt="${esc(p)}" title="${esc(p)}"></a>`).join("")}</div>
      ${Object.entries(v.json).map(([name, j]) => `<details><summary>${esc(name)}</summary><pre>${esc(JSON.stringify(j, null, 1))}</pre></details>`).join("")}</details>`;
    }
  }
  main().innerHTML = html;
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", async () => {
  try {
    const w = window.ME = await api("/api/whoami");
    $("#who").textContent = `signed in as ${w.user} (${w.role})`;
  } catch (e) { $("#who").textContent = e.message; }
  route();
});
