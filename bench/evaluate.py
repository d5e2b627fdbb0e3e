"""Bootstrap confidence intervals: hlip's resample-weight AUC against scikit-learn per resample.

Baseline: the usual loop, ``sklearn.metrics.roc_auc_score`` on each bootstrap resample.
Both use the same resamples (hlip turns the drawn indices into per-study counts), so the
values must agree to rounding; the benchmark checks that and prints both times and their ratio.

    .venv/bin/python bench/evaluate.py [--studies 2000] [--labels 18] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from hlip.evaluate.metrics import bootstrap_indices, label_rng, resample_weights, weighted_auc


def sklearn_bootstrap(y: np.ndarray, s: np.ndarray, idx: np.ndarray) -> np.ndarray:
    values = []
    for rows in idx:
        yy = y[rows]
        values.append(roc_auc_score(yy, s[rows]) if 0 < yy.sum() < yy.size else np.nan)
    return np.array(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--labels", type=int, default=18)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y = rng.random((args.labels, args.studies)) < rng.uniform(0.05, 0.4, (args.labels, 1))
    s = y * 0.8 + rng.normal(size=y.shape)  # scores with ties-free noise, AUC ~0.7
    s = np.round(s, 2)  # and ties, as probabilities rounded in a CSV would have
    idx = [bootstrap_indices(args.studies, args.resamples, label_rng(0, str(i))) for i in range(args.labels)]

    start = time.perf_counter()
    ours = [
        weighted_auc(y[i], s[i], resample_weights(args.studies, args.resamples, label_rng(0, str(i))))
        for i in range(args.labels)
    ]
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    theirs = [sklearn_bootstrap(y[i], s[i], idx[i]) for i in range(args.labels)]
    t_sklearn = time.perf_counter() - start

    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-12)
    print(f"{args.labels} labels x {args.studies} studies x {args.resamples} bootstrap resamples (AUC)")
    print(f"  baseline sklearn roc_auc_score per resample: {t_sklearn:8.2f} s")
    print(f"  hlip resample-weight AUC (incl. drawing):    {t_ours:8.2f} s")
    print(f"  speed-up: {t_sklearn / t_ours:.1f}x (identical values); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
