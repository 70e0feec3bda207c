// SAM's prompt encoder + mask decoder in the browser (onnxruntime-web, wasm), on the image
// embedding fetched once per image: a click needs no round trip. It mirrors the server's
// OnnxDecoder (sam_session.py) and its canonical click chain (prompts.py: each click's mask input
// is the best low-res mask of the same prompts without the last click), so the server recomputes
// exactly this mask when it is accepted.
"use strict";

const DECODERS = new Map();  // model version -> Promise<BrowserDecoder>

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src; s.onload = resolve; s.onerror = () => reject(new Error(`cannot load ${src}`));
    document.head.appendChild(s);
  });
}

function f16ToF32(h) {
  const s = (h & 0x8000) ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e === 0) return s * m * 5.960464477539063e-8;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * Math.pow(2, e - 15);
}

// cv2.resize INTER_LINEAR taps along one axis: for each destination index, source i0, i1, w1
function taps(src, dst) {
  const i0 = new Int32Array(dst), i1 = new Int32Array(dst), w = new Float32Array(dst);
  const scale = src / dst;
  for (let d = 0; d < dst; d++) {
    let x = (d + 0.5) * scale - 0.5, a = Math.floor(x), f = x - a;
    if (a < 0) { a = 0; f = 0; }
    if (a >= src - 1) { a = src - 1; f = 0; }
    i0[d] = a; i1[d] = Math.min(a + 1, src - 1); w[d] = f;
  }
  return {i0, i1, w};
}

// bilinear resize of a row-major (h x w) float map to the (fullH x fullW) grid, computed only on
// rows [r0, r1) and columns [0, W) (W <= fullW: the crop SAM takes of its padded frame); rows
// outside stay stale. Buffers are reused between calls (no garbage per click).
const BUFS = new Map();
function buf(name, n) {
  let b = BUFS.get(name);
  if (!b || b.length < n) { b = new Float32Array(n); BUFS.set(name, b); }
  return b;
}
const TAPS = new Map();
function tapsOf(src, dst) {
  const k = `${src}:${dst}`;
  if (!TAPS.has(k)) TAPS.set(k, taps(src, dst));
  return TAPS.get(k);
}
function resize(name, src, h, w, fullH, fullW, r0, r1, W) {
  const tx = tapsOf(w, fullW), ty = tapsOf(h, fullH);
  // source rows the destination rows need
  const s0 = ty.i0[r0], s1 = ty.i1[r1 - 1] + 1;
  const tmp = buf(name + ":tmp", h * W), dst = buf(name, fullH * W);
  for (let y = s0; y < s1; y++) {
    const row = y * w, out = y * W;
    for (let x = 0; x < W; x++) tmp[out + x] = src[row + tx.i0[x]] * (1 - tx.w[x]) + src[row + tx.i1[x]] * tx.w[x];
  }
  for (let y = r0; y < r1; y++) {
    const a = ty.i0[y] * W, b = ty.i1[y] * W, f = ty.w[y], out = y * W;
    for (let x = 0; x < W; x++) dst[out + x] = tmp[a + x] * (1 - f) + tmp[b + x] * f;
  }
  return dst;
}

// destination rows [r0, r1) whose taps reach source rows [s0, s1)
function rowsReaching(t, s0, s1) {
  let r0 = t.i0.length, r1 = 0;
  for (let d = 0; d < t.i0.length; d++) {
    if (t.i1[d] >= s0 && t.i0[d] < s1) { if (d < r0) r0 = d; r1 = d + 1; }
  }
  return [r0, Math.max(r0, r1)];
}

class BrowserDecoder {
  static load(round, version) {
    if (!DECODERS.has(version)) DECODERS.set(version, BrowserDecoder.create(round));
    return DECODERS.get(version);
  }

  static async create(round) {
    const info = await api(`/api/annotate/${round}/decoder`);
    if (!window.ort) await loadScript(info.ort);
    ort.env.wasm.wasmPaths = "/static/vendor/ort/";
    ort.env.wasm.numThreads = window.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    const sessions = {};
    for (const kind of ["multi", "single"]) {
      const r = await fetch(info.graphs[kind], {credentials: "same-origin"});
      if (!r.ok) throw new Error(`decoder graph ${kind}: ${r.status}`);
      sessions[kind] = await ort.InferenceSession.create(await r.arrayBuffer(), {executionProviders: ["wasm"], graphOptimizationLevel: "all"});
    }
    const dec = new BrowserDecoder(info, sessions);
    await dec.warmUp();
    return dec;
  }

  constructor(info, sessions) {
    this.info = info; this.sessions = sessions; this.emb = null; this.objects = new Map();
    this.timings = {run: [], mask: []};  // ms per decoder call / per upscaled mask
    const S = info.low_res;
    this.noMask = new ort.Tensor("float32", new Float32Array(S * S), [1, 1, S, S]);
  }

  async setImage(round, leaseId, key) {
    const r = await fetch(`/api/annotate/${round}/embedding?lease_id=${encodeURIComponent(leaseId)}&key=${encodeURIComponent(key)}`, {credentials: "same-origin"});
    if (!r.ok) throw new Error(`embedding: ${r.status}`);
    const shape = r.headers.get("X-Embedding-Shape").split(",").map(Number);
    [this.inH, this.inW] = r.headers.get("X-Input-Size").split(",").map(Number);
    [this.H, this.W] = r.headers.get("X-Original-Size").split(",").map(Number);
    const half = new Uint16Array(await r.arrayBuffer());
    const lut = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) lut[i] = f16ToF32(i);
    const f32 = new Float32Array(half.length);
    for (let i = 0; i < half.length; i++) f32[i] = lut[half[i]];
    this.emb = new ort.Tensor("float32", f32, shape);
    this.objects = new Map();
  }

  // the first calls of a wasm session are several times slower than the rest (kernels are
  // prepared on first use): make them before the person's first click
  async warmUp() {
    const [, C, S1, S2] = this.info.embedding_shape;
    this.emb = new ort.Tensor("float32", new Float32Array(C * S1 * S2), [1, C, S1, S2]);
    this.inW = this.W = this.inH = this.H = this.info.img_size;
    for (let i = 0; i < 3; i++) {
      await this.run([{x: 10, y: 10, label: 1}], null, null, true);
      await this.run([{x: 10, y: 10, label: 1}], null, this.noMask.data, false);
    }
    this.timings = {run: [], mask: []};
    this.emb = null;
  }

  // one decoder call: [{score, low}] (three with multimask, else one)
  async run(points, box, maskInput, multimask) {
    const sx = this.inW / this.W, sy = this.inH / this.H, S = this.info.low_res;
    const xy = [], lab = [];
    for (const p of points) { xy.push(p.x * sx, p.y * sy); lab.push(p.label); }
    if (box) { xy.push(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy); lab.push(2, 3); }
    else { xy.push(0, 0); lab.push(-1); }
    const n = lab.length;
    const feeds = {
      image_embeddings: this.emb,
      point_coords: new ort.Tensor("float32", Float32Array.from(xy), [1, n, 2]),
      point_labels: new ort.Tensor("float32", Float32Array.from(lab), [1, n]),
      mask_input: maskInput ? new ort.Tensor("float32", maskInput, [1, 1, S, S]) : this.noMask,
      has_mask_input: new ort.Tensor("float32", Float32Array.of(maskInput ? 1 : 0), [1]),
    };
    const boxOnly = box && !points.length && !maskInput;
    const t0 = performance.now();
    const out = await this.sessions[multimask || boxOnly ? "multi" : "single"].run(feeds);
    this.timings.run.push(performance.now() - t0);
    const scores = out.iou_predictions.data, low = out.low_res_masks.data;
    const idx = multimask ? [1, 2, 3] : [0];
    return idx.map((i) => ({score: scores[i], low: low.slice(i * S * S, (i + 1) * S * S)}));
  }

  static sig(points, box) { return JSON.stringify([points.map((p) => [p.x, p.y, p.label]), box]); }

  // the masks of a click sequence for one object, decoded canonically (prompts.decode)
  async decode(obj, points, box) {
    if (!this.objects.has(obj)) this.objects.set(obj, new Map());
    const hist = this.objects.get(obj);
    const first = box ? 0 : 1;
    let low = null, begin = first;
    for (let k = points.length - 1; k >= first; k--) {
      const known = hist.get(BrowserDecoder.sig(points.slice(0, k), box));
      if (known) { low = known; begin = k + 1; break; }
    }
    let preds = [];
    for (let k = begin; k <= points.length; k++) {
      const pts = points.slice(0, k);
      const multimask = !low && !box && k === 1;
      preds = await this.run(pts, box, low, multimask);
      let best = 0;
      preds.forEach((p, i) => { if (p.score > preds[best].score) best = i; });
      low = preds[best].low;
      hist.set(BrowserDecoder.sig(pts, box), low);
    }
    return preds;
  }

  // low-res logits -> the mask at the image size, as {x0, y0, w, h, bits, area} (rle.js boxes).
  // A bilinear value can pass the threshold only near a low-res value that does, so only the
  // rows around those are interpolated.
  mask(low) {
    const S = this.info.low_res, F = this.info.img_size, H = this.H, W = this.W;
    const t0 = performance.now(), thr = this.info.threshold;
    let lo = S, hi = -1;
    for (let y = 0; y < S; y++) {
      const row = y * S;
      for (let x = 0; x < S; x++) if (low[row + x] > thr) { if (y < lo) lo = y; hi = y; break; }
    }
    const empty = {x0: 0, y0: 0, w: 0, h: 0, bits: new Uint8Array(0), area: 0};
    if (hi < 0) { this.timings.mask.push(performance.now() - t0); return empty; }
    // frame rows from low-res rows [lo-1, hi+2), then image rows from those frame rows
    const [f0, f1] = rowsReaching(tapsOf(S, F), Math.max(0, lo - 1), Math.min(S, hi + 2));
    const fr0 = Math.min(f0, this.inH), fr1 = Math.min(f1, this.inH);
    // two rows of margin: the image rows below also read their neighbours' rows
    const up = resize("up", low, S, S, F, F, Math.max(0, fr0 - 2), Math.min(this.inH, fr1 + 2), this.inW);
    const [r0, r1] = rowsReaching(tapsOf(this.inH, H), fr0, fr1);
    if (r1 <= r0) { this.timings.mask.push(performance.now() - t0); return empty; }
    const full = resize("full", up, this.inH, this.inW, H, W, r0, r1, W);
    let x0 = W, y0 = H, x1 = -1, y1 = -1, area = 0;
    for (let y = r0; y < r1; y++) {
      const row = y * W;
      for (let x = 0; x < W; x++) {
        if (full[row + x] > thr) { area++; if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y; }
      }
    }
    if (!area) { this.timings.mask.push(performance.now() - t0); return empty; }
    const w = x1 - x0 + 1, h = y1 - y0 + 1, bits = new Uint8Array(w * h);
    for (let y = 0; y < h; y++) {
      const row = (y + y0) * W + x0;
      for (let x = 0; x < w; x++) bits[y * w + x] = full[row + x] > thr ? 1 : 0;
    }
    this.timings.mask.push(performance.now() - t0);
    return {x0, y0, w, h, bits, area};
  }
}
window.BrowserDecoder = BrowserDecoder;
