"""`structmar app`: request bounds, the layout spec's export and import, sampling as `structmar sample` does,
planning the canvas from the caption, and the page in a real browser (headless Chromium driven by Playwright) on a
tiny export."""

import json
import os
import shlex
import shutil
import socket
import tempfile

import numpy as np
import pytest
from PIL import Image

from structmar.app import (
    Bounds,
    RequestError,
    canvas_spec,
    generate,
    load_app_planner,
    parse_request,
    plan_canvas,
    read_categories,
    sample_command,
    spec_text,
    spec_to_canvas,
)
from structmar.cli import main
from structmar.config import AppConfig, SamplingConfig
from structmar.sampler import load_sampler

CANVAS = 500
BOXES = [dict(xmin=25, ymin=100, xmax=225, ymax=300, label="red circle"),
         dict(xmin=250, ymin=150, xmax=475, ymax=450, label="blue square")]
BOUNDS = Bounds(max_objects=2, max_images=4, max_num_iter=8, max_text=20)


def _request(caption="two shapes", boxes=BOXES, num_images=2, seed=0, **sampling):
    return parse_request(BOUNDS, canvas_spec(caption, boxes, CANVAS), num_images, seed,
                         SamplingConfig(**{"num_iter": 4, **sampling}))


@pytest.mark.parametrize("change, message", [
    (dict(boxes=BOXES + BOXES[:1]), "3 boxes: this model takes at most 2 (its max_objects)"),
    (dict(caption="  "), "caption: missing"),
    (dict(caption="x" * 21), "caption: 21 characters, more than this page's 20"),
    (dict(boxes=[BOXES[0], dict(BOXES[1], label="y" * 21)]), "boxes[1].tag: 21 characters"),
    (dict(boxes=[dict(BOXES[0], label="")]), "layout: boxes[0].tag: expected a non-empty string"),
    (dict(boxes=[dict(BOXES[0], xmin=300)]), "layout: boxes[0].box: x1 0.45 < x0 0.6"),
    (dict(num_images=5), "images: 5 is not a whole number in [1, 4]"),
    (dict(num_images=0), "images: 0 is not a whole number in [1, 4]"),
    (dict(num_images=None), "images: None"),
    (dict(num_iter=9), "AR steps: 9 is not a whole number in [1, 8]"),
    (dict(num_iter=2.5), "AR steps: 2.5 is not a whole number"),
    (dict(num_images=float("inf")), "images: inf is not a whole number"),
    (dict(seed=-1), "seed: -1 is not a whole number"),
    (dict(seed=float("nan")), "seed: nan is not a whole number"),
    (dict(cfg=None), "CFG scale: None is not a number"),
    (dict(temperature=float("nan")), "temperature: nan is not a number"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(cfg_schedule="cosine"), "cfg_schedule 'cosine' is not one of"),
])
def test_requests_out_of_bounds_are_refused_with_their_reason(change, message):
    with pytest.raises(RequestError) as err:
        _request(**change)
    assert message in str(err.value)


def test_a_request_in_bounds_is_the_spec_structmar_sample_reads():
    request = _request(num_images=3.0, seed=7.0, cfg=2, cfg_schedule="constant", num_iter=4.0)
    assert request.num_images == 3 and request.seed == 7 and type(request.sampling.num_iter) is int
    assert request.spec.caption == "two shapes"
    assert request.spec.tags == ["red circle", "blue square"]
    np.testing.assert_allclose(request.spec.boxes, [[0.05, 0.2, 0.45, 0.6], [0.5, 0.3, 0.95, 0.9]], rtol=1e-6)
    assert request.sampling == SamplingConfig(4, 2.0, "constant", 1.0)
    assert len(_request(boxes=[]).spec.tags) == 0  # a caption alone is a layout


def test_layout_spec_export_import_round_trip():
    spec = canvas_spec("two shapes", BOXES, CANVAS)
    assert spec == {"caption": "two shapes", "boxes": [{"box": [0.05, 0.2, 0.45, 0.6], "tag": "red circle"},
                                                       {"box": [0.5, 0.3, 0.95, 0.9], "tag": "blue square"}]}
    assert json.loads(spec_text(spec)) == spec and json.loads(spec_text({"caption": "", "boxes": []}))["boxes"] == []
    caption, boxes = spec_to_canvas(spec_text(spec), CANVAS)
    assert caption == "two shapes" and canvas_spec(caption, boxes, CANVAS) == spec
    for got, want in zip(boxes, BOXES):
        assert got["label"] == want["label"]
        np.testing.assert_allclose([got[k] for k in ("xmin", "ymin", "xmax", "ymax")],
                                   [want[k] for k in ("xmin", "ymin", "xmax", "ymax")], rtol=1e-5)
    # a spec in pixel units, as `structmar sample` also reads them, lands on the canvas at the same place
    caption, boxes = spec_to_canvas(json.dumps({"caption": "c", "units": "pixels", "image_size": [200, 100],
                                                "boxes": [{"box": [20, 10, 200, 60], "tag": "a cat"}]}), CANVAS)
    np.testing.assert_allclose([boxes[0][k] for k in ("xmin", "ymin", "xmax", "ymax")], [50, 50, 500, 300], rtol=1e-5)
    with pytest.raises(RequestError, match="layout spec: not valid JSON"):
        spec_to_canvas('{"caption": ', CANVAS)
    with pytest.raises(ValueError, match=r"layout spec: boxes\[0\].tag: missing"):
        spec_to_canvas(json.dumps({"boxes": [{"box": [0, 0, 1, 1]}]}), CANVAS)


@pytest.fixture(scope="module")
def run_dir(tiny_export):
    """A run directory holding a tiny random export (pixel tokens, 32 px, at most 2 boxes) and its CLIP."""
    made = tiny_export("app", max_objects=2)
    return dict(run=str(made["dir"]), clip=made["clip"])


def test_the_exported_spec_samples_the_same_images_with_structmar_sample(run_dir, tmp_path):
    gen = load_sampler(run_dir["run"], clip_path=run_dir["clip"])
    request = _request(num_images=3, seed=5, cfg=1.5, temperature=0.9)
    steps = []
    images, overlays = generate(gen, request, steps.append)
    assert steps == [1, 2, 3, 4]  # the progress bar's AR steps
    assert [im.size for im in images] == [(32, 32)] * 3 and [im.size for im in overlays] == [(256, 256)] * 3
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))

    layout = tmp_path / "layout.json"
    layout.write_text(spec_text(canvas_spec("two shapes", BOXES, CANVAS)))
    command = shlex.split(sample_command(gen, request, str(layout), clip_path=run_dir["clip"]))
    assert command[:2] == ["structmar", "sample"]
    out = command.index("--out") + 1
    command[out] = str(tmp_path / "samples")
    assert main(command[1:] + ["--device", "cpu"]) == 0
    for i, (image, overlay) in enumerate(zip(images, overlays)):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "samples" / f"{i:03d}.png").convert("RGB")),
                              np.asarray(image))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "samples" / f"{i:03d}_layout.png").convert("RGB")),
                              np.asarray(overlay))


def test_the_tag_menu_offers_the_exports_categories_or_the_shards(pixel_shards):
    from types import SimpleNamespace

    from structmar.shapes import CATEGORIES

    recorded = SimpleNamespace(categories={7: "kite", 2: "bicycle"})
    assert read_categories(recorded, None) == ["bicycle", "kite"]
    assert read_categories(SimpleNamespace(categories={}), None) == []
    root = pixel_shards("app_shards", num_train=4, num_val=2, samples_per_shard=4)
    by_id = [c.name for c in sorted(CATEGORIES, key=lambda c: c.id)]
    assert read_categories(recorded, str(root / "shards")) == by_id
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        read_categories(recorded, str(root))


PLAN_CAPTION = "a red circle to the left of a blue square"


def _shard_categories(planner_data) -> dict[int, str]:
    manifest = json.loads((planner_data["root"] / "shards" / "manifest.json").read_text())
    return {int(k): v for k, v in manifest["categories"].items()}


def _corners(boxes: list[dict]) -> np.ndarray:
    return np.array([[b[k] for k in ("xmin", "ymin", "xmax", "ymax")] for b in boxes])


def test_plan_from_caption_puts_the_planned_boxes_on_the_canvas(tiny_export, tiny_planner):
    from structmar.planner import plan_captions

    made = tiny_export("app_planned", max_objects=2, categories=_shard_categories(tiny_planner))
    gen = load_sampler(str(made["dir"]), clip_path=made["clip"])
    planner = load_app_planner(str(tiny_planner["run"]), gen)  # the categories agree: loaded
    [plan] = plan_captions(planner, gen.text_encoder, [PLAN_CAPTION], notify=False)
    for max_objects in (1, 8):  # capped at the model's max_objects, best first
        boxes, message = plan_canvas(planner, gen, PLAN_CAPTION, Bounds(max_objects, 4, 8, 400), CANVAS)
        n = min(max_objects, len(plan.tags))
        assert message.startswith(f"Planned {n} boxes from the caption") and "Notice" not in message
        assert [b["label"] for b in boxes] == plan.tags[:n]
        np.testing.assert_allclose(_corners(boxes), plan.boxes[:n] * CANVAS, atol=0.01)  # the spec's 5 decimals

    long_caption = "a red circle " * 10  # 130 characters; the test's CLIP spells them symbol by symbol: 102 tokens
    assert "Notice: caption 0 has 102 tokens; the text encoder takes 77: truncated" in \
        plan_canvas(planner, gen, long_caption, Bounds(2, 4, 8, 200), CANVAS)[1]
    for caption, reason in ((long_caption, "caption: 130 characters, more than this page's 100"),
                            (" ", "caption: missing")):
        with pytest.raises(RequestError, match=reason):
            plan_canvas(planner, gen, caption, Bounds(2, 4, 8, 100), CANVAS)


def test_a_planner_of_other_categories_is_a_one_line_error(tiny_export, tiny_planner, monkeypatch, capsys):
    import structmar.app

    categories = _shard_categories(tiny_planner)
    categories[3] = "red triangular thing"
    made = tiny_export("app_other_categories", max_objects=2, categories=categories)
    monkeypatch.setattr(structmar.app, "build_app", lambda *a: pytest.fail("served with a mismatched planner"))
    assert main(["app", "--checkpoint", str(made["dir"]), "--planner", str(tiny_planner["run"]), "--clip_path",
                 made["clip"], "--device", "cpu"]) == 2
    err = capsys.readouterr().err  # the text encoder's loading bar, then the error
    [line] = [x for x in err.splitlines() if x.startswith("structmar: error:")]
    assert "Traceback" not in err and line.startswith("structmar: error: --planner ") and line.endswith(
        "its categories differ from the image model's: id 3 is 'red triangle' vs 'red triangular thing'")


def test_app_command_errors_are_one_line(capsys):
    assert main(["app"]) == 2
    assert capsys.readouterr().err.strip() == ("structmar: error: --checkpoint is required: a stage export or its "
                                              "run directory")
    assert main(["app", "--checkpoint", "x", "--max_images", "0"]) == 2
    assert capsys.readouterr().err.strip() == "structmar: error: max_images must be >= 1, got 0"
    assert AppConfig().host == "127.0.0.1"


# ---- the page in a real browser ------------------------------------------------------------------------

# the README's picture of the page: STRUCTMAR_APP_SCREENSHOT=docs/app.png pytest tests/test_app.py -k browser
SCREENSHOT = os.environ.get("STRUCTMAR_APP_SCREENSHOT")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _browser_or_skip() -> str:
    """Chromium's path; without it or Playwright the test is skipped, or fails under CI (CI=true)."""
    missing = [name for name in ("playwright", "gradio", "gradio_image_annotation") if not _importable(name)]
    chromium = shutil.which("chromium")
    reason = (f"{', '.join(missing)} not installed (pip install 'structmar[app]' playwright)" if missing
              else None if chromium else "no chromium on PATH (apt-get install chromium)")
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"the browser test cannot run under CI: {reason}")
    if reason:
        pytest.skip(reason)
    return chromium


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _draw_box(page, canvas, box, tag):
    """Drag a box (fractions of the canvas element) with the mouse, then name its tag in the annotator's dialog."""
    canvas.scroll_into_view_if_needed()
    bb = canvas.bounding_box()
    x0, y0, x1, y1 = box
    page.mouse.move(bb["x"] + bb["width"] * x0, bb["y"] + bb["height"] * y0)
    page.mouse.down()
    page.mouse.move(bb["x"] + bb["width"] * x1, bb["y"] + bb["height"] * y1, steps=8)
    page.mouse.up()
    label = page.get_by_label("Label", exact=True)
    label.fill(tag)
    label.press("Enter")
    label.wait_for(state="detached")


def _gallery(page, elem_id: str) -> list[tuple[int, int]]:
    """The natural sizes of a gallery's images, one per image, once they have loaded."""
    images = f"[...document.querySelectorAll('#{elem_id} img')]"
    page.wait_for_function(f"{images}.length > 0 && {images}.every(img => img.complete && img.naturalWidth > 0)")
    return page.evaluate(f"""() => {{
        const seen = new Map();
        for (const img of {images}) seen.set(img.src, [img.naturalWidth, img.naturalHeight]);
        return [...seen.values()];
    }}""")


def _generate(page, expect: str) -> str:
    page.click("#generate")
    page.wait_for_function(f"document.querySelector('#status').innerText.includes({json.dumps(expect)})",
                           timeout=60000)
    return page.inner_text("#status")


def test_the_page_in_a_browser(run_dir, tiny_planner, tmp_path):
    chromium = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    from structmar.app import build_app, launch_options

    app = AppConfig(checkpoint=run_dir["run"], clip_path=run_dir["clip"], port=_free_port(), max_images=4,
                    max_num_iter=16).validate()
    gen = load_sampler(app.checkpoint, clip_path=app.clip_path)
    planner = load_app_planner(str(tiny_planner["run"]), gen)
    page_app = build_app(gen, app, ["red circle", "blue square", "green triangle"], planner)
    page_app.launch(prevent_thread_lock=True, quiet=True, **launch_options(app))
    hosts = set()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(tempfile.mkdtemp(dir=tmp_path), executable_path=chromium,
                                                            args=CHROMIUM_FLAGS, headless=True,
                                                            viewport={"width": 1280, "height": 1000})
            page = browser.new_page()
            page.on("request", lambda r: hosts.add(r.url.split("/")[2]))
            page.goto(f"http://127.0.0.1:{app.port}/")
            canvas = page.locator("#canvas canvas").first
            canvas.wait_for(timeout=60000)
            _draw_box(page, canvas, (0.1, 0.15, 0.45, 0.6), "red circle")
            _draw_box(page, canvas, (0.55, 0.3, 0.9, 0.85), "a blue square")
            page.fill("#caption textarea", "a red circle left of a blue square")
            page.get_by_label("number input for Images").fill("3")
            page.get_by_label("number input for AR steps").fill("4")
            page.get_by_label("number input for AR steps").press("Tab")

            assert "Generated 3 images" in _generate(page, "Generated")
            assert _gallery(page, "images") == [[32, 32]] * 3
            assert _gallery(page, "overlays") == [[256, 256]] * 3
            assert "--num_iter 4" in page.input_value("#command textarea")
            if SCREENSHOT:
                page.screenshot(path=str(tmp_path / "app.png"), full_page=True)

            page.click("text=Layout spec")
            page.click("#export")
            page.wait_for_function("document.querySelector('#status').innerText.includes('Exported 2 boxes')")
            exported = json.loads(page.locator("#spec .cm-content").inner_text())
            assert exported["caption"] == "a red circle left of a blue square"
            left, right = sorted(exported["boxes"], key=lambda b: b["box"][0])  # the canvas lists the newest first
            assert left["tag"] == "red circle" and right["tag"] == "a blue square"
            assert 0 < left["box"][0] < left["box"][2] < right["box"][0] < right["box"][2] < 1

            _draw_box(page, canvas, (0.6, 0.05, 0.9, 0.2), "green triangle")  # a third box: one too many
            assert "3 boxes: this model takes at most 2" in _generate(page, "Not generated")

            page.click("#import")  # the exported two-box layout back on the canvas: the page keeps working
            page.wait_for_function("document.querySelector('#status').innerText.includes('Imported 2 boxes')")
            page.get_by_label("number input for Images").fill("2")
            page.get_by_label("number input for Images").press("Tab")
            assert "Generated 2 images" in _generate(page, "Generated 2")
            assert _gallery(page, "images") == [[32, 32]] * 2

            from structmar.planner import plan_captions

            [plan] = plan_captions(planner, gen.text_encoder, [PLAN_CAPTION], max_boxes=2, notify=False)
            page.fill("#caption textarea", PLAN_CAPTION)
            page.click("#plan")
            planned = f"Planned {len(plan.tags)} boxes"
            page.wait_for_function(f"document.querySelector('#status').innerText.includes({json.dumps(planned)})")
            page.click("#export")  # what the canvas now holds
            exported = f"Exported {len(plan.tags)} boxes"
            page.wait_for_function(f"document.querySelector('#status').innerText.includes({json.dumps(exported)})")
            boxes = json.loads(page.locator("#spec .cm-content").inner_text())["boxes"]
            assert sorted(b["tag"] for b in boxes) == sorted(plan.tags)
            browser.close()
    finally:
        page_app.close()
    assert hosts == {f"127.0.0.1:{app.port}"}  # nothing loaded from anywhere else: the page works offline
    if SCREENSHOT:  # a small PNG: 960 px wide, 64 colours
        picture = Image.open(tmp_path / "app.png").convert("RGB")
        picture = picture.resize((960, round(picture.height * 960 / picture.width)), Image.LANCZOS)
        picture.quantize(64).save(SCREENSHOT, optimize=True)
