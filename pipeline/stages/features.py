"""``features`` stage: the frozen conv base run once over valid, test, and train x N augmented copies,
cached as fp16 so the dense head trains in seconds per epoch (the fast.ai course's fast inner loop).

The cache's format (folders, ``index.csv``, checksummed fp16 chunks, ``meta.json`` written last) is
``pipeline.convfeatures.cache``'s; its rows, chunks and resume are ``pipeline.convfeatures.extract``'s, which
this stage composes: it is the cache's only writer.

What is cached. The backbone's last feature map (vgg16_bn: pool5, 512x7x7 at 224 px: 50 KB per image in fp16, 11 GB
for 10 copies of 22k train images) is average-pooled to ``features.grid`` x ``grid`` and flattened
(channel-major, like ``torch.flatten``). Grid 2 keeps coarse position (left/right hand, top/bottom)
at 512*4*2 = 4 KB per image (0.9 GB for 224k train rows); grid 3 is 9 KB. ``meta.json`` records
``bytes_per_image``.

Failed runs. The device, the inputs and the weights are checked before anything on disk is touched.
The previous ``meta.json`` stays until the new one replaces it, once every split is complete: a
split the failed run did not change still loads, one it had started rebuilding is refused by
readers (``load_split``) for its fingerprint, and a cache without ``meta.json`` is refused.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.competition import read_competition
from pipeline.config import Config
from pipeline.convfeatures.cache import META_FILE
from pipeline.convfeatures.embed import resolve_device
from pipeline.convfeatures.extract import SPLITS, ChunkHook, build_meta, cache_split
from pipeline.io import atomic_write_json
from pipeline.metrics import write_stage_metrics
from pipeline.models import create_backbone, create_conv_base, input_hw, resolve_preprocessing
from pipeline.training.tables import read_image_tables


def run(cfg: Config, on_chunk_written: ChunkHook | None = None) -> dict[str, Any]:
    """Cache conv features for valid, test and train x copies; return the stage figures."""
    start = time.perf_counter()
    # What a run can fail on before computing anything (device, inputs, weights) comes before the cache is touched.
    device = resolve_device(cfg.features.device)
    tables = read_image_tables(cfg, cfg.features.use_sample)
    classes = read_competition(cfg.paths.path("raw")).classes
    backbone = create_backbone(cfg.model)
    data_cfg = resolve_preprocessing(backbone, cfg.model)
    conv_base = create_conv_base(backbone, data_cfg, cfg.features.grid).to(device)
    channels, dim, target_hw = conv_base.channels, conv_base.out_features, input_hw(data_cfg)

    out_dir = cfg.paths.path("features")
    out_dir.mkdir(parents=True, exist_ok=True)
    split_info: dict[str, Any] = {}
    totals = {"chunks_reused": 0, "chunks_computed": 0, "chunks_corrupt": 0, "rows_computed": 0, "seconds": 0.0}
    for name in SPLITS:
        split_info[name], stats = cache_split(cfg, name, tables[name], out_dir / name, conv_base, target_hw, device,
                                              on_chunk_written)
        for key in totals:
            totals[key] += stats[key]
    # Replaces the previous cache's meta.json only now that every split is complete and every chunk vouched for.
    atomic_write_json(out_dir / META_FILE, build_meta(cfg, data_cfg, channels, dim, split_info, classes))

    figures: dict[str, Any] = {
        **{f"n_{name}_images": info["n_images"] for name, info in split_info.items()},
        **{f"n_{name}_rows": info["n_rows"] for name, info in split_info.items()},
        "copies": cfg.features.copies,
        "grid": cfg.features.grid,
        "feature_dim": dim,
        "bytes_per_image": dim * 2,
        "cache_mb": round(sum(i["n_rows"] for i in split_info.values()) * dim * 2 / 2**20, 2),
        "chunks_computed": totals["chunks_computed"],
        "chunks_reused": totals["chunks_reused"],
        "chunks_corrupt": totals["chunks_corrupt"],  # on disk but not the bytes this stage wrote: recomputed
        "images_per_s": round(totals["rows_computed"] / totals["seconds"], 1) if totals["seconds"] > 0 else None,
        "device": device.type,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_stage_metrics(cfg.paths.stage_metrics_file("features"), figures)
    return figures
