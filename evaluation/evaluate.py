"""The official COCO-eval loop: batched inference, the eval post-processing, sharding and gathering.

Per image the result is exactly :func:`~effdet_torch.postprocess.postprocess_per_class` (the
official ``generate_detections`` with per-class soft-NMS over the top-5000 (anchor, class) pairs,
100 per image, boxes × image_scale and not clipped), turned into the official eval rows
``[image_id, x, y, w, h, score, class]``.

Speed without changing a bit of that result:
- images are decoded and preprocessed in DataLoader worker processes where CPUs are left over by
  the network (:func:`resolve_workers`), the network runs batched;
- :func:`reduce_candidates` cuts each image's ``[N, C]`` logits on the device to the anchors that
  hold one of the top-k pairs (all pairs ``>=`` the k-th largest logit, ties included, order kept),
  so only those rows travel to the CPU; the top-k of the reduced set is the same set in the same
  order (the tie rule "lower flat index first" is preserved by an order-keeping subset), so
  ``postprocess_per_class`` returns identical detections (``tests/test_eval_golden.py`` checks it);
- the NMS (the exact NMSV5, compiled on the CPU) runs in a pool of spawned processes where CPUs
  are left over (``post_workers``, :func:`resolve_post_workers`).

Distributed (``torchrun``): the dataset is cut into batches of ``batch_size`` and batch ``j`` goes
to rank ``j % world_size``, so every batch holds the same images as in a one-process run; with
the same threads per process (torchrun defaults OMP_NUM_THREADS to 1) the detections are then
bit-identical to one process. Rank 0 gathers every image's rows (over a gloo group, whatever the
main backend) and scores them.
"""
from __future__ import annotations

import datetime
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from effdet_torch.anchors import generate_anchors
from effdet_torch.config import EfficientDetConfig
from effdet_torch.model import EfficientDet, iter_network
from effdet_torch.postprocess import postprocess_per_class, reduce_candidates
from parity.verdicts import match_detections

from .coco import empty_rows, rows_to_array

__all__ = [
    "DistInfo",
    "EvalOutput",
    "ShardedBatchSampler",
    "detection_agreement",
    "dist_info",
    "gather_to_rank0",
    "postprocess_reduced",
    "reduce_candidates",
    "run_eval",
]


# --------------------------------------------------------------------------------------------
# Exact candidate reduction and the per-image post-processing


def postprocess_reduced(cfg: EfficientDetConfig, image_id: int, scale: float, cls: np.ndarray, box: np.ndarray,
                        anchors: np.ndarray) -> np.ndarray:
    """The official eval post-processing of one image's reduced rows → eval rows ``float32 [K, 7]``."""
    det = postprocess_per_class(cfg, torch.from_numpy(cls)[None], torch.from_numpy(box)[None],
                                torch.from_numpy(anchors), float(scale))
    d = det[0]
    return rows_to_array(image_id, d["boxes"], d["scores"], d["classes"])


def _post_worker_init() -> None:
    torch.set_num_threads(1)


def _post_job(args) -> tuple[int, int, np.ndarray]:
    index, image_id, cfg, scale, cls, box, anchors = args
    return index, image_id, postprocess_reduced(cfg, image_id, scale, cls, box, anchors)


# --------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank / world size of an initialised process group, else from torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str) -> DistInfo:
    """Join torchrun's process group (NCCL for CUDA, else gloo) when ``WORLD_SIZE > 1``."""
    info = dist_info()
    if not info.enabled or torch.distributed.is_initialized():
        return info
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    kw: dict[str, Any] = {}
    if backend == "nccl":
        kw["device_id"] = torch.device("cuda", info.local_rank)
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(hours=3), **kw)
    return dist_info()


_GLOO_GROUP = None


def _object_group():
    """A gloo group for Python-object collectives (works beside an NCCL default group)."""
    global _GLOO_GROUP
    if torch.distributed.get_backend() == "gloo":
        return None
    if _GLOO_GROUP is None:
        _GLOO_GROUP = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=3))
    return _GLOO_GROUP


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (``None`` elsewhere); ``[obj]`` when not distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    world = torch.distributed.get_world_size()
    out = [None] * world if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(obj, out, dst=0, group=_object_group())
    return out


def broadcast_from_rank0(obj: Any) -> Any:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=_object_group())
    return box[0]


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of consecutive indices; batch ``j`` belongs to rank ``j % world_size``.

    Each batch has the same members as in a one-process run, so batch-size dependent float
    rounding in the network cannot make sharded and unsharded detections differ.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        self.mine = self.batches[rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.mine)

    def __len__(self) -> int:
        return len(self.mine)

    @property
    def num_images(self) -> int:
        return sum(len(b) for b in self.mine)


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class EvalOutput:
    """Rows of the evaluated images in dataset order (on rank 0 after gathering).

    ``rows``: ``float32 [N, 7]`` ``[image_id, x, y, w, h, score, class]`` (class 1-based, model
    space); ``row_image_ids``: int64 ids of the rows; ``image_ids``: every evaluated image, in
    dataset order; ``per_image``: ``{image_id: rows}``; ``seconds``/``images``: this process's loop.
    """

    rows: np.ndarray
    row_image_ids: np.ndarray
    image_ids: list[int]
    per_image: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    images: int = 0


def _collate(batch):
    idx, ids, xs, scales = zip(*batch)
    return list(idx), list(ids), torch.stack(xs), torch.stack(scales)


def spare_cpus(device: torch.device) -> int:
    """CPUs the network leaves to decoding and NMS: all of them when it runs on a GPU; on the CPU
    those beyond its intra-op threads (``torch.get_num_threads()``, by default every core)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return n if device.type != "cpu" else max(0, n - torch.get_num_threads())


def resolve_workers(workers: int | str | None, device: torch.device) -> int:
    """DataLoader processes; ``'auto'``: up to 4 of the :func:`spare_cpus`. Processes beside a CPU
    network compete with its threads: measured with d0 at 512² on 2 cores, 200 images, 2 loader
    processes and a 1-process NMS pool gave 9.33 images/s, everything in the main process 11.97."""
    if workers in (None, "auto"):
        return min(4, spare_cpus(device))
    return max(0, int(workers))


def resolve_post_workers(post_workers: int | str | None, num_images: int, device: torch.device) -> int:
    """NMS processes; ``'auto'``: a pool of half the :func:`spare_cpus` (at most 8, at least 1 beside a
    GPU) when there is enough work to pay for spawning it (>= 32 images)."""
    if post_workers in (None, "auto"):
        if num_images < 32:
            return 0
        n = min(8, spare_cpus(device) // 2)
        return n if device.type == "cpu" else max(1, n)
    return max(0, int(post_workers))


@torch.no_grad()
def run_eval(model: EfficientDet, dataset: Dataset, device: str | torch.device = "cpu", batch_size: int = 8,
             num_workers: int | str = "auto", post_workers: int | str | None = "auto", progress: bool = True,
             dist: DistInfo | None = None, on_progress: Callable[[int], None] | None = None,
             allow_tf32: bool = False) -> EvalOutput:
    """Run the official COCO-eval path over ``dataset`` (a :class:`~evaluation.coco.CocoEvalImages`).

    With a process group, this rank evaluates its share and rank 0 receives everybody's rows
    (other ranks get an :class:`EvalOutput` of their own rows only). On CUDA, TF32 matmuls and
    convolutions are switched off for the run (the official eval is float32) unless ``allow_tf32``.
    """
    dist = dist or dist_info()
    device = torch.device(device)
    if device.type == "cuda":
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(allow_tf32)
        try:
            return _run_eval(model, dataset, device, batch_size, num_workers, post_workers, progress, dist,
                             on_progress)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return _run_eval(model, dataset, device, batch_size, num_workers, post_workers, progress, dist, on_progress)


def _run_eval(model, dataset, device: torch.device, batch_size: int, num_workers: int, post_workers,
              progress: bool, dist: DistInfo, on_progress) -> EvalOutput:
    model = model.to(device).eval()
    cfg = model.config
    hw = tuple(dataset.image_size)
    anchors_np = generate_anchors(cfg, hw)
    k = cfg.eval_max_nms_inputs
    sampler = ShardedBatchSampler(len(dataset), batch_size, dist.rank, dist.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=resolve_workers(num_workers, device),
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    n_post = resolve_post_workers(post_workers, sampler.num_images, device)
    pool = None
    if n_post > 0:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(n_post, mp_context=mp.get_context("spawn"), initializer=_post_worker_init)
    bar = None
    if progress and dist.is_main:
        from tqdm import tqdm

        desc = "eval" if not dist.enabled else f"eval rank 0/{dist.world_size}"
        bar = tqdm(total=sampler.num_images, desc=desc, unit=" images", dynamic_ncols=True, smoothing=0.1)
    results: dict[int, tuple[int, np.ndarray]] = {}
    pending: list[Future] = []

    def done(index: int, image_id: int, rows: np.ndarray) -> None:
        results[index] = (image_id, rows)
        if bar is not None:
            bar.update(1)
        if on_progress is not None:
            on_progress(1)

    def drain(limit: int) -> None:
        while len(pending) > limit:
            done(*pending.pop(0).result())

    start = time.perf_counter()
    try:
        for idx, ids, x, scales in loader:
            x = x.to(device, non_blocking=True)
            for first, cls, box in iter_network(model, x):  # on the CPU image by image
                cls, box = cls.float(), box.float()
                for j in range(cls.shape[0]):
                    b = first + j
                    a_idx, c_r, b_r = reduce_candidates(cls[j], box[j], k)
                    a_idx = a_idx.cpu().numpy()
                    args = (idx[b], ids[b], cfg, float(scales[b]), c_r.cpu().numpy(), b_r.cpu().numpy(),
                            anchors_np[a_idx])
                    if pool is None:
                        done(*_post_job(args))
                    else:
                        pending.append(pool.submit(_post_job, args))
            drain(4 * max(1, n_post) * batch_size)
        drain(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    mine = sorted(results.items())
    gathered = gather_to_rank0(mine) if dist.enabled else [mine]
    if gathered is None:  # not rank 0
        return _output(mine, seconds, sampler.num_images)
    everything = sorted((item for part in gathered for item in part), key=lambda t: t[0])
    return _output(everything, seconds, sampler.num_images)


def _output(items: Sequence[tuple[int, tuple[int, np.ndarray]]], seconds: float, images: int) -> EvalOutput:
    per_image = {image_id: rows for _, (image_id, rows) in items}
    image_ids = [image_id for _, (image_id, _) in items]
    chunks = [rows for _, (_, rows) in items]
    rows = np.concatenate(chunks) if chunks else empty_rows()
    row_ids = np.concatenate([np.full(len(r), i, np.int64) for i, r in zip(image_ids, chunks)]) if chunks \
        else np.zeros((0,), np.int64)
    return EvalOutput(rows.astype(np.float32), row_ids, image_ids, per_image, seconds, images)


# --------------------------------------------------------------------------------------------
# Agreement between two runs (CPU vs CUDA, ours vs official)


def detection_agreement(ref: dict[int, np.ndarray], ours: dict[int, np.ndarray]) -> dict[str, float]:
    """Match two runs' eval rows per image with the core rule (``parity.verdicts.match_detections``:
    same class, ``|Δscore| <= 1e-5``, IoU >= 0.9999 or coordinates within ``1e-4·(1 + max|box|)``;
    unmatched rows whose score is within 1e-5 of the image's last kept score are excused as ties at
    the cut-off).

    Returns ``pairs``, ``ties`` and ``bad`` (unmatched, not ties) row counts, ``rows_ref`` and
    ``rows_ours``, ``matched_fraction`` (pairs / max(rows)), ``agreeing_fraction``
    (1 - bad / max(rows)), and ``max_abs_dscore`` / ``max_abs_dbox`` over the pairs.
    """

    def as_det(r: np.ndarray) -> dict[str, np.ndarray]:
        # synthetic weights can overflow exp() in decoding: make ±inf/nan comparable (equal rows match)
        r = np.nan_to_num(np.asarray(r, np.float64), nan=0.0, posinf=1e30, neginf=-1e30)
        # rows are [id, x, y, w, h, score, class] → (ymin, xmin, ymax, xmax)
        boxes = np.stack([r[:, 2], r[:, 1], r[:, 2] + r[:, 4], r[:, 1] + r[:, 3]], 1) if len(r) else np.zeros((0, 4))
        return {"boxes": boxes, "scores": r[:, 5], "classes": r[:, 6]}

    pairs = ties = bad = total_ref = total_ours = 0
    dscore = dbox = 0.0
    for image_id in sorted(set(ref) | set(ours)):
        a = as_det(ref.get(image_id, empty_rows()))
        b = as_det(ours.get(image_id, empty_rows()))
        tol = 1e-4 * (1 + float(np.abs(a["boxes"]).max())) if len(a["scores"]) else 0.0
        m = match_detections(a, b, tol)
        pairs += len(m["pairs"])
        ties += len(m["ties"])
        bad += len(m["bad_ref"]) + len(m["bad_ours"])
        total_ref += len(a["scores"])
        total_ours += len(b["scores"])
        for i, j, _ in m["pairs"]:
            dscore = max(dscore, abs(a["scores"][i] - b["scores"][j]))
            dbox = max(dbox, float(np.abs(a["boxes"][i] - b["boxes"][j]).max()))
    denom = max(total_ref, total_ours, 1)
    return {"matched_fraction": pairs / denom, "agreeing_fraction": 1.0 - bad / denom, "pairs": pairs,
            "ties": ties, "bad": bad, "rows_ref": total_ref, "rows_ours": total_ours,
            "max_abs_dscore": dscore, "max_abs_dbox": dbox}
