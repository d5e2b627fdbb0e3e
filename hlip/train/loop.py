"""The training loop, top to bottom: set-up, resume, steps, checkpoints, logs.

``train(config)`` is everything ``hlip-train`` does. One optimizer step is: take
``accum_steps`` micro-batches of packed studies, run the CLIP model (bf16 autocast on GPU),
compute the contrastive loss over all ranks, backpropagate (DDP averages the gradients),
check that loss and gradient are finite, clip, step AdamW (fused on CUDA) and the
warmup+cosine schedule, clamp the temperature. Around it: periodic checkpoints (exact resume),
metrics.jsonl + TensorBoard + a progress bar on rank 0, and an optional zero-shot evaluation.

On CUDA a step reads from the device once: loss, gradient norm and finiteness in one copy,
which decides the update. Everything else is queued without waiting, and while the GPU runs a
micro-batch the next one is taken from the loader and copied on a side stream (``DeviceFeed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hlip.model.attention import compile_blocks
from hlip.train import checkpoint as ckpt
from hlip.train.config import TrainConfig, save_config
from hlip.train.data import (
    Batch,
    DataState,
    StudyFilter,
    build_train_loader,
    count_studies,
    require_sources,
)
from hlip.train.distributed import DistInfo, all_gather_objects, barrier, init_distributed, shutdown

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm was NaN/Inf (``nan_policy = "raise"``)."""


class TooManySkippedError(RuntimeError):
    """More than ``max_skipped_share`` of the studies read were skipped: the data is damaged."""


SKIP_CHECK_STUDIES = 100
"""Studies read before the skipped share can stop a run (one bad study among the first
few is not yet a damaged dataset); the end of a run checks whatever was read."""


@dataclass
class TrainResult:
    step: int
    loss: float
    run_dir: Path
    checkpoint: Path | None
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    """Studies skipped over the whole run (all ranks), by reason."""


def train(config: TrainConfig, resume: str = "") -> TrainResult:
    """Run (or continue, with ``resume`` = a checkpoint path or ``"auto"``) one training run."""
    info = init_distributed(config.device)
    try:
        return _train(config, resume, info)
    finally:
        shutdown()


def _train(config: TrainConfig, resume: str, info: DistInfo) -> TrainResult:
    run_dir = config.run_dir
    require_sources(config.data)
    total_steps = resolve_steps(config)

    # --- model, loss, optimizer, schedule (identical initial weights on every rank) -----------
    torch.manual_seed(config.seed)
    model, tokenizer = ckpt.build_model(config, info.device.type)
    if config.init_checkpoint:
        ckpt.load_initial_weights(model, config.init_checkpoint)
    model.to(info.device)
    trunk = model.visual.trunk
    trunk.attn_backend = config.attention
    compiled = compile_blocks(trunk.blocks, config.compile_backend) if config.compile else None
    loss_fn = create_loss(model, info, config.soft_targets)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(config, total_steps))

    # --- resume: weights, optimizer, schedule, step, data position and RNG of this rank -------
    step, data_state, rng = 0, DataState(), None
    resume_path = ckpt.find_resume(resume, run_dir)
    if resume_path is not None:
        payload = ckpt.read_checkpoint(resume_path)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        step = payload["step"]
        data_state, rng = rank_state(payload, config, info)
        log.info("rank %d resumed from %s at step %d", info.rank, resume_path, step)

    ddp_model = wrap_ddp(model, config, info)
    loader = build_train_loader(
        config,
        tokenizer,
        model.visual.trunk.patch_size,
        info.rank,
        info.world_size,
        data_state,
        pin_memory=info.device.type == "cuda",
    )
    if info.is_main:  # only now: a run that cannot start leaves no run folder behind
        save_config(config, run_dir)
        log.debug("resolved config:\n%s", json.dumps(config.to_dict(), indent=2, sort_keys=True))
    feed = DeviceFeed(iter(loader), info)
    run_log = RunLog(config, info, start_step=step, total_steps=total_steps)
    grounding = eval_grounding(config, tokenizer, info)  # before seeding: loading it draws random weights
    if rng is not None:
        ckpt.set_rng_state(rng)
    else:
        seed_rank(config.seed, info.rank)

    # --- the loop ---------------------------------------------------------------------------------
    model.train()
    loss_value, saved = float("nan"), None
    check_syncs = config.sync_debug and info.device.type == "cuda"
    while step < total_steps:
        step_start = time.perf_counter()
        data_wait, losses, keys = 0.0, [], []
        with host_sync_check(check_syncs):
            for micro in range(config.accum_steps):
                batch, waited = feed.take()
                data_wait += waited
                data_state.advance(batch)
                keys += batch.keys
                run_log.keys(step + 1, batch, data_state)
                last_micro = micro == config.accum_steps - 1
                sync = contextlib.nullcontext() if last_micro or not info.distributed else ddp_model.no_sync()
                with sync:
                    loss = loss_fn(**ddp_model(batch.packed, batch.tokens))
                    (loss / config.accum_steps).backward()
                losses.append(loss.detach())
                if not (last_micro and step + 1 == total_steps):
                    data_wait += feed.prefetch()  # while the GPU still runs this micro-batch
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None], config.grad_clip or float("inf")
            )
            logit_scale = model.logit_scale.detach().exp()
        loss_value, norm_value, scale_value, finite = reduce_step(
            torch.stack(losses).mean(), grad_norm, logit_scale, info
        )
        lr = optimizer.param_groups[0]["lr"]
        with host_sync_check(check_syncs):
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, config.max_logit_scale)
        if not finite:
            handle_nonfinite(config, step + 1, loss_value, norm_value, keys, info)
        step += 1

        step_time = time.perf_counter() - step_start
        skipped = skipped_studies(data_state, info)
        check_skipped(config, skipped, step * config.batch_size + skipped, data_state, info, final=False)
        run_log.step(
            step,
            loss=loss_value,
            lr=lr,
            grad_norm=norm_value,
            logit_scale=scale_value,
            studies_per_s=config.batch_size / step_time,
            data_wait=data_wait / step_time,
            epoch=data_state.epoch,
            skipped=skipped,
            finite=finite,
            **({"compiled_graphs": compiled.graphs} if compiled is not None else {}),
        )
        if step % config.checkpoint_every == 0 or step == total_steps:
            saved = save(model, optimizer, scheduler, step, config, data_state, info)
        if config.eval_every and (step % config.eval_every == 0 or step == total_steps):
            run_log.evaluation(step, evaluate(model, tokenizer, config, info, grounding))

    last = run_dir / "checkpoints" / ckpt.LAST
    if info.is_main and saved is not None:
        refusal = ckpt.openclip_refusal(config)
        if refusal:
            log.warning("no open_clip export: %s", refusal)
        else:
            ckpt.export_openclip(saved, run_dir / "checkpoints" / "openclip.pt")
    run_log.close()
    skipped = skipped_studies(data_state, info)
    reasons = check_skipped(config, skipped, step * config.batch_size + skipped, data_state, info, final=True)
    return TrainResult(step, loss_value, run_dir, last if saved is not None else None, reasons)


# --- steps and schedule --------------------------------------------------------------------------


def resolve_steps(config: TrainConfig) -> int:
    """``steps``, or ``epochs`` x filtered studies / global batch when steps is 0."""
    if config.steps > 0:
        return config.steps
    n = count_studies(config.data, StudyFilter.from_config(config), config.data_version)
    if n is None:
        raise ValueError("epochs needs dataset directories with a manifest; give steps for URL sources")
    return max(1, math.ceil(config.epochs * n / config.batch_size))


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup_steps``, then cosine decay to ``min_lr``.

    A callable object (not a lambda) so LambdaLR stores its settings in the state dict.
    """

    def __init__(self, config: TrainConfig, total_steps: int) -> None:
        self.warmup = config.warmup_steps
        self.total = total_steps
        self.floor = config.min_lr / config.lr if config.lr else 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases, the temperature and the SigLIP bias (as CLIP);
    the pretrained text encoder at ``text_lr`` when it is set (its new projection learns at ``lr``;
    the schedule scales every group alike). Fused (one kernel for all parameters) on CUDA."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or name.endswith(".bias") or name in ("logit_scale", "logit_bias")
        lr = config.text_lr if config.text_lr and name.startswith("text.transformer.") else config.lr
        groups.setdefault((lr, 0.0 if exempt else config.weight_decay), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=all(p.is_cuda for group in groups.values() for p in group) or None,
    )


# --- distributed pieces ----------------------------------------------------------------------------


def create_loss(model: nn.Module, info: DistInfo, soft_targets: float = 0.0) -> nn.Module:
    from hlip.model.losses import create_loss as make

    kind = "siglip" if getattr(model, "logit_bias", None) is not None else "clip"
    return make(kind, info.rank, info.world_size, soft_targets=soft_targets)


def wrap_ddp(model: nn.Module, config: TrainConfig, info: DistInfo) -> nn.Module:
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=config.find_unused_parameters
    )


def seed_rank(seed: int, rank: int) -> None:
    """Training randomness (patch dropout, ...) differs per rank but is fixed by the seed."""
    import random

    torch.manual_seed(seed + 1 + rank)
    np.random.seed((seed + 1 + rank) % 2**32)
    random.seed(seed + 1 + rank)


def rank_state(payload: dict[str, Any], config: TrainConfig, info: DistInfo) -> tuple[DataState, dict | None]:
    """This rank's data position and RNG from a checkpoint.

    Exact only with the same world size and worker count; otherwise every reader restarts at
    the beginning of the latest epoch any rank had reached (a warning says so).
    """
    same_layout = payload["world_size"] == info.world_size and payload["num_workers"] == config.num_workers
    if same_layout:
        return DataState.from_dict(payload["data"][info.rank]), payload["rng"][info.rank]
    epoch = max(DataState.from_dict(d).epoch for d in payload["data"])
    log.warning(
        "checkpoint was written with world_size=%d, num_workers=%d (now %d, %d): data restarts at epoch %d",
        payload["world_size"],
        payload["num_workers"],
        info.world_size,
        config.num_workers,
        epoch + 1,
    )
    readers = max(1, config.num_workers)
    return DataState({r: (epoch + 1, 0) for r in range(readers)}), None


class DeviceFeed:
    """Micro-batches on the training device, the next one taken from the loader while the GPU
    still runs the current one.

    ``prefetch`` waits for the loader (the time it returns is the data wait) and, on CUDA,
    starts the pinned, non-blocking copy on a side stream; ``take`` makes the compute stream
    wait for that copy on the GPU (an event, not a host wait) and hands the batch over. A
    prefetched batch is not yet counted in the data position, so a checkpoint taken meanwhile
    resumes with it.
    """

    def __init__(self, batches: Iterator[Batch], info: DistInfo) -> None:
        self.batches, self.info = batches, info
        self.stream = torch.cuda.Stream(info.device) if info.device.type == "cuda" else None
        self.ready: Batch | None = None

    def prefetch(self) -> float:
        """Take the next batch and start its copy; returns the seconds spent waiting for it."""
        start = time.perf_counter()
        batch = next_batch(self.batches, self.info)
        waited = time.perf_counter() - start
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            self.ready = batch.to(self.info.device)
        return waited

    def take(self) -> tuple[Batch, float]:
        """(the prefetched batch, or one fetched now; seconds waited here for the loader)."""
        waited = self.prefetch() if self.ready is None else 0.0
        batch, self.ready = self.ready, None
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.info.device)
            compute.wait_stream(self.stream)

            def used_on_compute(t: torch.Tensor) -> torch.Tensor:
                t.record_stream(compute)  # the allocator must not reuse it while compute reads it
                return t

            batch.packed = batch.packed.apply(used_on_compute)
            batch.tokens = {k: used_on_compute(v) for k, v in batch.tokens.items()}
        return batch, waited


@contextlib.contextmanager
def host_sync_check(enabled: bool):
    """With ``enabled``, warn at every host synchronisation in the block (CUDA's sync debug mode)."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def next_batch(batches: Iterator[Batch], info: DistInfo) -> Batch:
    try:
        return next(batches)
    except StopIteration:
        raise RuntimeError(
            f"rank {info.rank} has no training studies: every reader of this rank found its share of the "
            "data empty (fewer studies than ranks x workers, or filters removed them all)"
        ) from None


def reduce_step(
    loss: torch.Tensor, grad_norm: torch.Tensor, logit_scale: torch.Tensor, info: DistInfo
) -> tuple[float, float, float, bool]:
    """(mean loss over ranks, this rank's gradient norm, the step's temperature, whether loss and
    gradient were finite on every rank): one collective and the step's one read from the device."""
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    stats = torch.stack([torch.where(finite, loss.float(), 0.0), (~finite).float()]).to(info.device)
    if info.distributed:
        torch.distributed.all_reduce(stats)
    loss_sum, bad_ranks, norm, scale = torch.cat(
        [stats, grad_norm.float()[None], logit_scale.float()[None]]
    ).tolist()
    if bad_ranks:
        return float("nan"), norm, scale, False
    return loss_sum / info.world_size, norm, scale, True


def handle_nonfinite(
    config: TrainConfig, step: int, loss: float, grad_norm: float, keys: list[str], info: DistInfo
) -> None:
    """Stop with the step and studies (``raise``) or drop the update and go on (``skip``)."""
    message = (
        f"non-finite loss or gradient at step {step} (rank {info.rank}: loss {loss}, grad norm "
        f"{grad_norm}); studies of this rank's batch: {', '.join(keys)}"
    )
    if config.nan_policy == "raise":
        raise NonFiniteLossError(message)
    log.warning("%s; update skipped", message)


def check_skipped(
    config: TrainConfig, skipped: int, read: int, state: DataState, info: DistInfo, final: bool
) -> dict[str, int]:
    """Skips by reason over all ranks (at the end, or when they stop the run); raise
    TooManySkippedError when their share of the ``read`` studies exceeds the config's.

    ``skipped`` and ``read`` are totals over ranks, so every rank decides alike (the
    reasons are gathered collectively only when needed)."""
    too_many = skipped > config.max_skipped_share * read and (final or read >= SKIP_CHECK_STUDIES)
    if not (final or too_many):
        return {}
    reasons = sum((Counter(r) for r in all_gather_objects(dict(state.reasons()), info)), Counter())
    summary = ", ".join(f"{reason} ({n})" for reason, n in reasons.most_common())
    if too_many and skipped:
        raise TooManySkippedError(
            f"{skipped} of {read} studies read were skipped ({skipped / read:.0%} > max_skipped_share "
            f"{config.max_skipped_share:.0%}): {summary}; check the data with hlip-shards verify"
        )
    if skipped and info.is_main:
        log.warning("skipped %d of %d studies read: %s", skipped, read, summary)
    return dict(reasons.most_common())


def skipped_studies(state: DataState, info: DistInfo) -> int:
    """Studies skipped so far (undecodable or failing the transform), summed over ranks."""
    if not info.distributed:
        return state.total_skipped
    total = torch.tensor([state.total_skipped], dtype=torch.float64, device=info.device)
    torch.distributed.all_reduce(total)
    return int(total.item())


def save(model, optimizer, scheduler, step, config, data_state, info) -> dict[str, Any]:
    """Gather every rank's data position and RNG; rank 0 writes the checkpoint."""
    data_states = all_gather_objects(data_state.to_dict(), info)
    rng_states = all_gather_objects(ckpt.rng_state(), info)
    payload = ckpt.checkpoint_payload(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        step=step,
        config=config,
        data_states=data_states,
        rng_states=rng_states,
    )
    if info.is_main:
        path = ckpt.save_checkpoint(payload, config.run_dir, config.keep_checkpoints)
        log.info("saved %s", path)
    barrier(info)
    return payload


# --- evaluation hook --------------------------------------------------------------------------------


def evaluates(config: TrainConfig, info: DistInfo) -> bool:
    """Whether this rank runs the zero-shot evaluation (rank 0, with data, prompts and a cadence)."""
    return bool(info.is_main and config.eval_every and config.val_data and config.prompts)


def eval_grounding(config: TrainConfig, tokenizer: Any, info: DistInfo):
    """The training reports' sentences that ground the evaluation's prompts, read once per run
    as ``hlip-eval`` reads them (:mod:`hlip.evaluate.grounding`), so the metrics logged in
    training are the ones ``hlip-eval`` gives the checkpoint; None without grounding."""
    if not evaluates(config, info):
        return None
    from hlip.evaluate.grounding import grounding_paths, read_report_sentences

    paths = grounding_paths(config.eval_ground, config.data)
    if not paths:
        return None
    return read_report_sentences(paths, config.text_sections, tokenizer.drop_measurements, config.text_prefix)


def evaluate(
    model: nn.Module, tokenizer: Any, config: TrainConfig, info: DistInfo, grounding=None
) -> dict[str, float]:
    """Zero-shot metrics on ``val_data`` with ``prompts`` (rank 0; the others wait), grounded in
    ``grounding`` (:func:`eval_grounding`) when given."""
    metrics: dict[str, float] = {}
    if evaluates(config, info):
        model.eval()
        try:
            metrics = zero_shot_metrics(model, tokenizer, config, info.device, grounding)
        finally:
            model.train()
    barrier(info)
    return metrics


@torch.no_grad()
def embed_studies(model: nn.Module, tokenizer: Any, config: TrainConfig, sources: list[str], device):
    """Normalised image embeddings and labels of every study in ``sources`` (evaluation transform)."""
    from hlip.shards.stream import stream_studies
    from hlip.train.data import Collate, StudyTransform

    transform = StudyTransform(config, train=False)
    collate = Collate(tokenizer, model.visual.trunk.patch_size)
    embeddings, labels, batch = [], [], []
    studies = stream_studies(sources, shardshuffle=False, rank=0, world_size=1, skip_errors=True)

    def flush() -> None:
        collated = collate(batch)
        embeddings.append(model.encode_image(collated.packed.to(device), normalize=True).float().cpu())
        labels.extend(collated.labels)
        batch.clear()

    for study in studies:
        batch.append(transform(study))
        if len(batch) == config.micro_batch_size(1):
            flush()
    if batch:
        flush()
    return torch.cat(embeddings).numpy(), labels


def zero_shot_metrics(
    model: nn.Module, tokenizer: Any, config: TrainConfig, device, grounding=None
) -> dict[str, float]:
    """Zero-shot metrics of the model on ``val_data``, flattened; the prompts grounded in
    ``grounding`` (:class:`hlip.evaluate.grounding.ReportSentences`) when given."""
    from hlip.evaluate.prompts import load_prompts
    from hlip.evaluate.zeroshot import run_zeroshot

    images, labels = embed_studies(model, tokenizer, config, config.val_data, device)

    @torch.no_grad()
    def encode(sentences):
        return model.encode_text(tokenizer(list(sentences)), normalize=True).float().cpu().numpy()

    result = run_zeroshot(
        images,
        labels,
        load_prompts(config.prompts),
        encode,
        float(model.logit_scale.detach().exp()),
        corpus=grounding.corpus(encode) if grounding is not None else None,
        n_boot=0,
    )
    return flatten_metrics(result.metrics)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metric dicts -> ``{"binary/<label>/auc": value, ...}`` of finite floats."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


# --- logging -----------------------------------------------------------------------------------------


class RunLog:
    """metrics.jsonl, TensorBoard and the progress bar on rank 0; per-rank study-key logs.

    A resumed run truncates the logs to the checkpoint's step first, so they read as if the
    run had never stopped (TensorBoard is told the same with ``purge_step``).
    """

    def __init__(self, config: TrainConfig, info: DistInfo, start_step: int, total_steps: int) -> None:
        self.config, self.info = config, info
        run_dir = config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.keys_path = run_dir / f"keys-rank{info.rank}.jsonl" if config.log_keys else None
        if self.keys_path is not None:
            truncate_jsonl(self.keys_path, start_step)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.writer = self.progress = None
        if not info.is_main:
            return
        truncate_jsonl(self.metrics_path, start_step)
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if config.progress:
            self.progress, self.task = progress_bar(start_step, total_steps)

    def keys(self, step: int, batch: Batch, state: DataState) -> None:
        if self.keys_path is None:
            return
        rows = [
            {"step": step, "key": k, "epoch": e, "reader": r}
            for k, (r, e, _) in zip(batch.keys, batch.positions, strict=True)
        ]
        with self.keys_path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def step(self, step: int, **values: Any) -> None:
        if not self.info.is_main:
            return
        record = {"step": step, **values}
        self._append(record)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", float(value), step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, **{k: values[k] for k in PROGRESS_FIELDS})
        elif step % self.config.log_every == 0 or step == 1:
            log.info(
                "step %d loss %.4f lr %.3g studies/s %.2f data-wait %.0f%%",
                step,
                values["loss"],
                values["lr"],
                values["studies_per_s"],
                100 * values["data_wait"],
            )

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if not self.info.is_main or not metrics:
            return
        self._append({"step": step, **{f"val/{k}": v for k, v in metrics.items()}})
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"val/{name}", value, step)
        aucs = {k: round(v, 4) for k, v in metrics.items() if k.endswith("auc/value")}
        log.info("step %d zero-shot: %s", step, aucs)

    def _append(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.progress is not None:
            self.progress.stop()


PROGRESS_FIELDS = ("loss", "lr", "studies_per_s", "data_wait")


def progress_bar(start_step: int, total_steps: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
        TextColumn("{task.fields[studies_per_s]:.1f} studies/s  data-wait {task.fields[data_wait]:.0%}"),
        TimeRemainingColumn(),
    )
    task = progress.add_task(
        "train",
        total=total_steps,
        completed=start_step,
        loss=float("nan"),
        lr=0.0,
        studies_per_s=0.0,
        data_wait=0.0,
    )
    progress.start()
    return progress, task


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records of steps after ``step`` (written by a run that was killed after its checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    path.write_text("".join(kept))
