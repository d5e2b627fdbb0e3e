"""Cross-modal retrieval between studies and their reports.

Each study's report is the one correct match for its image embedding, and vice versa.
Ranks follow :func:`hlip.evaluate.metrics.retrieval_ranks` (ties count against the
query). Studies without report text are left out: their text embedding describes an
empty string, not the study.
"""

from __future__ import annotations

import numpy as np

from hlip.evaluate.metrics import recall_at_k, retrieval_ranks
from hlip.evaluate.zeroshot import l2_normalize

RECALL_KS = (1, 5, 10)
DIRECTIONS = {"image_to_report": False, "report_to_image": True}


def run_retrieval(
    image_embeddings: np.ndarray,
    report_embeddings: np.ndarray,
    has_report: np.ndarray | None = None,
    ks: tuple[int, ...] = RECALL_KS,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Recall@k, median and mean rank in both directions; also returns the ranks per direction."""
    keep = (
        np.ones(len(image_embeddings), dtype=bool)
        if has_report is None
        else np.asarray(has_report, dtype=bool)
    )
    similarity = l2_normalize(image_embeddings[keep]) @ l2_normalize(report_embeddings[keep]).T
    results: dict = {"n": int(keep.sum()), "n_without_report": int((~keep).sum())}
    ranks = {}
    for direction, transpose in DIRECTIONS.items():
        r = retrieval_ranks(similarity.T if transpose else similarity)
        ranks[direction] = r
        results[direction] = {
            **{f"recall@{k}": recall_at_k(r, k) for k in ks},
            "median_rank": float(np.median(r)) if r.size else float("nan"),
            "mean_rank": float(r.mean()) if r.size else float("nan"),
        }
    return results, ranks
