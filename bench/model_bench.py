"""`--kernel model`: NEARL-CLIP end to end against the frozen CLIP it adapts.

(1) Inference: image-encoding throughput (images/s) of
    - clip:            the frozen backbone alone, `model.backbone.encode_image` (the limit),
    - nearl-reference: `model.encode_image` with fused=False,
    - nearl-fused:     the same with fused=True (skipped, with the reason, while the kernels are missing).
(2) One training step (forward of both towers, NEARLLoss, backward to the adapters, AdamW step):
    time per step and peak memory, for
    - limit:           the frozen backbone's forward of both towers + the CLIP loss + the backward of
                       the *activations only*, from the loss down to the output of the first adapted
                       block of each tower. Every adapter that sits after block k needs the gradient
                       of the loss w.r.t. that block's output, so that gradient must flow back through
                       all the frozen blocks above the first adapted one; no weight gradient is ever
                       needed (the weights are frozen). The limit is therefore measured with a forward
                       hook that turns the first adapted block's output into a fresh leaf requiring
                       grad: backward runs through blocks k0+1..L of both towers, data gradients only,
                       and stops there. Nothing an adapter method can do costs less than this.
    - nearl-reference / nearl-fused: the real step.
    - with --grad-checkpointing, nearl-reference+ckpt / nearl-fused+ckpt: the same step with
      model.set_grad_checkpointing(True) (the backward runs each frozen block again instead of
      keeping its activations); `grad_checkpointing` in the JSON compares each with its plain row.
    Ratios: time / limit time, and the fused / reference peak-memory ratio.
(3) `--profile FILE`: a torch profiler chrome trace of two reps of every variant; `--nvtx`: ranges
    per variant and phase ("model/nearl-fused/train" > "forward" > "image_tower" > "block3" >
    "nearl3", then "loss", "backward", "step"). Backward has no per-layer ranges: autograd runs the
    backward outside any Python scope of ours (bench/README.md, "Profiling": what the model would need).

The W_up matrices (zero at init, which makes the OCA a no-op on its inputs) are set to small random
values first, so that the fused/reference comparison of features is meaningful.
"""
from __future__ import annotations

import gc
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from open_clip import ClipLoss

import nearl
from nearl import ops as nearl_ops

from .kernel_bench import rel_err
from .nvtx_ranges import Ranges
from .report import CPU_NOTE, environment, format_table, num, span
from .timing import Timer

MIB = 2 ** 20
CKPT = "+ckpt"  # suffix of a training variant run with model.set_grad_checkpointing(True)


def random_tokens(batch: int, context: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Captions of random length: start-of-text, random words, end-of-text (the highest id), padding 0."""
    sot, eot = vocab - 2, vocab - 1
    tokens = torch.zeros(batch, context, dtype=torch.long)
    tokens[:, 0] = sot
    longest = max(1, min(context - 2, 40))
    lengths = torch.randint(1, longest + 1, (batch,), generator=generator)
    words = torch.randint(1, sot, (batch, context), generator=generator)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 1:1 + n] = words[i, :n]
        tokens[i, 1 + n] = eot
    return tokens


def _resblocks(model) -> Dict[str, List[torch.nn.Module]]:
    return {kind: model.tower(kind).blocks for kind in ("vision", "text")}


@contextmanager
def detach_after_first_adapted(model) -> None:
    """Forward hooks making the first adapted block's output of each tower a leaf requiring grad."""
    handles = []
    for tower, blocks in _resblocks(model).items():
        layers = model.config.layers_for(tower, len(blocks))
        if layers:
            handles.append(blocks[layers[0] - 1].register_forward_hook(
                lambda mod, inp, out: out.detach().requires_grad_(True)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def model_ranges(model, ranges: Ranges):
    """Per-tower, per-block and per-nearl_layer NVTX ranges (forward only), installed from outside.

    The towers are wrapped on the instance, the frozen blocks get forward pre/post hooks and
    `nearl.ops.nearl_layer` (called by the model as `ops.nearl_layer`) a wrapper; all removed on exit.
    """
    if not ranges.enabled:
        yield
        return
    state = {"block": 0}
    handles = []

    def pre(k):
        def hook(mod, inp):
            state["block"] = k
            ranges.push(f"block{k}")
        return hook

    def post(mod, inp, out):
        ranges.pop(1)

    for blocks in _resblocks(model).values():
        for k, block in enumerate(blocks, start=1):
            handles.append(block.register_forward_pre_hook(pre(k)))
            handles.append(block.register_forward_hook(post))
    original = nearl_ops.nearl_layer

    def nearl_layer(*a, **kw):
        with ranges.range(f"nearl{state['block']}"):
            return original(*a, **kw)

    def tower(name, method):
        def wrapped(*a, **kw):
            with ranges.range(name):
                return method(*a, **kw)
        return wrapped

    nearl_ops.nearl_layer = nearl_layer
    model.image_tower = tower("image_tower", type(model).image_tower.__get__(model))
    model.text_tower = tower("text_tower", type(model).text_tower.__get__(model))
    try:
        yield
    finally:
        nearl_ops.nearl_layer = original
        del model.image_tower, model.text_tower
        for h in handles:
            h.remove()


class ModelBench:
    def __init__(self, args, device: torch.device, ranges: Ranges):
        self.args, self.device, self.ranges = args, device, ranges
        self.on_gpu = device.type == "cuda"
        self.model_name = args.model or ("ViT-B-16" if self.on_gpu else "NEARL-Tiny")
        self.batch = args.batch or (128 if self.on_gpu else 8)
        self.amp_dtype = None if args.dtype == "fp32" else args.torch_dtype
        self.reps, self.warmup = args.reps, args.warmup
        torch.manual_seed(args.seed)
        model = nearl.build(self.model_name, orth=args.orth)
        for name, p in model.named_parameters():
            if name.endswith("w_up"):
                torch.nn.init.normal_(p, std=0.02)
        self.model = model.to(device)
        g = torch.Generator().manual_seed(args.seed)
        size = model.tower("vision").image_size
        self.images = torch.randn(self.batch, 3, *size, generator=g).to(device)
        self.tokens = random_tokens(self.batch, model.backbone.context_length, model.backbone.vocab_size, g).to(device)
        self.loss_fn = nearl.NEARLLoss.from_config(model.config)
        self.clip_loss = ClipLoss()
        self.timer = Timer(device)
        self.fused_reason: Optional[str] = None
        self.failed = False

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _sync(self):
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    def _free(self):
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ variants
    def encode(self, variant: str) -> Callable[[], torch.Tensor]:
        model = self.model

        def run():
            with torch.no_grad(), self.autocast():
                if variant == "clip":
                    return model.backbone.encode_image(self.images)
                model.fused = variant == "nearl-fused"
                return model.encode_image(self.images)
        return run

    def train_step(self, variant: str, optimizer) -> Callable[[], None]:
        model, r = self.model, self.ranges
        base, checkpointed = variant.removesuffix(CKPT), variant.endswith(CKPT)

        if variant == "limit":
            def limit():
                with detach_after_first_adapted(model), self.autocast():
                    with r.range("forward"):
                        with r.range("encode_image"):
                            img = model.backbone.encode_image(self.images)
                        with r.range("encode_text"):
                            txt = model.backbone.encode_text(self.tokens)
                    with r.range("loss"):
                        loss = self.clip_loss(F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1),
                                              model.logit_scale.float())
                with r.range("backward"):
                    loss.backward()
            return limit

        def step():
            model.fused = base == "nearl-fused"
            model.set_grad_checkpointing(checkpointed)
            with self.autocast():
                with r.range("forward"):
                    out = model(self.images, self.tokens)
                with r.range("loss"):
                    loss = self.loss_fn(out)["loss"]
            with r.range("backward"):
                loss.backward()
            with r.range("step"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return step

    # ------------------------------------------------------------------ measurements
    def _check_fused(self) -> Optional[Dict[str, float]]:
        """Run the fused encoder: its feature error vs the reference (under the benchmark's autocast,
        and in float32, where rounding the features to half precision cannot hide a difference),
        or the reason it cannot run."""
        try:
            errors = {}
            for label, amp in (("autocast", self.amp_dtype), ("fp32", None)):
                saved, self.amp_dtype = self.amp_dtype, amp
                try:
                    ref = self.encode("nearl-reference")()
                    fused = self.encode("nearl-fused")()
                finally:
                    self.amp_dtype = saved
                errors[label] = rel_err(fused.float(), ref.float())
            self._sync()
            return errors
        except (NotImplementedError, ImportError) as err:
            self.fused_reason = f"skipped: {type(err).__name__}: {err}"
        except Exception as err:  # noqa: BLE001 - reported, the run goes on
            self.fused_reason = f"failed: {type(err).__name__}: {err}"
            self.failed = True
        finally:
            self.model.fused = False
        return None

    def _row_status(self, variant: str) -> Optional[str]:
        return self.fused_reason if variant.startswith("nearl-fused") else None

    def inference(self) -> List[dict]:
        self.model.eval()
        rows = []
        for variant in ("clip", "nearl-reference", "nearl-fused"):
            row = {"variant": variant}
            if self._row_status(variant):
                row.update(status=self.fused_reason.split(":")[0], reason=self.fused_reason)
                rows.append(row)
                continue
            try:
                timing = self.timer.time(self.encode(variant), reps=self.reps, warmup=self.warmup,
                                         around=self._around(f"model/{variant}/encode_image"))
            except Exception as err:  # noqa: BLE001 - reported, the run goes on
                row.update(status="failed", reason=f"failed: {type(err).__name__}: {err}")
                self.failed = True
                rows.append(row)
                continue
            row.update(status="ok", timing=timing.to_dict(),
                       images_per_s=self.batch / (timing.median_ms * 1e-3))
            rows.append(row)
            self._free()
        base = next((r for r in rows if r["variant"] == "clip" and r["status"] == "ok"), None)
        for r in rows:
            if r["status"] == "ok" and base:
                r["x_limit"] = r["timing"]["median_ms"] / base["timing"]["median_ms"]
        return rows

    def _peak_memory(self, fn: Callable[[], None]) -> Tuple[Optional[float], Optional[float]]:
        if not self.on_gpu:
            return None, None
        self._free()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        resident = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return peak / MIB, (peak - resident) / MIB

    def training(self) -> List[dict]:
        self.model.train()
        optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=1e-4, weight_decay=0.05)
        rows = []
        variants = ("limit", "nearl-reference", "nearl-fused")
        if getattr(self.args, "grad_checkpointing", False):
            variants += ("nearl-reference" + CKPT, "nearl-fused" + CKPT)
        for variant in variants:
            row = {"variant": variant}
            if self._row_status(variant):
                row.update(status=self.fused_reason.split(":")[0], reason=self.fused_reason)
                rows.append(row)
                continue
            step = self.train_step(variant, optimizer)
            try:
                timing = self.timer.time(step, reps=self.reps, warmup=self.warmup,
                                         around=self._around(f"model/{variant}/train"))
                peak, above = self._peak_memory(step)
            except Exception as err:  # noqa: BLE001
                row.update(status="failed", reason=f"failed: {type(err).__name__}: {err}")
                self.failed = True
                rows.append(row)
                continue
            row.update(status="ok", timing=timing.to_dict(), samples_per_s=self.batch / (timing.median_ms * 1e-3),
                       peak_mib=peak, peak_above_resident_mib=above)
            rows.append(row)
            optimizer.zero_grad(set_to_none=True)
            self._free()
        self.model.fused = False
        self.model.set_grad_checkpointing(False)
        by = {r["variant"]: r for r in rows if r["status"] == "ok"}
        for r in rows:
            if r["status"] != "ok":
                continue
            if "limit" in by:
                r["x_limit"] = r["timing"]["median_ms"] / by["limit"]["timing"]["median_ms"]
            ref = by.get("nearl-reference")
            if ref and r.get("peak_mib") and ref.get("peak_mib"):
                r["mem_vs_reference"] = r["peak_mib"] / ref["peak_mib"]
                r["mem_above_resident_vs_reference"] = (r["peak_above_resident_mib"] / ref["peak_above_resident_mib"]
                                                        if ref["peak_above_resident_mib"] else None)
        return rows

    def _around(self, label: str):
        if not self.ranges.enabled:
            return None

        @contextmanager
        def around():
            with ExitStack() as stack:
                stack.enter_context(self.ranges.range(label))
                stack.enter_context(model_ranges(self.model, self.ranges))
                yield
        return around

    def profile(self, path: str) -> None:
        from torch.profiler import ProfilerActivity, profile, record_function

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_gpu else [])
        variants = ["clip", "nearl-reference"] + ([] if self.fused_reason else ["nearl-fused"])
        self.model.train()
        optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=1e-4)
        with profile(activities=activities) as prof:
            for variant in variants:
                for _ in range(2):
                    with record_function(f"model/{variant}/encode_image"):
                        self.encode(variant)()
                train_variant = "limit" if variant == "clip" else variant
                for _ in range(2):
                    with record_function(f"model/{train_variant}/train"):
                        self.train_step(train_variant, optimizer)()
                self._sync()
        self.model.fused = False
        prof.export_chrome_trace(path)
        print(f"torch profiler trace written to {path} (open in chrome://tracing or https://ui.perfetto.dev)")

    def run(self) -> dict:
        fused_err = self._check_fused()
        infer = self.inference()
        train = self.training()
        if self.args.profile:
            self.profile(self.args.profile)
        return {
            "benchmark": "NEARL-CLIP model",
            "kernel": "model",
            **environment(self.device),
            "cpu_only": not self.on_gpu,
            "note": None if self.on_gpu else CPU_NOTE.replace("tiny problems", f"the tiny {self.model_name}"),
            "model": self.model_name,
            "batch": self.batch,
            "autocast": self.args.dtype if self.amp_dtype is not None else "off (fp32)",
            "orth": self.args.orth,
            "reps": self.reps,
            "warmup": self.warmup,
            "trainable_parameters": self.model.num_trainable_parameters(),
            "feature_rel_err_fused_vs_reference": fused_err,
            "inference": infer,
            "train": train,
            "grad_checkpointing": (checkpointing_summary(train, self.on_gpu)
                                   if getattr(self.args, "grad_checkpointing", False) else None),
            "definitions": {
                "clip": "model.backbone.encode_image alone under torch.no_grad (the inference limit)",
                "limit": "frozen backbone: forward of both towers + CLIP loss + backward of activations only, "
                         "from the loss down to the output of the first adapted block of each tower "
                         "(no weight gradients); the least any per-layer adapter's training step must do",
                "train step": "forward of both towers, NEARLLoss, backward to the adapters, AdamW step",
                "x_limit": "median time / median time of the limit",
                "peak_mib": "torch.cuda.max_memory_allocated after reset, one step (weights and optimizer state "
                            "included); peak_above_resident_mib subtracts what was allocated before the step",
                "+ckpt": "the train step with model.set_grad_checkpointing(True): no activation kept inside a "
                         "frozen block, the backward runs it again",
            },
        }


def format_model_report(p: dict) -> str:
    on_gpu = not p["cpu_only"]
    t = "" if on_gpu else "CPU "
    head = [f"NEARL-CLIP model benchmark: {p['model']}   batch {p['batch']}   autocast {p['autocast']}   "
            f"orth {p['orth']}   trainable parameters {p['trainable_parameters']:,}",
            f"device: {p['device']}   torch {p['torch']}   triton {p['triton']}   CUDA {p['cuda']}   "
            f"python {p['python']}   reps {p['reps']} (warmup {p['warmup']})"]
    if not on_gpu:
        head.append(f"!! {p['note']}")

    def timing_cells(r):
        tm = r["timing"]
        return [f"{tm['median_ms']:.4g}", f"{tm['p20_ms']:.4g}", f"{tm['p80_ms']:.4g}"]

    infer_rows = []
    for r in p["inference"]:
        if r["status"] != "ok":
            infer_rows.append(span([r["variant"]], r["reason"]))
            continue
        infer_rows.append([r["variant"]] + timing_cells(r) + [f"{r['images_per_s']:.1f}",
                                                             num(r.get("x_limit"), ".2f", "-") + "x"])
    infer = format_table(["(1) encode_image", f"{t}median ms", "p20 ms", "p80 ms", "images/s", "time/limit"],
                         infer_rows, [False, True, True, True, True, True])
    train_rows = []
    for r in p["train"]:
        if r["status"] != "ok":
            train_rows.append(span([r["variant"]], r["reason"]))
            continue
        train_rows.append([r["variant"]] + timing_cells(r) + [
            f"{r['samples_per_s']:.1f}", num(r.get("x_limit"), ".2f", "-") + "x",
            num(r.get("peak_mib"), ".0f"), num(r.get("peak_above_resident_mib"), ".0f"),
            num(r.get("mem_above_resident_vs_reference"), ".2f", "-")])
    train = format_table(["(2) train step", f"{t}median ms", "p20 ms", "p80 ms", "samples/s", "time/limit",
                          "peak MiB", "above resident MiB", "mem/ref"],
                         train_rows, [False] + [True] * 8)
    err = p["feature_rel_err_fused_vs_reference"]
    foot = [f"fused vs reference image features: rel. err {err['autocast']:.1e} under autocast {p['autocast']}, "
            f"{err['fp32']:.1e} in fp32" if err else "fused vs reference image features: n/a (fused unavailable)",
            "limit (1): the frozen CLIP's encode_image; limit (2): frozen forward of both towers + CLIP loss + "
            "backward of activations down to the first adapted block (no weight grads).",
            "mem/ref: fused / reference peak memory above resident (weights, optimizer state)."]
    foot += format_checkpointing(p.get("grad_checkpointing"))
    if not on_gpu:
        foot.append("CPU numbers: correctness/smoke only; memory is measured on CUDA only.")
    return "\n".join(head + ["", infer, "", train, ""] + foot)


def checkpointing_summary(train: List[dict], on_gpu: bool) -> Dict[str, dict]:
    """Per implementation, the checkpointed step against the plain one: peak memory above resident
    (CUDA only; None on the CPU) and step time, each with its ratio (checkpointed / plain)."""
    by = {r["variant"]: r for r in train if r["status"] == "ok"}
    out = {}
    for base in ("nearl-reference", "nearl-fused"):
        plain, ckpt = by.get(base), by.get(base + CKPT)
        if plain is None or ckpt is None:
            continue
        without, with_ = plain.get("peak_above_resident_mib"), ckpt.get("peak_above_resident_mib")
        out[base] = {
            "peak_above_resident_mib": {"without": without, "with": with_},
            "peak_ratio": with_ / without if on_gpu and without else None,
            "time_ratio": ckpt["timing"]["median_ms"] / plain["timing"]["median_ms"],
        }
    return out


def format_checkpointing(summary: Optional[Dict[str, dict]]) -> List[str]:
    """The footer lines of --grad-checkpointing (none without it)."""
    if summary is None:
        return []
    if not summary:
        return ["grad checkpointing: no pair of plain and checkpointed rows ran (see the table)."]
    lines = []
    for base, s in summary.items():
        peak = s["peak_above_resident_mib"]
        memory = ("peak memory needs CUDA (torch.cuda.max_memory_allocated): not measured on the CPU"
                  if peak["without"] is None or peak["with"] is None else
                  f"peak above resident {peak['without']:.0f} -> {peak['with']:.0f} MiB "
                  f"({num(s['peak_ratio'], '.2f')}x)")
        lines.append(f"grad checkpointing, {base}: {memory}; step time {s['time_ratio']:.2f}x")
    return lines


def run_model(args, device: torch.device, ranges: Ranges) -> Tuple[dict, str]:
    bench = ModelBench(args, device, ranges)
    payload = bench.run()
    return payload, format_model_report(payload)
