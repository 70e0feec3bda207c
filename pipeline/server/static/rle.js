// COCO compressed RLE (pycocotools' string counts) decoding, column-major like pycocotools.
"use strict";

function rleCounts(s) {
  const cnts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (cnts.length > 2) x += cnts[cnts.length - 2];
    cnts.push(x);
  }
  return cnts;
}

// Decode to {x0, y0, w, h, bits: Uint8Array(w*h) row-major over the bbox, area}.
function rleDecodeBox(counts, height, width) {
  const cnts = typeof counts === "string" ? rleCounts(counts) : counts;
  let pos = 0, x0 = width, y0 = height, x1 = -1, y1 = -1, area = 0;
  const runs = [];
  for (let i = 0; i < cnts.length; i++) {
    const n = cnts[i];
    if (i % 2 === 1 && n > 0) {
      runs.push(pos, pos + n);
      area += n;
      const ca = Math.floor(pos / height), cb = Math.floor((pos + n - 1) / height);
      if (ca < x0) x0 = ca;
      if (cb > x1) x1 = cb;
      if (cb > ca) { y0 = 0; y1 = height - 1; }
      else {
        const ra = pos % height, rb = (pos + n - 1) % height;
        if (ra < y0) y0 = ra;
        if (rb > y1) y1 = rb;
      }
    }
    pos += n;
  }
  if (area === 0) return {x0: 0, y0: 0, w: 0, h: 0, bits: new Uint8Array(0), area: 0};
  const w = x1 - x0 + 1, h = y1 - y0 + 1;
  const bits = new Uint8Array(w * h);
  for (let r = 0; r < runs.length; r += 2) {
    for (let i = runs[r]; i < runs[r + 1]; i++) {
      const x = Math.floor(i / height), y = i - x * height;
      bits[(y - y0) * w + (x - x0)] = 1;
    }
  }
  return {x0, y0, w, h, bits, area};
}

// A canvas of the mask's bbox filled with rgba colour, plus its outline in the same colour.
function maskCanvas(box, rgb, alpha) {
  const c = document.createElement("canvas");
  c.width = Math.max(1, box.w); c.height = Math.max(1, box.h);
  if (!box.area) return c;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(box.w, box.h);
  const a = Math.round(alpha * 255);
  const {w, h, bits} = box;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!bits[i]) continue;
      const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
        !bits[i - 1] || !bits[i + 1] || !bits[i - w] || !bits[i + w];
      const o = i * 4;
      img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2];
      img.data[o + 3] = edge ? 255 : a;
    }
  }
  ctx.putImageData(img, 0, 0);
  return c;
}

function colorOf(id) {
  let h = 2166136261;
  for (let i = 0; i < id.length; i++) { h ^= id.charCodeAt(i); h = Math.imul(h, 16777619); }
  const hue = ((h >>> 0) % 360) / 360, s = 0.85, v = 1;
  const i = Math.floor(hue * 6), f = hue * 6 - i, p = v * (1 - s), q = v * (1 - f * s),
    t = v * (1 - (1 - f) * s);
  const [r, g, b] = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
  return [Math.round(r * 255), Math.round(g * 255), Math.round(b * 255)];
}
