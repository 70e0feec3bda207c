// dataengine annotate page: SAM-assisted click-to-mask. Plain JS.
// Clicks are decoded in the browser (decoder.js, onnxruntime-web) or by the server (POST
// predict), whichever answers sooner here: timed once per model version on probe clicks before
// the person clicks (?decoder=browser|server forces one). Accepts send the prompts; the server
// recomputes the mask.
// Left click = positive point, right click or shift+click = negative point, drag = box.
// Keys: a/Enter accept (next object) · z undo · c/Esc clear · 1-3 pick a mask choice ·
//       s submit image · k skip image · r remove last accepted mask ·
//       x / e remove / correct the pre-filled mask under the mouse (semi rounds).
"use strict";

const A = {timer: null, state: null};
window.__clickLatencies = [];  // ms from the click event to the painted mask (benchmarks read it)

// model version -> {path, browser_ms, server_ms}: the decoder the page uses for that version
const PATHS = new Map();

const median = (v) => { const s = [...v].sort((a, b) => a - b); return s[s.length >> 1]; };
const forcedDecoder = () => new URLSearchParams(location.search).get("decoder");  // browser | server

// Time first clicks on both decoders (probe points across the image's middle row, each a new
// prompt on object 0, warm-up calls dropped) and keep the faster. A browser decoder that is
// not faster than the round trip to the server's native runtime is not worth this machine's
// cores; a distant or busy server is not worth the wait.
async function choosePath(round, L, dec) {
  const forced = forcedDecoder();
  if (forced === "browser" || forced === "server") return {path: forced, forced: true};
  if (PATHS.has(L.model_version)) return PATHS.get(L.model_version);
  const W = L.image.width, H = L.image.height, n = 4;
  const t = {browser: [], server: []};
  for (let i = 0; i < n; i++) {
    const pts = [{x: Math.round(W * (i + 1) / (n + 2)), y: H >> 1, label: 1}];
    let t0 = performance.now();
    const preds = await dec.decode("probe", pts, null);
    dec.mask(preds.reduce((b, p) => (p.score > b.score ? p : b)).low);
    dec.objects.delete("probe");
    t.browser.push(performance.now() - t0);
    t0 = performance.now();
    const r = await api(`/api/annotate/${round}/predict`, {body: {lease_id: L.lease.lease_id, key: L.image.key, object: 0, points: pts}});
    rleDecodeBox(r.masks[r.best].rle, r.height, r.width);
    t.server.push(performance.now() - t0);
  }
  const b = median(t.browser.slice(1)), s = median(t.server.slice(1));
  const choice = {path: b <= s ? "browser" : "server", browser_ms: t.browser, server_ms: t.server};
  PATHS.set(L.model_version, choice);
  return choice;
}

function probeNote(c) {
  if (!c || !c.browser_ms) return c && c.forced ? " (forced)" : "";
  return ` (probe clicks: browser ${median(c.browser_ms.slice(1)).toFixed(0)} ms, server ${median(c.server_ms.slice(1)).toFixed(0)} ms)`;
}

function idempotencyKey() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function waitJob(job) {
  for (;;) {
    const j = await api(job.status_url);
    if (j.status === "done") return j.result;
    if (j.status === "failed") throw new Error(j.error);
    await new Promise((r) => setTimeout(r, 300));
  }
}

window.annotateLeave = (page) => {
  if (page !== "annotate" && A.timer) { clearInterval(A.timer); A.timer = null; }
  if (page !== "annotate") { document.onkeydown = null; A.state = null; }
};

window.pageAnnotate = async (args, params) => {
  if (!args.length || !args[0]) return annotateHome();
  return annotateRound(parseInt(args[0], 10));
};

async function annotateHome() {
  const r = await api("/api/annotate/rounds");
  const rows = r.rounds.map((x) => `<tr><td>${x.round}</td><td>${esc(x.stage)}</td><td>${esc(x.model_version)}</td><td>${x.queued}</td><td>${x.done}</td><td>${x.skipped}</td><td>${x.leased}</td><td>${x.masks}</td><td>${x.complete ? "complete" : `<a href="#/annotate/${x.round}" id="start-${x.round}">annotate ›</a>`}</td></tr>`).join("");
  const annot = r.rounds.flatMap((x) => x.annotators);
  main().innerHTML = `<h2>Annotate</h2>
  <h3>Rounds open for people</h3>
  ${r.rounds.length ? `<table><tr><th>round</th><th>stage</th><th>model</th><th>images</th><th>submitted</th><th>skipped</th><th>leased</th><th>masks</th><th></th></tr>${rows}</table>` : `<p class="muted">none yet</p>`}
  <h3>Per annotator</h3>${table(annot, [["round", "round"], ["annotator", "annotator"], ["images", "images"], ["masks", "masks"], ["clicks_per_mask", "clicks/mask"], ["seconds_per_mask", "s/mask"]])}
  <h3>Open a round for people</h3>
  <form class="filters" id="open-round">
    <label>stage<select name="stage"><option>manual</option><option>semi</option></select></label>
    <label>SAM version<select name="model_version">${r.sam_versions.map((v) => `<option>${esc(v)}</option>`).join("")}</select></label>
    <label>images<input type="number" name="n_images" value="20" min="1"></label>
    <label>pre-fill (semi)<input type="text" name="prefill" value="none" title="none, amg, or round:N"></label>
    <button type="submit">Open round</button>
  </form>`;
  $("#open-round").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    try {
      const job = await api("/api/annotate/rounds", {body: {stage: f.get("stage"), model_version: f.get("model_version"), n_images: parseInt(f.get("n_images"), 10), prefill: f.get("prefill") || "none"}});
      toast("opening the round…");
      const res = await waitJob(job);
      toast(`opened round ${res.round}`);
      location.hash = `#/annotate/${res.round}`;
    } catch (e) { toast(e.message, true); }
  });
}

async function annotateRound(round) {
  let L;
  try { L = await api(`/api/annotate/${round}/lease`, {body: {}}); } catch (e) { main().innerHTML = `<p class="err">${esc(e.message)}</p>`; return; }
  if (!L.lease) {
    main().innerHTML = `<h2>Round ${round}</h2><p id="round-done">No image left for you in this round (${L.progress.done} submitted, ${L.progress.skipped} skipped, ${L.progress.todo} to do${L.progress.leased ? `, ${L.progress.leased} leased by others` : ""}). <a href="#/annotate">back</a></p>`;
    return;
  }
  const im = L.image;
  const img = new Image();
  img.src = L.image_url;
  await img.decode();
  const W = im.width, H = im.height;
  let dec = null;
  window.__decoderChoice = forcedDecoder() === "server" ? {path: "server", forced: true} : null;
  if (L.decoder_url && window.BrowserDecoder && !window.__decoderChoice) {
    try {
      dec = await BrowserDecoder.load(round, L.model_version);
      await dec.setImage(round, L.lease.lease_id, im.key);
      window.__decoder = dec;
      window.__decoderChoice = await choosePath(round, L, dec);
      if (window.__decoderChoice.path === "server") dec = null;
    } catch (e) { dec = null; toast(`decoding on the server: ${e.message}`, true); }
  }
  const S = A.state = {
    dec,
    round, leaseId: L.lease.lease_id, key: im.key, W, H, img,
    object: 0, points: [], box: null, preds: null, choice: 0, replaces: null,
    accepted: im.accepted.map((a) => ({uid: a.uid, box: rleDecodeBox(a.segmentation.counts, H, W), clicks: a.clicks.length})),
    prefilled: im.prefilled.map((a) => ({uid: a.uid, box: rleDecodeBox(a.segmentation.counts, H, W), score: a.predicted_iou, pc: a.point_coords})),
    tStart: performance.now(), busy: false, lastMs: null,
  };
  const col = (i) => colorOf("acc" + i);
  main().innerHTML = `<h2>Round ${round} · ${esc(L.stage)} · ${esc(L.model_version)} <span class="muted">image ${esc(im.key)} (${W}×${H}) · ${L.progress.done}/${L.progress.queued} submitted · decoder in the ${dec ? "browser" : "server"}${probeNote(window.__decoderChoice)}</span></h2>
  <div class="annot">
    <div class="canvas-wrap"><canvas id="acv" width="${W}" height="${H}" data-decoder="${dec ? "browser" : "server"}"></canvas></div>
    <div class="panel">
      <p><b>Object ${"<span id=obj></span>"}</b> · <span id="nprompts">0 prompts</span> · <span id="lat" class="muted"></span></p>
      <div class="choices" id="choices"></div>
      <p><button id="b-undo">Undo <span class="kbd">z</span></button> <button id="b-clear">Clear <span class="kbd">c</span></button>
         <button id="b-accept" class="ok">Accept <span class="kbd">a</span></button></p>
      <p><button id="b-submit" class="ok">Submit image <span class="kbd">s</span></button> <button id="b-skip" class="no">Skip image <span class="kbd">k</span></button></p>
      <p class="muted">Left click: positive · right click or shift+click: negative · drag: box · 1-3: pick a mask · r: remove last accepted${S.prefilled.length ? " · pre-filled under the mouse: x remove, e correct (kept unless removed)" : ""}</p>
      <h3>Accepted (<span id="nacc">0</span>)</h3><div id="acclist"></div>
      ${S.prefilled.length ? `<h3>Pre-filled by the model (<span id="npre"></span>)</h3><div id="prelist"></div>` : ""}
    </div>
  </div>`;
  const cv = $("#acv"), ctx = cv.getContext("2d");
  const canvases = new Map();
  const cvOf = (id, box, rgb, a) => { const k = id + ":" + a; if (!canvases.has(k)) canvases.set(k, maskCanvas(box, rgb, a)); return canvases.get(k); };
  let drag = null;
  const draw = () => {
    ctx.drawImage(img, 0, 0, W, H);
    S.prefilled.forEach((p) => ctx.drawImage(cvOf("p" + p.uid, p.box, [255, 200, 0], 0.25), p.box.x0, p.box.y0));
    S.accepted.forEach((a, i) => ctx.drawImage(cvOf("a" + a.uid, a.box, col(i), 0.35), a.box.x0, a.box.y0));
    if (S.preds) {
      const m = S.preds[S.choice];
      if (m.box.area) ctx.drawImage(cvOf(`cur${S.reqId}-${S.choice}`, m.box, [30, 144, 255], 0.5), m.box.x0, m.box.y0);
    }
    const b = drag && drag.moved ? drag.rect : S.box;
    if (b) { ctx.strokeStyle = "#1e90ff"; ctx.lineWidth = 2; ctx.setLineDash([6, 4]); ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]); ctx.setLineDash([]); }
    for (const p of S.points) { ctx.beginPath(); ctx.arc(p.x, p.y, 6, 0, 7); ctx.fillStyle = p.label ? "#00e676" : "#ff1744"; ctx.fill(); ctx.lineWidth = 2; ctx.strokeStyle = "#000"; ctx.stroke(); }
  };
  const refreshPanel = () => {
    $("#obj").textContent = S.accepted.length + 1;
    $("#nprompts").textContent = `${S.points.length} point${S.points.length === 1 ? "" : "s"}${S.box ? " + box" : ""}`;
    $("#lat").textContent = S.lastMs !== null ? `${S.lastMs.toFixed(0)} ms` : "";
    $("#choices").innerHTML = S.preds && S.preds.length > 1 ? "Masks: " + S.preds.map((p, i) => `<button data-choice="${i}" class="${i === S.choice ? "sel" : ""}">${i + 1}: IoU ${p.score.toFixed(2)}</button>`).join(" ") : "";
    $("#nacc").textContent = S.accepted.length;
    $("#acclist").innerHTML = S.accepted.map((a, i) => `<div><span class="swatch" style="background:rgb(${col(i)})"></span> mask ${i + 1} · area ${a.box.area} · ${a.clicks} clicks <button data-remove="${a.uid}">remove</button></div>`).join("");
    if ($("#prelist")) {
      $("#npre").textContent = S.prefilled.length;
      $("#prelist").innerHTML = S.prefilled.map((p) => `<div><span class="swatch" style="background:rgb(255,200,0)"></span> ${esc(p.uid)} · area ${p.box.area} · IoU ${fmt(p.score, 2)} <span class="muted">kept</span> <button data-remove="${p.uid}">remove</button> <button data-correct="${p.uid}">correct</button></div>`).join("");
    }
  };
  const body = (extra) => ({lease_id: S.leaseId, key: S.key, ...extra});
  const shown = (t0, reqId) => {
    cv.dataset.masks = String(S.preds.length);
    cv.dataset.area = String(S.preds[S.choice].box.area);
    draw(); refreshPanel();
    // painted: after the next frame
    if (t0 !== undefined) requestAnimationFrame(() => setTimeout(() => {
      if (S.reqId === reqId) { S.lastMs = performance.now() - t0; window.__clickLatencies.push(S.lastMs); cv.dataset.clicks = String(window.__clickLatencies.length); refreshPanel(); }
    }, 0));
  };
  const prompt = async (t0) => {
    if (!S.points.length && !S.box) { S.preds = null; draw(); refreshPanel(); return; }
    const reqId = (S.reqId || 0) + 1; S.reqId = reqId;
    if (S.dec) {
      try {
        const preds = await S.dec.decode(S.object, S.points.slice(), S.box && S.box.slice());
        if (S.reqId !== reqId) return;  // a newer prompt is on its way
        S.choice = preds.reduce((b, p, i) => (p.score > preds[b].score ? i : b), 0);
        // only the shown mask now; the other choices when picked
        S.preds = preds.map((p, i) => ({score: p.score, low: p.low, box: i === S.choice ? S.dec.mask(p.low) : null}));
        shown(t0, reqId);
      } catch (e) { toast(e.message, true); }
      return;
    }
    if (S.inflight) { S.pending = t0 ?? performance.now(); return; }  // one request at a time
    S.inflight = true;
    try {
      const r = await api(`/api/annotate/${round}/predict`, {body: body({object: S.object, points: S.points, box: S.box})});
      if (S.reqId === reqId) {
        S.preds = r.masks.map((m) => ({...m, box: rleDecodeBox(m.rle, r.height, r.width)}));
        S.choice = r.best;
        shown(t0, reqId);
      }
    } catch (e) { toast(e.message, true); }
    S.inflight = false;
    if (S.pending !== undefined) { const t = S.pending; S.pending = undefined; prompt(t); }
  };
  const pick = (i) => {
    S.choice = i;
    const p = S.preds[i];
    if (!p.box) p.box = S.dec.mask(p.low);
    cv.dataset.area = String(p.box.area); draw(); refreshPanel();
  };
  const clear = () => { S.points = []; S.box = null; S.preds = null; S.replaces = null; draw(); refreshPanel(); };
  const undo = () => { if (S.points.length) S.points.pop(); else S.box = null; prompt(); };
  const accept = async () => {
    if (!S.preds) { toast("click on an object first", true); return; }
    const seconds = (performance.now() - S.tStart) / 1000;
    try {
      S.acceptKey = S.acceptKey || idempotencyKey();  // a retried accept is the same accept
      const r = await api(`/api/annotate/${round}/accept`, {body: body({object: S.object, points: S.points, box: S.box, choice: S.choice, seconds: Math.min(3600, seconds), replaces: S.replaces, idempotency_key: S.acceptKey})});
      S.acceptKey = null;
      S.accepted.push({uid: r.uid, box: rleDecodeBox(r.rle, H, W), clicks: r.clicks});
      S.object = (S.object + 1) % (L.max_objects || 200); S.tStart = performance.now();
      if (S.dec) S.dec.objects.delete(S.object);  // ids are reused: start that one afresh
      toast(`accepted mask ${S.accepted.length} (${r.clicks} clicks, ${seconds.toFixed(1)} s)`);
      clear();
    } catch (e) { toast(e.message, true); }
  };
  const removeMask = async (uid) => {
    try {
      await api(`/api/annotate/${round}/remove`, {body: body({uid})});
      S.accepted = S.accepted.filter((a) => a.uid !== uid);
      S.prefilled = S.prefilled.filter((p) => p.uid !== uid);
      draw(); refreshPanel();
    } catch (e) { toast(e.message, true); }
  };
  const finish = async (skip) => {
    if (!skip && (S.points.length || S.box) && !confirm("The current object is not accepted. Submit anyway?")) return;
    const reason = skip ? (window.prompt("Why skip this image?", "") ?? null) : "";
    if (reason === null) return;
    try {
      const r = await api(`/api/annotate/${round}/${skip ? "skip" : "submit"}`, {body: body({reason})});
      toast(`${skip ? "skipped" : "submitted"} ${r.key}${r.shard_written ? " · shard written" : ""}${r.round_complete ? " · round complete" : ""}`);
      annotateRound(round);
    } catch (e) { toast(e.message, true); }
  };
  const toImg = (ev) => { const r = cv.getBoundingClientRect(); return [Math.min(W - 1, Math.max(0, (ev.clientX - r.left) * W / r.width)), Math.min(H - 1, Math.max(0, (ev.clientY - r.top) * H / r.height))]; };
  cv.addEventListener("contextmenu", (ev) => ev.preventDefault());
  cv.addEventListener("mousedown", (ev) => { const [x, y] = toImg(ev); drag = {x, y, button: ev.button, shift: ev.shiftKey, moved: false, rect: null}; });
  cv.addEventListener("mousemove", (ev) => {
    if (!drag) {  // hover over a pre-filled mask: x removes it, e corrects it
      const [hx, hy] = toImg(ev).map(Math.floor);
      S.hoverPre = S.prefilled.find((p) => { const b = p.box, lx = hx - b.x0, ly = hy - b.y0; return lx >= 0 && ly >= 0 && lx < b.w && ly < b.h && b.bits[ly * b.w + lx]; }) || null;
      return;
    }
    const [x, y] = toImg(ev);
    if (Math.abs(x - drag.x) + Math.abs(y - drag.y) > 8 && drag.button === 0) {
      drag.moved = true;
      drag.rect = [Math.min(x, drag.x), Math.min(y, drag.y), Math.max(x, drag.x), Math.max(y, drag.y)];
      draw();
    }
  });
  cv.addEventListener("mouseup", (ev) => {
    if (!drag) return;
    const d = drag; drag = null;
    if (d.moved && d.rect) { S.box = d.rect.map((v) => Math.round(v)); S.box[2] = Math.min(W, Math.max(S.box[2], S.box[0] + 1)); S.box[3] = Math.min(H, Math.max(S.box[3], S.box[1] + 1)); }
    else S.points.push({x: Math.round(d.x), y: Math.round(d.y), label: d.button === 2 || d.shift ? 0 : 1});
    prompt(ev.timeStamp);
  });
  $(".annot").addEventListener("click", (ev) => {
    const c = ev.target.closest("button[data-choice]");
    if (c) { pick(+c.dataset.choice); return; }
    const rm = ev.target.closest("button[data-remove]");
    if (rm) { removeMask(rm.dataset.remove); return; }
    const co = ev.target.closest("button[data-correct]");
    if (co) correctPre(S.prefilled.find((q) => q.uid === co.dataset.correct));
  });
  const correctPre = (p) => {
    if (!p) return;
    removeMask(p.uid).then(() => {
        clear();
        const b = p.box;
        S.replaces = p.uid;
        S.box = [b.x0, b.y0, Math.min(W, b.x0 + b.w), Math.min(H, b.y0 + b.h)];
        prompt();
      });
  };
  $("#b-undo").onclick = undo; $("#b-clear").onclick = clear; $("#b-accept").onclick = accept;
  $("#b-submit").onclick = () => finish(false); $("#b-skip").onclick = () => finish(true);
  document.onkeydown = (ev) => {
    if (ev.target.tagName === "INPUT" || !A.state) return;
    const k = ev.key.toLowerCase();
    if (k === "a" || k === "enter") { ev.preventDefault(); accept(); }
    else if (k === "z") undo();
    else if (k === "c" || k === "escape") clear();
    else if (k === "s") finish(false);
    else if (k === "k") finish(true);
    else if (k === "r" && S.accepted.length) removeMask(S.accepted[S.accepted.length - 1].uid);
    else if (k === "x" && S.hoverPre) { removeMask(S.hoverPre.uid); S.hoverPre = null; }
    else if (k === "e" && S.hoverPre) { correctPre(S.hoverPre); S.hoverPre = null; }
    else if (["1", "2", "3"].includes(k) && S.preds && S.preds.length > +k - 1) pick(+k - 1);
  };
  if (A.timer) clearInterval(A.timer);
  A.timer = setInterval(() => api(`/api/annotate/${round}/renew`, {body: body({})}).catch((e) => toast(e.message, true)), 60000);
  draw(); refreshPanel();
}
