"""A rehearsal of the paper's recipe at real shapes on this CPU: every input file in its real format at full
architecture size (random weights), then the real commands, as a user runs them, at mar_base and 256 px.

    nice -n 5 python tools/rehearse.py WORKDIR    # on the 2-core development CPU at load ~20: stages 1-2 took 10
                                                  # and 19 minutes, writing the inputs and the shards 8

WORKDIR receives:
- coco/: a COCO-2014-style tree (train2014/, val2014/, annotations/instances_*.json and captions_*.json) with
  COCO's 80 categories under their real ids (gaps included), non-square JPEGs, 5 captions per image, some
  crowd boxes;
- pretrained_models/: vae/kl16.ckpt (the full KL-16 architecture), clip-vit-base-patch32/ (CLIP ViT-B/32's
  text transformer and a CLIPTokenizer), mar/mar_base/checkpoint-last.pth (MAR's format),
  fasterrcnn_resnet50_fpn_v2_coco.pth (torchvision's state dict, the reward detector) and detr-resnet-50/
  (a transformers DETR of facebook/detr-resnet-50's shapes, the evaluation detector);
- runs of `structmar build-shards`, stage 1 (`train --train_mode text_layout`, 2 ranks under the deepspeed
  launcher, ZeRO-2), stage 2 (`--train_mode full`, 2 ranks, ZeRO-3, gradient checkpointing), stage 3
  (`structmar rl`, 2 ranks, a few steps at a small --num_iter and few denoising steps, the reference
  offloaded) and `structmar eval` with the DETR detector, each in its own directory with its log;
- rehearsal.json and rehearsal.md: per stage the peak resident memory of each rank (VmHWM, polled from
  /proc while it runs), the time per step (the run's log.jsonl, the first step left out as warm-up) and
  tools/cost.py's prediction for the same stage, batch, ZeRO stage and world size on this CPU.

A rerun skips every input already written and every command whose result is recorded; a command that did
not finish is rerun from a fresh directory (its timings must not mix two runs). Ranks run with one thread
each (OMP_NUM_THREADS=1: 2 ranks on 2 cores); the single-process commands with torch's default.

The prediction is cost.py's CPU check applied to each stage (time = counted FLOPs / this CPU's measured fp32
matmul throughput at one thread; memory = a process's RSS after importing structmar + model states + counted
activations in fp32), with the model states of fp32 training: DeepSpeed's estimators' 16-bit terms (weights,
gradients) at 4 bytes, the frozen parameters and structmar's EMA in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PRESET = "mar_base"
IMAGE_SIZE = 256
WORLD = 2
GB = 1e9


STEPS = 3  # stages 1-2: optimizer steps (the first is warm-up, left out of the time per step)
RL_STEPS = 2
# stage 3's per-rank settings; a quarter of the AR steps and of their denoising steps recomputed: the whole update
# (cost.py: 6.3 TFLOP a step here) would take tens of minutes a step on this CPU
RL = dict(batch_size=1, group_size=2, num_iter=4, rollout_steps=10, rl_step_ratio=0.25, diffusion_step_ratio=0.25)
MAR_FILE = "pretrained_models/mar/mar_base/checkpoint-last.pth"
KL16 = "pretrained_models/vae/kl16.ckpt"
CLIP = "pretrained_models/clip-vit-base-patch32"
FRCNN = "pretrained_models/fasterrcnn_resnet50_fpn_v2_coco.pth"
DETR = "pretrained_models/detr-resnet-50"
SPLITS = {"train2014": 8, "val2014": 4}
# COCO's image shapes are mostly 640 on the long side, landscape and portrait
IMAGE_SHAPES = [(640, 480), (480, 640), (640, 427), (500, 375), (427, 640), (640, 360)]


# ---- the inputs -------------------------------------------------------------------------------------


def coco_categories() -> dict[int, str]:
    """COCO's 80 categories under their ids (1-90, with COCO's gaps), as torchvision's COCO weights list them."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights

    names = FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"]  # index = COCO id
    return {i: n for i, n in enumerate(names) if n not in ("__background__", "N/A")}


def _crowd_rle(width: int, height: int, box: list[float]) -> dict:
    """The uncompressed RLE (column-major run lengths, zeros first) of a box's mask: crowd regions' format."""
    import numpy as np

    mask = np.zeros((height, width), dtype=np.uint8)
    x, y, w, h = (int(round(v)) for v in box)
    mask[y:y + h, x:x + w] = 1
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"counts": runs if flat[0] == 0 else [0, *runs], "size": [height, width]}


def write_coco(root: str, splits: dict[str, int] = SPLITS, seed: int = 0) -> None:
    """A COCO-2014-style tree: JPEGs of COCO's shapes and file names, instances (boxes with polygon
    segmentations; every third image also a crowd region in RLE) and 5 captions per image. The images are
    smooth noise with a filled rectangle in each box, so the VAE and detectors see plausible statistics."""
    import numpy as np
    from PIL import Image, ImageDraw

    from structmar import atomic

    rng = random.Random(seed)
    cats = coco_categories()
    ids = sorted(cats)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    used: set[int] = set()
    for split, count in splits.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, instances, captions = [], [], []
        for k in range(count):
            image_id = rng.randrange(1, 581_930)
            while image_id in used:
                image_id = rng.randrange(1, 581_930)
            used.add(image_id)
            width, height = IMAGE_SHAPES[k % len(IMAGE_SHAPES)]
            file_name = f"COCO_{split}_{image_id:012d}.jpg"
            low = np.random.default_rng(seed * 1000 + image_id).integers(0, 256, (height // 32, width // 32, 3))
            image = Image.fromarray(low.astype(np.uint8)).resize((width, height), Image.BILINEAR)
            draw = ImageDraw.Draw(image)
            names = []
            for _ in range(rng.randint(2, 5)):
                w, h = rng.uniform(0.15, 0.6) * width, rng.uniform(0.15, 0.6) * height
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
                cid = rng.choice(ids)
                names.append(cats[cid])
                draw.rectangle([x, y, x + w, y + h], fill=tuple(rng.randrange(256) for _ in range(3)))
                box = [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]
                polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
                instances.append({"segmentation": [[round(v, 2) for v in polygon]], "area": round(w * h, 2),
                                  "iscrowd": 0, "image_id": image_id, "bbox": box, "category_id": cid,
                                  "id": len(instances) + 1 + 1_000_000 * len(used)})
            if k % 3 == 0:  # a crowd region: COCO's readers (and structmar's) leave it out of the layout
                box = [0.0, 0.0, round(width / 3, 2), round(height / 4, 2)]
                instances.append({"segmentation": _crowd_rle(width, height, box), "area": box[2] * box[3],
                                  "iscrowd": 1, "image_id": image_id, "bbox": box, "category_id": 1,
                                  "id": len(instances) + 1 + 1_000_000 * len(used)})
            atomic.save_image(image, os.path.join(root, split, file_name))
            images.append({"license": 1, "file_name": file_name, "coco_url": "", "height": height, "width": width,
                           "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": image_id})
            for j in range(5):
                a, b = names[j % len(names)], names[(j + 1) % len(names)]
                text = rng.choice([f"A {a} next to a {b}.", f"a {a} and a {b} in a room",
                                   f"There is a {a} near the {b} outside.", f"A photo of a {a} with a {b}"])
                captions.append({"image_id": image_id, "id": len(captions) + 1 + 10_000 * len(used), "caption": text})
        head = {"info": {"description": "COCO 2014 Dataset (rehearsal: random content)", "version": "1.0",
                         "year": 2014}, "licenses": [{"url": "", "id": 1, "name": "rehearsal"}], "images": images}
        categories = [{"id": i, "name": cats[i]} for i in ids]
        atomic.write_text(os.path.join(root, "annotations", f"captions_{split}.json"),
                          json.dumps({**head, "annotations": captions}))
        atomic.write_text(os.path.join(root, "annotations", f"instances_{split}.json"),
                          json.dumps({**head, "annotations": instances, "categories": categories}))


def _save_dir(path: str, write) -> None:
    """Call write(tmp) on a fresh directory beside `path`, then rename it into place (no half-written model)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    os.replace(tmp, path)


def write_inputs(work: str) -> dict[str, float]:
    """Every file the recipe reads, in its real format and full size; returns seconds per file (written now)."""
    import torch

    from structmar import atomic

    timings = {}

    def once(path: str, write) -> None:
        if os.path.exists(os.path.join(work, path)):
            return
        t = time.time()
        os.makedirs(os.path.dirname(os.path.join(work, path)), exist_ok=True)
        write(os.path.join(work, path))
        timings[path] = round(time.time() - t, 1)
        print(f"rehearse: wrote {path} ({timings[path]:.0f} s)", flush=True)

    def mar(path: str) -> None:
        # MAR's checkpoint-last.pth, from a fresh structure-off model as the demo writes its stage 0
        from structmar.config import model_config
        from structmar.demo import write_mar_checkpoint
        from structmar.model import StructMAR, write_export

        plain = model_config(PRESET, rope=False, layout=False, text=False, layout_bias="none")
        torch.manual_seed(0)
        sd = StructMAR(plain).state_dict()
        for t in sd.values():  # MAR zero-inits its head's output and modulations; trained weights have none
            if t.is_floating_point() and not t.any():
                t.normal_(0, 0.02)
        export = f"{path}.export.safetensors"
        write_export(export, sd, sd, plain, {"note": "random plain MAR"})
        del sd
        write_mar_checkpoint(export, path, epoch=400)
        os.remove(export)

    def frcnn(path: str) -> None:
        from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

        torch.manual_seed(0)
        atomic.torch_save(fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91).state_dict(),
                          path)

    def detr(path: str) -> None:
        # facebook/detr-resnet-50's shapes: ResNet-50, d_model 256, 6 + 6 layers, 100 queries, COCO's 91 ids
        from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

        cats = coco_categories()
        id2label = {i: cats.get(i, "N/A") for i in range(91)}
        config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                            backbone_config=ResNetConfig(out_features=["stage4"]), id2label=id2label,
                            label2id={v: k for k, v in id2label.items() if v != "N/A"})
        torch.manual_seed(0)

        def write(tmp):
            DetrForObjectDetection(config).save_pretrained(tmp)
            DetrImageProcessor().save_pretrained(tmp)

        _save_dir(path, write)

    def clip(path: str) -> None:
        from structmar.demo import _vocabulary
        from structmar.text import write_random_clip

        words, _ = _vocabulary(os.path.join(work, "coco"))
        write_random_clip(path, seed=0, size="base", words=words)

    def kl16(path: str) -> None:
        from structmar.tokenizer import KL16_ARCH, write_random_kl16

        write_random_kl16(path, ch=KL16_ARCH["ch"])

    once("coco/annotations/instances_val2014.json", lambda p: write_coco(os.path.join(work, "coco")))
    once(KL16, kl16)
    once(CLIP, clip)
    once(MAR_FILE, mar)
    once(FRCNN, frcnn)
    once(DETR, detr)
    return timings


# ---- running a command and watching its processes ---------------------------------------------------


class PeakWatch(threading.Thread):
    """Polls a command's process tree: each process's rank (RANK), peak resident memory over the whole command
    (VmHWM), and peak resident memory while it trains (VmRSS from the first progress line `step 1/N` of its log
    to the last, `step N/N`: the steady state of the steps, without startup and the final save)."""

    def __init__(self, pid: int, log: str, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.log, self.interval = pid, log, interval
        self.labels: dict[int, str] = {}
        self.peaks: dict[int, int] = {}
        self.step_peaks: dict[int, int] = {}
        self.done = threading.Event()

    def _label(self, proc) -> str:
        try:
            rank = proc.environ().get("RANK")
        except Exception:  # noqa: BLE001 - a process that just ended
            rank = None
        if rank is not None and "structmar" in " ".join(proc.cmdline()):
            return f"rank {rank}"
        return "process" if proc.pid == self.pid else "launcher"

    def _training(self) -> bool:
        import re

        with open(self.log, errors="replace") as f:
            steps = re.findall(r"step (\d+)/(\d+)", f.read())
        return bool(steps) and steps[-1][0] != steps[-1][1]

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            training = self._training()
            for proc in procs:
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        status = dict(line.split(":", 1) for line in f if line.startswith(("VmHWM", "VmRSS")))
                    hwm, rss = (int(status[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS"))
                    if proc.pid not in self.labels:
                        self.labels[proc.pid] = self._label(proc)
                except (OSError, ValueError, KeyError, psutil.Error):  # ended, or a zombie (no memory lines)
                    continue
                self.peaks[proc.pid] = max(hwm, self.peaks.get(proc.pid, 0))
                if training:
                    self.step_peaks[proc.pid] = max(rss, self.step_peaks.get(proc.pid, 0))
            self.done.wait(self.interval)

    def by_label(self, peaks: dict[int, int]) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, peak in peaks.items():
            out[self.labels[pid]] = round(max(out.get(self.labels[pid], 0.0), peak / GB), 3)
        return dict(sorted(out.items()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_command(work: str, name: str, cmd: list[str], threads: int | None) -> dict:
    log = os.path.join(work, "logs", f"{name}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"rehearse: {name}: {' '.join(cmd)}  (log: {log})", flush=True)
    t = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        watch = PeakWatch(proc.pid, log)
        watch.start()
        rc = proc.wait()
        watch.done.set()
        watch.join()
    wall = time.time() - t
    if rc:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{tail}\nrehearse: {name} failed (exit {rc}) after {wall:.0f} s; its log: {log}")
    peaks, step_peaks = watch.by_label(watch.peaks), watch.by_label(watch.step_peaks)
    print(f"rehearse: {name}: done in {wall:.0f} s; peak RSS " + ", ".join(f"{k} {v:.2f} GB" for k, v in peaks.items())
          + "; while training " + ", ".join(f"{k} {v:.2f} GB" for k, v in step_peaks.items()), flush=True)
    return {"command": cmd, "wall_s": round(wall, 1), "peak_gb": peaks, "step_peak_gb": step_peaks}


def step_times(run_dir: str) -> list[float]:
    """perf/step_time_s of every logged step (the commands run with --log_every 1)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r]


def commands(work: str, steps: int, rl_steps: int) -> list[tuple[str, list[str], int | None, str | None]]:
    """(name, command, OMP threads, run directory) of each stage, as README's recipe runs them."""
    py = [sys.executable, "-m", "structmar"]
    ds = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(WORLD), "--master_port",
          str(_free_port()), "--module", "structmar"]
    common = ["--coco_root", "coco", "--coco_split", "train2014", "--device", "cpu", "--precision", "fp32",
              "--num_workers", "0", "--log_every", "1", "--sample_every", "0", "--seed", "0", "--epochs", "100"]
    stage = ["--model", PRESET, "--batch_size", "1", "--max_steps", str(steps), "--warmup_epochs", "0",
             "--label_drop_prob", "0.1"]
    return [
        ("build-shards", [*py, "build-shards", "--coco_root", "coco", "--coco_split", "train2014", "--out",
                          "coco/shards/train2014", "--tokenizer", "kl16", "--vae_path", KL16, "--clip_path", CLIP,
                          "--image_size", str(IMAGE_SIZE), "--max_objects", "16", "--num_workers", "1",
                          "--samples_per_shard", "2",
                          "--device", "cpu"], None, None),
        ("stage1", [*ds, "train", "--output_dir", "runs/stage1_align", "--resume", MAR_FILE, "--train_mode",
                    "text_layout", "--blr", "1e-4", "--deepspeed_config", "zero2", *stage, *common], 1,
         "runs/stage1_align"),
        ("stage2", [*ds, "train", "--output_dir", "runs/stage2_sft", "--resume", "runs/stage1_align", "--train_mode",
                    "full", "--blr", "2e-5", "--grad_checkpointing", "--deepspeed_config", "zero3", *stage, *common],
         1, "runs/stage2_sft"),
        ("stage3", [*ds, "rl", "--output_dir", "runs/stage3_rl", "--resume", "runs/stage2_sft", "--detector",
                    "torchvision_frcnn", "--detector_path", FRCNN, "--vae_path", KL16, "--max_steps", str(rl_steps),
                    "--kl_coef", "0.02", "--lr", "1e-6", "--grad_checkpointing",
                    *(x for k, v in RL.items() for x in (f"--{k}", str(v))), *common], 1, "runs/stage3_rl"),
        ("eval", [*py, "eval", "--checkpoint", "runs/stage3_rl", "--coco_root", "coco", "--coco_split", "val2014",
                  "--num_layouts", "2", "--batch_size", "2", "--num_iter", str(RL["num_iter"]), "--eval_detector",
                  "hf", "--eval_detector_path", DETR, "--reward_detector", "torchvision_frcnn",
                  "--reward_detector_path", FRCNN, "--clip_path", CLIP, "--vae_path", KL16, "--device", "cpu",
                  "--out", "runs/eval"], None, None),
    ]


# ---- the cost model's prediction --------------------------------------------------------------------


def fp32_states(params, zero: int, world: int) -> dict[str, float]:
    """cost.model_states_bytes for fp32 training: DeepSpeed's estimators count 16-bit weights and gradients
    (whole under ZeRO-2: 4 bytes a trainable parameter; the largest layer's and the partition's under
    ZeRO-3), which fp32 keeps at 4 bytes each; the frozen parameters are fp32 too."""
    import cost

    s = cost.model_states_bytes(params, zero, world, gpus_per_node=world)
    if zero == 3:
        s["deepspeed"] += 4 * params.largest_layer + 2 * params.trainable / world
    else:
        s["deepspeed"] += 4 * params.trainable
    s["frozen"] *= 2
    return s


def base_rss() -> float:
    """RSS of a process that imported what a rank imports (torch, DeepSpeed, structmar), before any model."""
    tools = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {tools!r}); import cost, deepspeed, structmar.grpo, structmar.train; "
            "print(cost.rss_bytes())")
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def predict(steps_rl: dict) -> dict:
    """cost.py's time per step and peak memory per rank for stages 1-3 as this rehearsal runs them."""
    import cost
    import torch

    torch.set_num_threads(1)  # as each rank runs
    gflops, cpu_gflops = cost.matmul_gflops()
    base = base_rss()
    out = {"matmul_gflops_1_thread": round(gflops, 1), "matmul_gflops_per_cpu_s": round(cpu_gflops, 1),
           "base_rss_gb": round(base / GB, 2)}
    for stage, zero, ckpt in ((1, 2, False), (2, 3, True)):
        meta = cost.build(PRESET, stage, dtype=torch.float32)
        c = cost.count_training(meta, cost.mean_mask_ratio(meta.cfg.mask_ratio_min), images=1)
        params = cost.param_counts(meta)
        states = fp32_states(params, zero, WORLD)
        acts = c.activations(ckpt)
        out[f"stage{stage}"] = {"tflop_per_step": c.flops_with(ckpt) / 1e12,
                                "time_s": c.flops_with(ckpt) / (gflops * 1e9),
                                "memory_gb": (base + sum(states.values()) + acts) / GB,
                                "parts_gb": {"base": base / GB, **{k: v / GB for k, v in states.items()},
                                             "activations": acts / GB}}
    recipe = cost.Recipe(epochs=1, batch_size=steps_rl["batch_size"], grad_checkpointing=True, zero=2,
                         group_size=steps_rl["group_size"], num_iter=steps_rl["num_iter"],
                         denoising_steps=steps_rl["rollout_steps"], rl_step_ratio=steps_rl["rl_step_ratio"],
                         diffusion_step_ratio=steps_rl["diffusion_step_ratio"], ref_offload=True)
    c = cost.stage_cost(PRESET, 3, WORLD, recipe)
    flops = c.step_images * sum(c.flops_per_image.values())
    states = fp32_states(c.params, 2, WORLD)
    acts = 2 * c.activations_per_image * c.live_images  # counted in bf16; the rehearsal runs fp32
    ref_device, ref_host = c.reference
    reference = 2 * (sum(ref_device.values()) + ref_host)  # both on the host here, in fp32
    out["stage3"] = {"tflop_per_step": flops / 1e12, "time_s": flops / (gflops * 1e9),
                     "memory_gb": (base + sum(states.values()) + acts + reference) / GB,
                     "parts_gb": {"base": base / GB, **{k: v / GB for k, v in states.items()},
                                  "activations": acts / GB, "reference": reference / GB},
                     "not_counted_gb": _uncounted_stage3(c.params.total)}
    return out


def _uncounted_stage3(total_params: int) -> dict[str, float]:
    """What a stage-3 rank also holds that the cost model leaves out (GPU figures do not include host-side
    models): the VAE and the reward detector in fp32, and the reference built whole in fp32 at startup."""
    import torch
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

    from structmar.tokenizer import KLTokenizer

    with torch.device("meta"):
        vae = sum(p.numel() for p in KLTokenizer().parameters())
        det = sum(p.numel() for p in fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None,
                                                                 num_classes=91).parameters())
    return {"KL-16 VAE": 4 * vae / GB, "Faster R-CNN": 4 * det / GB, "reference built whole": 4 * total_params / GB}


# ---- the table --------------------------------------------------------------------------------------


def table(results: dict, prediction: dict) -> tuple[list[dict], str]:
    rows = []
    settings = {"build-shards": f"{SPLITS['train2014']} train images, KL-16 + CLIP, 1 process",
                "stage1": "text_layout, ZeRO-2, 2 ranks x batch 1",
                "stage2": "full, ZeRO-3, grad ckpt, 2 ranks x batch 1",
                "stage3": f"GRPO, ZeRO-2, 2 ranks x {RL['batch_size']} layout x group {RL['group_size']}, "
                          f"num_iter {RL['num_iter']}, {RL['rollout_steps']} denoising steps, {RL['rl_step_ratio']} x "
                          f"{RL['diffusion_step_ratio']} recomputed, reference offloaded",
                "eval": "2 val layouts, num_iter 4, DETR + Faster R-CNN scores"}
    ranked = lambda d: {k: v for k, v in d.items() if k.startswith("rank")} or d  # noqa: E731
    for name, r in results.items():
        row = {"stage": name, "setting": settings[name], "wall_s": r["wall_s"], "peak_gb": ranked(r["peak_gb"]),
               "step_peak_gb": ranked(r.get("step_peak_gb", {}))}
        if r.get("step_times"):
            times = r["step_times"]
            row["steps"], row["first_step_s"] = len(times), times[0]
            row["step_s"] = sum(times[1:]) / max(1, len(times) - 1)
        p = prediction.get(name)
        if p:
            row["predicted_step_s"], row["predicted_gb"] = p["time_s"], p["memory_gb"]
            row["time_ratio"] = row["step_s"] / p["time_s"]
            row["memory_ratio"] = max(row["step_peak_gb"].values()) / p["memory_gb"]
        rows.append(row)
    lines = ["| stage | setting | time / step (first step) | predicted | measured / predicted | "
             "RSS per rank while training | predicted | measured / predicted | peak RSS per rank, whole command "
             "| wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    gb = lambda d: ", ".join(f"{v:.2f}" for v in d.values()) + " GB" if d else "-"  # noqa: E731
    for row in rows:
        t = f"{row['step_s']:.1f} s ({row['first_step_s']:.1f} s)" if "step_s" in row else "-"
        pt = f"{row['predicted_step_s']:.1f} s" if "predicted_step_s" in row else "-"
        tr = f"{row['time_ratio']:.2f}" if "time_ratio" in row else "-"
        pm = f"{row['predicted_gb']:.2f} GB" if "predicted_gb" in row else "-"
        mr = f"{row['memory_ratio']:.2f}" if "memory_ratio" in row else "-"
        lines.append(f"| {row['stage']} | {row['setting']} | {t} | {pt} | {tr} | {gb(row['step_peak_gb'])} | {pm} | "
                     f"{mr} | {gb(row['peak_gb'])} | {row['wall_s']:.0f} s |")
    return rows, "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("work", help="work directory (created; a rerun continues it)")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of stages 1 and 2")
    p.add_argument("--rl_steps", type=int, default=RL_STEPS, help="optimizer steps of stage 3")
    a = p.parse_args(argv)
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    results_path = os.path.join(work, "results.json")
    state = {"inputs_s": {}, "stages": {}}
    if os.path.isfile(results_path):
        with open(results_path) as f:
            state = json.load(f)
    state["inputs_s"].update(write_inputs(work))
    for name, cmd, threads, run_dir in commands(work, a.steps, a.rl_steps):
        if name in state["stages"]:
            continue
        for d in [run_dir, "runs/eval" if name == "eval" else None,
                  "coco/shards/train2014" if name == "build-shards" else None]:
            if d:  # a command that did not finish starts again, so its timings come from one run
                shutil.rmtree(os.path.join(work, d), ignore_errors=True)
        r = run_command(work, name, cmd, threads)
        if run_dir:
            r["step_times"] = step_times(os.path.join(work, run_dir))
        state["stages"][name] = r
        with open(results_path, "w") as f:
            json.dump(state, f, indent=1)
    prediction = predict(RL)
    rows, md = table(state["stages"], prediction)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    header = (f"CPU: {cpu}, {os.cpu_count()} cores; ranks at 1 thread each; load average {os.getloadavg()[0]:.1f} at "
              f"the end; fp32 matmul at 1 thread {prediction['matmul_gflops_1_thread']} GFLOP/s (wall), "
              f"{prediction['matmul_gflops_per_cpu_s']} per CPU second; RSS after imports "
              f"{prediction['base_rss_gb']} GB")
    with open(os.path.join(work, "rehearsal.json"), "w") as f:
        json.dump({"cpu": cpu, "rows": rows, "prediction": prediction, "inputs_s": state["inputs_s"]}, f, indent=1)
    with open(os.path.join(work, "rehearsal.md"), "w") as f:
        f.write(header + "\n\n" + md + "\n")
    print(header)
    print(md)


if __name__ == "__main__":
    main()
