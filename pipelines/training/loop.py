"""The one training loop every trainer uses (:func:`run_training`); a trainer supplies a :class:`TrainingTask`.

The loop owns everything that is not the model's own business:

* **accelerate**: one process or several (DDP), the device, mixed precision by autocast with the trained
  weights kept in fp32 (the task's frozen modules are cast to fp16/bf16 and moved to the device here).
* **Deterministic order and noise**: the training rows come from an endless stream of per-epoch
  permutations seeded by ``seed`` and the epoch (:func:`sample_indices`); every random draw of micro-step
  ``m`` on process ``r`` comes from the generator :func:`step_generator` ``(seed, m, r)`` handed to the
  task's loss. So a run resumed from a checkpoint takes exactly the steps an uninterrupted run takes.
* **Optimisation**: AdamW, diffusers' lr schedules, gradient accumulation (no DDP sync but on the last
  micro-step) and clipping.
* **Checkpoints** (``accelerator.save_state`` plus the trained model in its own format, ``save``'d into
  ``checkpoint-<step>/<model_name>/``) every ``checkpointing_steps``, at most ``checkpoints_total_limit``
  kept; the next call resumes from the newest complete one if it was made by the same recipe on the same
  data (:func:`recipe_fingerprint`) and not past ``max_train_steps``.
* **Divergence**: a non-finite loss (or gradient norm, outside fp16's loss scaling) stops the run with
  :class:`NonFiniteTraining`; weights are checked finite before every save.
* **Logs** in the DVCLive layout (dvclive itself is not needed): ``<log_dir>/metrics.json``,
  ``<log_dir>/plots/metrics/train/<name>.tsv`` for the loss, every part of it and the lr (one row per
  optimizer step), validation images ``<log_dir>/plots/images/validation/step-<k>.png`` + ``latest.png``.
* **Output**: the task's ``save`` and model card, written beside ``output_dir`` and swapped in whole.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from pipelines.errors import PipelineError
from pipelines.generation import seed_for
from pipelines.runtime import seed_everything

log = logging.getLogger("pipelines.training.loop")

CHECKPOINT_PREFIX = "checkpoint-"
STEP_FILE = "facecontrol_step.json"  # written last into a checkpoint: its presence marks it complete
METRICS_DIR = Path("plots/metrics/train")
IMAGES_DIR = Path("plots/images/validation")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteTraining(PipelineError):
    """The loss, the gradients or the weights became NaN or infinite: the run stopped and wrote no model."""


@dataclass(frozen=True)
class LoopSettings:
    """The knobs of the loop itself (a trainer's settings extend these with its model's own)."""

    learning_rate: float = 1e-5
    train_batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "fp32"  # fp32 | fp16 | bf16 (accelerate calls fp32 "no")
    max_train_steps: int = 25000
    checkpointing_steps: int = 5000
    checkpoints_total_limit: int | None = 2
    validation_steps: int = 5000
    seed: int = 0
    dataloader_num_workers: int = 0
    lr_scheduler: str = "constant"  # constant | constant_with_warmup | linear | cosine
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0


class TrainingTask(Protocol):
    """What a trainer hands :func:`run_training`: the model, its loss, its validation and how it is saved.

    ``model`` is trained (its weights stay fp32); ``frozen`` modules are cast to the mixed-precision dtype and
    moved to the device by the loop; ``rows`` is the training set as a map-style dataset of tensor dicts
    (batched by :func:`collate`). ``loss`` gets the model as accelerate prepared it (call it, not
    ``self.model``, so that DDP synchronizes the gradients), a batch on the CPU and the micro-step's CPU
    generator (all its randomness must come from it); it returns the loss and its parts (logged one TSV each).
    ``validate``, ``save`` and ``write_card`` run on the main process only and use ``self.model``.
    """

    name: str  # the trainer, in messages ("train_controlnet")
    model_name: str  # the model's folder in a checkpoint: checkpoint-<step>/<model_name>/
    diverged_hint: str  # what to change when the loss diverges
    model: torch.nn.Module
    frozen: Sequence[torch.nn.Module]
    rows: torch.utils.data.Dataset

    def recipe(self) -> dict:
        """The task's settings that change what a step computes (part of the checkpoint fingerprint)."""

    def data_identity(self) -> str:
        """The training data's identity (a content digest): checkpoints made on other data are not resumed."""

    def loss(self, model: torch.nn.Module, batch: dict, generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch and its named parts."""

    def validate(self, step: int) -> Image.Image | None:
        """An image of the model's current output (None: nothing to show)."""

    def save(self, out_dir: Path) -> None:
        """Write the model into ``out_dir`` in its loadable format (diffusers' ``save_pretrained``)."""

    def write_card(self, out_dir: Path, steps: int, metrics: dict) -> None:
        """Write the model card into ``out_dir`` (beside :meth:`save`'s files)."""


# --- data order and noise ---------------------------------------------------------------------------------


def collate(rows: list[dict]) -> dict:
    """Batch transformed rows: a key's tensors stacked when their shapes agree, else kept as a list."""
    out: dict[str, Any] = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        same = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
        out[k] = torch.stack(values) if same else values
    return out


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the ``n`` rows in ``epoch``: ``torch.randperm`` under the seed ``seed * 1_000_003 + epoch``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start+count-1`` of the endless stream of epoch permutations of ``n`` rows."""
    if n < 1:
        raise ValueError("no training rows")
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        take = min(count - len(out), n - offset)
        out += epoch_permutation(n, seed, epoch)[offset:offset + take]
        pos += take
    return out


def batch_stream(n: int, seed: int, batch_size: int, start_micro_step: int, process_index: int = 0,
                 num_processes: int = 1) -> Iterator[list[int]]:
    """Row indices for each micro-step from ``start_micro_step`` on, this process's share: micro-step ``m``
    takes stream positions ``[m*B*P + r*B, m*B*P + (r+1)*B)``, so the order does not depend on where a run
    was resumed."""
    m = start_micro_step
    while True:
        yield sample_indices(n, seed, (m * num_processes + process_index) * batch_size, batch_size)
        m += 1


def epochs_seen(steps: int, s: LoopSettings, num_processes: int, train_rows: int) -> float:
    """How many passes over ``train_rows`` rows ``steps`` optimizer steps make (the seed: ~1 epoch of the
    100K set matured, 3 overfit)."""
    return steps * s.train_batch_size * s.gradient_accumulation_steps * num_processes / train_rows


def step_generator(seed: int, micro_step: int, process_index: int = 0) -> torch.Generator:
    """The CPU generator for every random draw of one micro-step (noise, timesteps, caption choice, ...)."""
    return torch.Generator().manual_seed(seed_for(f"train:{micro_step}:{process_index}", seed))


# --- logs and checkpoints ---------------------------------------------------------------------------------


class MetricsLog:
    """DVCLive-layout logs written without dvclive: one TSV per metric under ``plots/metrics/train/``
    (``step<TAB>name``), the latest values in ``metrics.json`` (``{"step": k, "train": {...}}``)."""

    def __init__(self, log_dir: str | Path):
        self.dir = Path(log_dir)
        (self.dir / METRICS_DIR).mkdir(parents=True, exist_ok=True)

    def tsv(self, name: str) -> Path:
        """The TSV file of metric ``name``."""
        return self.dir / METRICS_DIR / f"{name}.tsv"

    def log(self, step: int, values: dict[str, float]) -> None:
        """Append one row per metric and rewrite ``metrics.json``."""
        for name, value in values.items():
            path = self.tsv(name)
            new = not path.is_file()
            with open(path, "a") as fh:
                if new:
                    fh.write(f"step\t{name}\n")
                fh.write(f"{step}\t{float(value):.8g}\n")
        self.write_summary(step, values)

    def write_summary(self, step: int, values: dict[str, float], extra: dict | None = None) -> None:
        """Rewrite ``metrics.json`` with ``values`` at ``step`` (and ``extra`` top-level entries)."""
        from pipelines.reports import write_json

        write_json(self.dir / "metrics.json", {"step": step, "train": dict(values), **(extra or {})})

    def truncate(self, last_step: int) -> None:
        """Drop rows after ``last_step`` (logged by an interrupted run past its last checkpoint)."""
        for path in (self.dir / METRICS_DIR).glob("*.tsv"):
            rows = read_tsv(path)
            with open(path, "w") as fh:
                fh.write(f"step\t{path.stem}\n")
                for step, value in rows:
                    if step <= last_step:
                        fh.write(f"{step}\t{value:.8g}\n")

    def values_at(self, step: int) -> dict[str, float]:
        """Every metric whose last row is ``step``, by name (a run resumed at its target reports these)."""
        out = {}
        for path in sorted((self.dir / METRICS_DIR).glob("*.tsv")):
            rows = read_tsv(path)
            if rows and rows[-1][0] == step:
                out[path.stem] = rows[-1][1]
        return out


def read_tsv(path: str | Path) -> list[tuple[int, float]]:
    """The ``(step, value)`` rows of a metric TSV written by :class:`MetricsLog`."""
    with open(path) as fh:
        reader = csv.reader(fh, delimiter="\t")
        next(reader, None)
        return [(int(r[0]), float(r[1])) for r in reader if r]


#: loop settings that change what a step computes: a checkpoint made under other values is not resumed
_RECIPE_KEYS = ("learning_rate", "train_batch_size", "gradient_accumulation_steps", "mixed_precision", "seed",
                "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                "max_grad_norm")


def recipe_fingerprint(s: LoopSettings, num_processes: int = 1, extra: dict | None = None) -> dict:
    """What a checkpoint must match to be resumed: the loop's recipe, the process count, the schedule length
    when the lr schedule depends on it, and ``extra`` (the task's recipe, the data, the base model's revision)."""
    out: dict[str, Any] = {k: getattr(s, k) for k in _RECIPE_KEYS}
    out["num_processes"] = num_processes
    if s.lr_scheduler in ("linear", "cosine"):
        out["max_train_steps"] = s.max_train_steps
    out.update(extra or {})
    return out


def list_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those holding the step file), oldest first, as ``(step, path)``."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        if m and (p / STEP_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(checkpoints_dir: str | Path, limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``limit`` (None: keep all), and incomplete ones."""
    root = Path(checkpoints_dir)
    removed = []
    if root.is_dir():
        complete = {p for _, p in list_checkpoints(root)}
        for p in root.iterdir():
            if p.name.startswith(CHECKPOINT_PREFIX) and p not in complete and p.is_dir():
                shutil.rmtree(p)
                removed.append(p)
    if limit is not None:
        ckpts = list_checkpoints(root)
        for _, p in ckpts[:max(0, len(ckpts) - limit)]:
            shutil.rmtree(p)
            removed.append(p)
    return removed


def check_finite(model: torch.nn.Module, step: int, trainer: str = "training",
                 hint: str = "lower the learning rate") -> None:
    """Raise :class:`NonFiniteTraining` when a parameter of ``model`` holds a NaN or an infinity (checked
    before every checkpoint and the final save, so none holds such weights)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteTraining(f"{trainer}: the {type(model).__name__} weight {name} is not finite after step "
                                    f"{step}; no model was written: {hint}")


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as the GPU it stands for (the current one), so reports name it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _dtype_name(module: torch.nn.Module) -> str:
    return str(next(module.parameters()).dtype).replace("torch.", "")


# --- the loop ---------------------------------------------------------------------------------------------


def _resume(accelerator: Any, task: TrainingTask, s: LoopSettings, checkpoints_dir: Path, end: int,
            identity: dict | None) -> tuple[int, str | None, dict | None]:
    """Discard checkpoints of another recipe or past ``max_train_steps``, load the newest one left; returns
    ``(global_step, resumed_from, fingerprint)``."""
    world = accelerator.num_processes
    fingerprint = None
    ckpts = list_checkpoints(checkpoints_dir)
    if ckpts or s.checkpointing_steps <= end:  # hashing the data is only needed to resume or to checkpoint
        data_id = [task.data_identity() if accelerator.is_main_process else None]
        if world > 1:  # one process reads the data; all get its digest
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(data_id)
        fingerprint = json.loads(json.dumps(recipe_fingerprint(
            s, world, {**task.recipe(), **(identity or {}), "dataset": data_id[0]})))
    stale, past, differ = [], [], set()
    for step, path in ckpts:
        saved = json.loads((path / STEP_FILE).read_text()).get("recipe") or {}
        if saved != fingerprint:  # another recipe, base model or dataset: discarded, never mixed
            stale.append(path)
            differ |= {k for k in {*saved, *fingerprint} if saved.get(k) != fingerprint.get(k)}
        elif step > s.max_train_steps:  # made by a longer run: resuming it would go past the target
            past.append(path)
    if stale:
        log.warning("%s: checkpoints were made with another recipe (%s differ); they are discarded", checkpoints_dir,
                    ", ".join(sorted(differ)))
    if past:
        log.info("%s: checkpoints past max_train_steps %d are removed: %s", checkpoints_dir, s.max_train_steps,
                 ", ".join(p.name for p in past))
    if stale or past:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for p in stale + past:
                shutil.rmtree(p)
        accelerator.wait_for_everyone()
        ckpts = [(step, p) for step, p in ckpts if p not in stale + past]
    if not ckpts:
        return 0, None, fingerprint
    global_step, path = ckpts[-1]
    accelerator.load_state(str(path))
    log.info("resumed from %s (step %d)", path, global_step)
    return global_step, str(path), fingerprint


def _forget_after(metrics: MetricsLog, images_dir: Path, step: int) -> None:
    """Drop what a previous (interrupted or longer) run logged after ``step``: TSV rows and validation images."""
    metrics.truncate(step)
    images = {int(png.stem.split("-")[1]): png for png in images_dir.glob("step-*.png")}
    for k in [k for k in images if k > step]:
        images.pop(k).unlink()
    latest = images_dir / "latest.png"
    if latest.is_file():  # the newest image left, not a later step's
        latest.unlink()
        if images:
            shutil.copyfile(images[max(images)], latest)


def run_training(task: TrainingTask, settings: LoopSettings, output_dir: str | Path, checkpoints_dir: str | Path,
                 log_dir: str | Path, *, cpu: bool = False, stop_after: int | None = None,
                 identity: dict | None = None, on_step: Callable[[int, Any], None] | None = None) -> dict:
    """Train (or resume) ``task``'s model; returns a summary dict.

    Resumes from the newest complete checkpoint under ``checkpoints_dir`` at or before ``max_train_steps``;
    checkpoints past it (a longer earlier run) are removed, so a run never continues past its target and the
    model it saves is the one of ``max_train_steps`` steps. With ``stop_after`` the run stops after that
    optimizer step (as if interrupted: no final save), which the tests use. A checkpoint whose
    :func:`recipe_fingerprint` (with the task's recipe, ``identity``, e.g. the base model's revision, and the
    task's data identity) differs from this run's is discarded (with a warning), never resumed. ``cpu``: train
    on the CPU; else on accelerate's device (in one process the current CUDA device). A loss or gradient norm
    that becomes non-finite raises :class:`NonFiniteTraining` (no model is written then). The final model
    replaces ``output_dir`` whole (written beside it, then renamed). ``on_step(global_step, model)`` is called
    on every process after each optimizer step (after that step's logging, checkpoint and validation) with
    ``task.model`` (the unwrapped model); a benchmark times steps with it.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    s = settings
    # the process-wide RNGs (python, numpy, torch) land in every checkpoint's random_states: seeded, a checkpoint
    # is the same file whenever the same run makes it (the training draws themselves use their own generators)
    seed_everything(s.seed)
    accelerator = Accelerator(mixed_precision="no" if s.mixed_precision == "fp32" else s.mixed_precision,
                              gradient_accumulation_steps=s.gradient_accumulation_steps, cpu=cpu)
    rank, world = accelerator.process_index, accelerator.num_processes
    output_dir, checkpoints_dir, log_dir = Path(output_dir), Path(checkpoints_dir), Path(log_dir)
    for m in task.frozen:
        m.requires_grad_(False)
        m.to(accelerator.device, dtype=DTYPES[s.mixed_precision])
    task.model.train()

    optimizer = torch.optim.AdamW(task.model.parameters(), lr=s.learning_rate, betas=(s.adam_beta1, s.adam_beta2),
                                  weight_decay=s.adam_weight_decay, eps=s.adam_epsilon)
    lr_scheduler = get_scheduler(s.lr_scheduler, optimizer, num_warmup_steps=s.lr_warmup_steps * world,
                                 num_training_steps=s.max_train_steps * world)
    model, optimizer, lr_scheduler = accelerator.prepare(task.model, optimizer, lr_scheduler)
    train_rows = len(task.rows)

    end = s.max_train_steps if stop_after is None else min(stop_after, s.max_train_steps)
    global_step, resumed_from, fingerprint = _resume(accelerator, task, s, checkpoints_dir, end, identity)
    metrics = MetricsLog(log_dir) if accelerator.is_main_process else None
    images_dir = log_dir / IMAGES_DIR
    last = {"loss": float("nan"), "lr": lr_scheduler.get_last_lr()[0]}
    if metrics is not None:
        _forget_after(metrics, images_dir, global_step)
        last.update({k: v for k, v in metrics.values_at(global_step).items() if k != "lr"})  # resumed at its target

    loader = torch.utils.data.DataLoader(
        task.rows, batch_sampler=batch_stream(train_rows, s.seed, s.train_batch_size,
                                              global_step * s.gradient_accumulation_steps, rank, world),
        num_workers=s.dataloader_num_workers, collate_fn=collate)
    batches = iter(loader)

    start_step, t0 = global_step, time.perf_counter()
    while global_step < end:
        losses: list[torch.Tensor] = []
        for k in range(s.gradient_accumulation_steps):
            gen = step_generator(s.seed, global_step * s.gradient_accumulation_steps + k, rank)
            batch = next(batches)
            last_micro = k == s.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                loss, parts = task.loss(model, batch, gen)
                accelerator.backward(loss)  # divides by gradient_accumulation_steps itself
            losses.append(torch.stack([loss.detach(), *(v.detach() for v in parts.values())]))
        # the same values on every process (reduced; the gradients are synchronized): all stop together
        values = accelerator.reduce(torch.stack(losses).mean(0), reduction="mean").tolist()
        step_loss = values[0]
        if not math.isfinite(step_loss):
            raise NonFiniteTraining(f"{task.name}: the loss is {step_loss} at step {global_step + 1}; "
                                    f"no model was written: {task.diverged_hint}")
        if s.max_grad_norm > 0:
            norm = float(accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm))
            if not math.isfinite(norm) and s.mixed_precision != "fp16":  # fp16's loss scaler skips such steps
                raise NonFiniteTraining(f"{task.name}: the gradient norm is {norm} at step {global_step + 1} "
                                        f"(loss {step_loss:.6g}); no model was written: {task.diverged_hint}")
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1

        last = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], **dict(zip(parts, values[1:], strict=True))}
        if metrics is not None:
            metrics.log(global_step, last)
        if global_step % s.checkpointing_steps == 0:
            check_finite(task.model, global_step, task.name, task.diverged_hint)
            ckpt = checkpoints_dir / f"{CHECKPOINT_PREFIX}{global_step}"
            accelerator.wait_for_everyone()
            accelerator.save_state(str(ckpt))
            if accelerator.is_main_process:
                task.save(ckpt / task.model_name)  # a loadable model, so an evaluation can compare steps
                (ckpt / STEP_FILE).write_text(json.dumps({"step": global_step, "recipe": fingerprint}) + "\n")
                prune_checkpoints(checkpoints_dir, s.checkpoints_total_limit)
            accelerator.wait_for_everyone()
        if accelerator.is_main_process and (global_step % s.validation_steps == 0 or global_step == s.max_train_steps):
            image = task.validate(global_step)
            if image is not None:
                images_dir.mkdir(parents=True, exist_ok=True)
                image.save(images_dir / f"step-{global_step}.png")
                image.save(images_dir / "latest.png")
        if on_step is not None:
            on_step(global_step, task.model)
    seconds = time.perf_counter() - t0
    steps_done = global_step - start_step
    finished = global_step == s.max_train_steps
    if finished:
        check_finite(task.model, global_step, task.name, task.diverged_hint)
    accelerator.wait_for_everyone()

    summary: dict[str, Any] = {
        "global_step": global_step, "steps_this_run": steps_done, "seconds": seconds,
        "steps_per_second": steps_done / seconds if seconds > 0 and steps_done else None,
        "resumed_from": resumed_from, "final_loss": last["loss"], "final_lr": last["lr"],
        "num_processes": world, "mixed_precision": s.mixed_precision, "device": str(_indexed(accelerator.device)),
        "train_rows": train_rows, "epochs": epochs_seen(global_step, s, world, train_rows), "finished": finished,
        f"{task.model_name}_dtype": _dtype_name(task.model),
        "frozen_dtype": _dtype_name(task.frozen[0]) if task.frozen else None,
    }
    if metrics is not None and finished:
        staging = output_dir.with_name(f".{output_dir.name}.partial")  # a killed run's is replaced here
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        task.save(staging)
        rows = read_tsv(metrics.tsv("loss")) if metrics.tsv("loss").is_file() else []
        tail = [v for _, v in rows[-max(1, min(100, len(rows))):]]
        card_metrics = {"steps": global_step, "final_loss": last["loss"],
                        "mean_loss_last_steps": sum(tail) / len(tail) if tail else float("nan"),
                        "first_loss": rows[0][1] if rows else float("nan")}
        summary.update(card_metrics)
        task.write_card(staging, global_step, card_metrics)
        if output_dir.exists():  # an older model (another step count or run): replaced whole, never mixed
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
        metrics.write_summary(global_step, last, {"mean_loss_last_steps": card_metrics["mean_loss_last_steps"]})
    accelerator.end_training()
    return summary
