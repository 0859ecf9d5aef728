"""The report page's own style and script, inlined so that the page opens with no network.

The script draws each gallery image's keep masks from the bit-packed bytes of the metadata (a token that ran is
clear, one left out is shaded), lets a click on a stage show that stage, enlarges an image on click, and records
on each image the kept count it drew per stage (`data-drawn-kept`), so that a test can hold them against the
metadata.
"""

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 16px 48px; color: #222; }
h1 { font-size: 22px; margin: 20px 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 3px 10px 3px 0; text-align: left;
  vertical-align: top; } th { color: #555; font-weight: 600; }
.muted { color: #777; } .charts { display: flex; flex-wrap: wrap; gap: 12px; } .chart { flex: 1 1 520px; }
.chart svg { max-width: 100%; height: auto; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
.item { font-size: 12px; margin: 0; } .frame { position: relative; cursor: zoom-in; line-height: 0; }
.frame img, .frame canvas { width: 100%; image-rendering: pixelated; }
.frame canvas { position: absolute; left: 0; top: 0; height: 100%; pointer-events: none; }
.chips { margin: 4px 0; display: flex; flex-wrap: wrap; gap: 3px; }
.chip { border: 1px solid #bbb; border-radius: 9px; padding: 0 6px; cursor: pointer; background: #fff;
  font-size: 11px; }
.chip.on { background: #4c72b0; color: #fff; border-color: #4c72b0; }
.caption { word-break: break-word; } pre { background: #f6f6f6; padding: 8px; overflow: auto; font-size: 12px; }
#lightbox { display: none; position: fixed; inset: 0; background: rgba(0,0,0,.85); z-index: 9; cursor: zoom-out;
  align-items: center; justify-content: center; flex-direction: column; color: #eee; }
#lightbox.open { display: flex; } #lightbox .frame { width: min(90vw, 80vh); cursor: zoom-out; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 4px; }
.pair img { width: 100%; image-rendering: pixelated; }
"""

SCRIPT = """
function maskBits(b64, n) {
  const raw = atob(b64), out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (raw.charCodeAt(i >> 3) >> (7 - (i & 7))) & 1;
  return out;
}
function drawMask(canvas, mask) {
  const bits = maskBits(mask.bits, mask.h * mask.w), ctx = canvas.getContext("2d");
  canvas.width = mask.w; canvas.height = mask.h;
  const img = ctx.createImageData(mask.w, mask.h);
  let kept = 0;
  for (let i = 0; i < bits.length; i++) { kept += bits[i]; if (!bits[i]) img.data[4 * i + 3] = 150; }
  ctx.putImageData(img, 0, 0);
  return kept;
}
function clearMask(canvas) { canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height); }
const items = JSON.parse(document.getElementById("gallery-data").textContent);
const box = document.getElementById("lightbox");
function show(item, figure, stage) {
  figure.querySelectorAll(".chip").forEach(c => c.classList.toggle("on", c.dataset.stage === String(stage)));
  const mask = item.masks.find(m => m.stage === stage), canvas = figure.querySelector("canvas");
  if (mask) drawMask(canvas, mask); else clearMask(canvas);
  figure.dataset.shown = stage;
}
document.querySelectorAll(".item").forEach((figure, index) => {
  const item = items[index], drawn = {};
  for (const mask of item.masks) drawn[mask.stage] = drawMask(document.createElement("canvas"), mask);
  figure.dataset.drawnKept = JSON.stringify(drawn);
  figure.querySelectorAll(".chip").forEach(chip => chip.addEventListener("click", () =>
    show(item, figure, chip.dataset.stage === "none" ? null : Number(chip.dataset.stage))));
  if (item.masks.length) show(item, figure, item.masks[item.masks.length - 1].stage);
  figure.querySelector(".frame").addEventListener("click", () => {
    const large = box.querySelector("img"), canvas = box.querySelector("canvas");
    large.src = figure.querySelector("img").dataset.large;
    const stage = figure.dataset.shown === "null" ? null : Number(figure.dataset.shown);
    const mask = item.masks.find(m => m.stage === stage);
    if (mask) drawMask(canvas, mask); else clearMask(canvas);
    box.querySelector(".caption").textContent = figure.querySelector(".caption").textContent +
      (mask ? ` (stage ${stage}: ${mask.kept} of ${mask.h * mask.w} tokens ran)` : "");
    box.classList.add("open");
  });
});
box.addEventListener("click", () => box.classList.remove("open"));
document.addEventListener("keydown", e => { if (e.key === "Escape") box.classList.remove("open"); });
document.body.dataset.ready = "1";
"""
