"""`structmar app`: a page in the browser where a user draws boxes, tags them, types a caption and gets images.

The page is a front end to the calls of `structmar sample`: the boxes drawn on the canvas become a layout
spec (the JSON `structmar sample --layout` reads, parsed by `sample.parse_layout_spec`, so a bad box gets the
same one-line reason), the model is the one `sampler.load_sampler` loads, and a request samples as
`sampler.sample_layout` does (one generator seeded with the request's seed): the spec the page exports,
sampled by the command the page shows, gives the same images. With `--planner`, a "Plan from caption" button
fills the canvas with the layout the planner plans for the caption (as `structmar sample --prompt --planner`
does), for the user to edit. Gradio and gradio_image_annotation come with the `app` extra
(`pip install structmar[app]`).

Safety: it listens on 127.0.0.1 unless told otherwise and makes no share link; the canvas is the app's own blank
image (the handlers take only its boxes) and a layout is imported as JSON text, so no path sent from the browser
is read (Gradio itself serves and accepts files only from its own cache); each request is bounded
(boxes, text length, images, AR steps) and refused with its reason in the page; one request samples at a time
(Gradio's queue), so concurrent users wait instead of running the model out of memory.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from structmar import atomic
from structmar.config import CFG_SCHEDULES, AppConfig, SamplingConfig
from structmar.figures import draw_layout, to_pil
from structmar.sample import LayoutSpec, _is_number, parse_layout_spec
from structmar.sampler import Sampler

SPEC_DIGITS = 4  # decimals of the exported normalised coordinates: a tenth of a pixel on a 1000-px canvas
QUEUE_SIZE = 16  # requests waiting for the model; more are refused at once rather than left to time out


class RequestError(ValueError):
    """A request the page refuses; its message is shown in the page."""


@dataclass
class Bounds:
    """What one request may ask for: the model's boxes, and the app's limits."""

    max_objects: int
    max_images: int
    max_num_iter: int
    max_text: int

    @classmethod
    def of(cls, gen: Sampler, app: AppConfig) -> Bounds:
        return cls(gen.model.cfg.max_objects, app.max_images, app.max_num_iter, app.max_text)


@dataclass
class Request:
    """One press of Generate: a layout, how many images, the seed and the sampling knobs."""

    spec: LayoutSpec
    num_images: int
    seed: int
    sampling: SamplingConfig


# ---- the canvas and the layout spec ------------------------------------------------------------------


def canvas_spec(caption: str, boxes: list[dict], canvas: int) -> dict:
    """The layout spec (normalised units) of the annotator's boxes: dicts with xmin..ymax in canvas pixels and a
    label, the box's tag. Nothing is checked here: `parse_request` parses the spec as `structmar sample` does."""
    def norm(v) -> float:
        return round(float(v) / canvas, SPEC_DIGITS)

    return {"caption": caption, "boxes": [{"box": [norm(b["xmin"]), norm(b["ymin"]), norm(b["xmax"]), norm(b["ymax"])],
                                           "tag": b.get("label") or ""} for b in boxes]}


def spec_text(spec: dict) -> str:
    """A layout spec as JSON with one line per box."""
    boxes = ",\n".join(f"    {json.dumps(b)}" for b in spec["boxes"])
    boxes = f"[\n{boxes}\n  ]" if boxes else "[]"
    return f'{{\n  "caption": {json.dumps(spec["caption"])},\n  "boxes": {boxes}\n}}\n'


def spec_to_canvas(text: str, canvas: int) -> tuple[str, list[dict]]:
    """A layout spec's JSON text (normalised or pixel units) -> its caption and the annotator's boxes."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"layout spec: not valid JSON ({e})") from None
    spec = parse_layout_spec(raw, source="layout spec")
    boxes = [dict(xmin=x0 * canvas, ymin=y0 * canvas, xmax=x1 * canvas, ymax=y1 * canvas, label=tag)
             for (x0, y0, x1, y1), tag in zip(spec.boxes.astype(float).tolist(), spec.tags)]
    return spec.caption, boxes


def plan_canvas(planner, gen: Sampler, caption: str, bounds: Bounds, canvas: int) -> tuple[list[dict], str]:
    """The annotator's boxes of the layout `planner` plans for `caption` (at most the model's max_objects, tagged
    with their categories' names) and the page's message, with the notice of a caption the text encoder cuts."""
    from structmar.planner import layout_spec_json, plan_captions, truncation_notices

    if not caption.strip():
        raise RequestError("caption: missing; type what the image shows, then plan")
    if len(caption) > bounds.max_text:
        raise RequestError(f"caption: {len(caption)} characters, more than this page's {bounds.max_text}")
    plan = plan_captions(planner, gen.text_encoder, [caption], max_boxes=bounds.max_objects, notify=False)[0]
    _, boxes = spec_to_canvas(json.dumps(layout_spec_json(caption, plan)), canvas)
    notices = "".join(f" Notice: {line}." for line in truncation_notices(gen.text_encoder, [caption]))
    return boxes, f"Planned {len(boxes)} boxes from the caption: edit them, then Generate.{notices}"


def load_app_planner(path: str, gen: Sampler):
    """The planner of `--planner`, refused (one line naming the difference) when its categories are not those the
    image model records."""
    from structmar.planner import check_categories, load_planner

    planner = load_planner(path, gen.device)
    check_categories(planner, gen.categories or None, "the image model")
    return planner


def parse_request(bounds: Bounds, spec: dict, num_images, seed, sampling: SamplingConfig) -> Request:
    """Check one request against `bounds` and parse its spec; a RequestError names what is wrong."""
    boxes = spec.get("boxes", [])
    if len(boxes) > bounds.max_objects:
        raise RequestError(f"{len(boxes)} boxes: this model takes at most {bounds.max_objects} (its max_objects); "
                           "remove a box")
    caption = spec.get("caption", "")
    if not caption.strip():
        raise RequestError("caption: missing; type what the image shows")
    texts = [("caption", caption)] + [(f"boxes[{i}].tag", b.get("tag") or "") for i, b in enumerate(boxes)]
    for where, text in texts:
        if len(text) > bounds.max_text:
            raise RequestError(f"{where}: {len(text)} characters, more than this page's {bounds.max_text}")
    for name, value, top in (("images", num_images, bounds.max_images), ("AR steps", sampling.num_iter,
                                                                         bounds.max_num_iter)):
        if not (_is_whole(value) and 1 <= value <= top):
            raise RequestError(f"{name}: {value} is not a whole number in [1, {top}] (this page's bound)")
    if not (_is_whole(seed) and 0 <= seed < 2**63):
        raise RequestError(f"seed: {seed} is not a whole number in [0, 2^63)")
    for name, value in (("CFG scale", sampling.cfg), ("temperature", sampling.temperature)):
        if not _is_number(value):
            raise RequestError(f"{name}: {value} is not a number")
    sampling = SamplingConfig(int(sampling.num_iter), float(sampling.cfg), sampling.cfg_schedule,
                              float(sampling.temperature))
    try:
        sampling.validate()
        parsed = parse_layout_spec(spec, source="layout")
    except ValueError as e:
        raise RequestError(str(e)) from None
    return Request(parsed, int(num_images), int(seed), sampling)


def _is_whole(value) -> bool:
    return _is_number(value) and value == int(value)


def sample_command(gen: Sampler, request: Request, layout: str = "layout.json", clip_path: str | None = None,
                   vae_path: str | None = None) -> str:
    """The `structmar sample` command that samples the request's images from its exported spec file `layout`."""
    s = request.sampling
    args = ["structmar", "sample", "--checkpoint", gen.checkpoint, "--layout", layout, "--out", "samples",
            "--seed", str(request.seed), "--num_images", str(request.num_images),
            "--batch_size", str(request.num_images), "--num_iter", str(s.num_iter), "--cfg", repr(s.cfg),
            "--cfg_schedule", s.cfg_schedule, "--temperature", repr(s.temperature),
            "--ema" if gen.ema else "--no-ema"]
    args += ["--clip_path", clip_path] if clip_path else []
    args += ["--vae_path", vae_path] if vae_path else []
    return shlex.join(args)


# ---- sampling ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def counting_steps(gen: Sampler, on_step):
    """Calls on_step(k) after each AR step of the sampling run inside it.

    The generation loop takes no callback; the model's decoder norm runs once per AR step (one backbone pass
    over the conditional and unconditional halves together), so a forward hook on it counts the steps.
    """
    count = 0

    def hook(*_):
        nonlocal count
        count += 1
        on_step(count)

    handle = gen.model.decoder_norm.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def generate(gen: Sampler, request: Request, on_step=lambda k: None) -> tuple[list, list]:
    """The request's images (PIL, the model's resolution) and the same images with their boxes and tags drawn.

    One batch from one generator seeded with the request's seed: what `structmar sample` draws with
    --batch_size >= --num_images.
    """
    spec, n = request.spec, request.num_images
    generator = torch.Generator(device=gen.device).manual_seed(request.seed)
    batch = gen.condition([spec.caption] * n, [spec.boxes] * n, [spec.tags] * n)
    with counting_steps(gen, on_step):
        images = gen.generate(batch, generator, request.sampling)
    return [to_pil(im) for im in images], [draw_layout(im, spec.boxes, spec.tags) for im in images]


# ---- the page ----------------------------------------------------------------------------------------


def _gradio():
    """gradio and the annotator, imported with Gradio's analytics and version check off: the page phones nowhere."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio
    import gradio_image_annotation

    return gradio, gradio_image_annotation.image_annotator


def read_categories(gen: Sampler, shard_dir: str | None) -> list[str]:
    """The tag menu, by category id: a shard directory's manifest's names if one is given, else those the
    export recorded (none for an export that records none: tags are then free text only)."""
    if shard_dir is None:
        categories = gen.categories
    else:
        from structmar.shards import read_manifest

        categories = {int(k): v for k, v in read_manifest(shard_dir)["categories"].items()}
    return [categories[k] for k in sorted(categories)]


def build_app(gen: Sampler, app: AppConfig, categories: list[str], planner=None):
    """The page (a gradio.Blocks, queued), serving `gen` within `app`'s bounds; with `planner`, the page also
    plans a layout from the caption."""
    gr, image_annotator = _gradio()
    bounds = Bounds.of(gen, app)
    cfg = gen.model.cfg
    blank = np.full((app.canvas, app.canvas, 3), 255, dtype=np.uint8)
    exports = tempfile.mkdtemp(prefix="structmar-app-")
    atexit.register(shutil.rmtree, exports, True)  # the exported specs' downloads live as long as the server
    d = SamplingConfig()

    def canvas_value(boxes: list[dict]) -> dict:
        return {"image": blank, "boxes": boxes}

    def boxes_of(annotation) -> list[dict]:
        # only the boxes: the image the browser sends back is never opened (the canvas is the app's own)
        return (annotation or {}).get("boxes") or []

    def export(caption, annotation):
        spec = canvas_spec(caption or "", boxes_of(annotation), app.canvas)
        text = spec_text(spec)
        path = os.path.join(tempfile.mkdtemp(dir=exports), "layout.json")
        atomic.write_text(path, text)
        return text, path, f"Exported {len(spec['boxes'])} boxes: sample them with `structmar sample --layout " \
                           "layout.json` (the command below, after Generate, repeats these images)."

    def import_(text):
        try:
            caption, boxes = spec_to_canvas(text or "", app.canvas)
        except ValueError as e:
            return gr.skip(), gr.skip(), f"**Not imported.** {e}"
        return caption, canvas_value(boxes), f"Imported {len(boxes)} boxes."

    def plan(caption):
        try:
            boxes, message = plan_canvas(planner, gen, caption or "", bounds, app.canvas)
        except RequestError as e:
            return gr.skip(), f"**Not planned.** {e}"
        return canvas_value(boxes), message

    tracker = gr.Progress()  # Gradio finds it among the handler's defaults and shows it in the page

    def run(caption, annotation, num_images, seed, guidance, schedule, temperature, num_iter, progress=tracker):
        spec = canvas_spec(caption or "", boxes_of(annotation), app.canvas)
        try:
            request = parse_request(bounds, spec, num_images, seed,
                                    SamplingConfig(num_iter, guidance, schedule, temperature))
        except RequestError as e:
            return [], [], f"**Not generated.** {e}", ""
        steps = request.sampling.num_iter
        progress((0, steps), desc="AR steps", unit="steps")
        images, overlays = generate(gen, request, lambda k: progress((k, steps), desc="AR steps", unit="steps"))
        command = sample_command(gen, request, clip_path=app.clip_path, vae_path=app.vae_path)
        return overlays, images, f"Generated {len(images)} images (seed {request.seed}).", command

    with gr.Blocks(title="structmar", analytics_enabled=False) as page:
        gr.Markdown(f"## structmar: draw a layout, get images\n`{gen.checkpoint}`: {cfg.preset} preset, "
                    f"{cfg.image_size} px, {cfg.tokenizer} tokens; up to {bounds.max_objects} boxes, "
                    f"{bounds.max_images} images and {bounds.max_num_iter} AR steps per request. Drag on the "
                    "canvas to draw a box and name its tag (a category from the list or any text)"
                    + ("; or type a caption and press Plan from caption." if planner is not None else
                       " (`structmar app --planner PLANNER` adds a Plan from caption button)."))
        with gr.Row():
            with gr.Column():
                canvas = image_annotator(canvas_value([]), label="Layout", label_list=categories, sources=[],
                                         show_clear_button=False, show_download_button=False,
                                         show_share_button=False, show_remove_button=True, elem_id="canvas")
                caption = gr.Textbox(label="Caption", max_length=bounds.max_text, elem_id="caption")
                if planner is not None:
                    plan_button = gr.Button("Plan from caption", elem_id="plan")
                with gr.Row():
                    num_images = gr.Slider(1, bounds.max_images, value=min(4, bounds.max_images), step=1,
                                           label="Images", elem_id="num_images")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed")
                with gr.Row():
                    guidance = gr.Number(d.cfg, label="CFG scale (1: off)", elem_id="cfg")
                    schedule = gr.Dropdown(list(CFG_SCHEDULES), value=d.cfg_schedule, label="CFG schedule")
                    temperature = gr.Number(d.temperature, minimum=0.01, label="Temperature", elem_id="temperature")
                    num_iter = gr.Slider(1, bounds.max_num_iter, value=min(d.num_iter, bounds.max_num_iter), step=1,
                                         label="AR steps", elem_id="num_iter")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                overlays = gr.Gallery(label="With the layout", format="png", columns=4, elem_id="overlays")
                images = gr.Gallery(label="Images", format="png", columns=4, elem_id="images")
                command = gr.Textbox(label="The same images with `structmar sample` (from the exported layout.json)",
                                     interactive=False, elem_id="command")
                with gr.Accordion("Layout spec (the JSON `structmar sample --layout` reads)", open=False):
                    spec_box = gr.Code(language="json", interactive=True, elem_id="spec")
                    with gr.Row():
                        export_button = gr.Button("Export layout", elem_id="export")
                        import_button = gr.Button("Import layout", elem_id="import")
                    spec_file = gr.File(label="layout.json", interactive=False, elem_id="spec_file")

        go.click(run, [caption, canvas, num_images, seed, guidance, schedule, temperature, num_iter],
                 [overlays, images, status, command], concurrency_limit=1, concurrency_id="model")
        export_button.click(export, [caption, canvas], [spec_box, spec_file, status], queue=False)
        import_button.click(import_, [spec_box], [caption, canvas, status], queue=False)
        if planner is not None:  # in Generate's queue: one model call at a time
            plan_button.click(plan, [caption], [canvas, status], concurrency_limit=1, concurrency_id="model")
    return page.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)


def launch_options(app: AppConfig) -> dict:
    """How the page is served: on app.host:app.port, no share link, no server-side rendering (it would need Node),
    and fonts from the browser's own (Gradio's default theme fetches web fonts)."""
    gr, _ = _gradio()
    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return dict(server_name=app.host, server_port=app.port, share=False, ssr_mode=False, pwa=False,
                mcp_server=False, show_error=False,
                theme=gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"]))


def serve(app: AppConfig) -> None:
    """`structmar app`: load the model as `structmar sample` does and serve the page until interrupted."""
    from structmar.sampler import load_sampler, resolve_device

    app.validate()
    missing = [name for name in ("gradio", "gradio_image_annotation") if importlib.util.find_spec(name) is None]
    if missing:  # said before the model loads; importing Gradio itself takes seconds, so it waits for that
        raise ValueError(f"structmar app needs {' and '.join(missing)}: pip install 'structmar[app]'")
    given = {k: getattr(app, k) for k in ("clip_path", "vae_path") if getattr(app, k) is not None}
    gen = load_sampler(app.checkpoint, device=resolve_device(app.device), **given)
    planner = None if app.planner is None else load_app_planner(app.planner, gen)
    categories = read_categories(gen, app.categories)
    print(f"structmar app: serving {gen.checkpoint} on http://{app.host}:{app.port} (Ctrl-C stops it)", flush=True)
    build_app(gen, app, categories, planner).launch(**launch_options(app))
