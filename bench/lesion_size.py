"""Lesion-size study: zero-shot AUC of the focal findings against lesion diameter in voxels at
the model's input resolution.

    python bench/lesion_size.py --model RUN [--model RUN2 ...] --out DIR
        [--studies 120] [--scales 0.5 1 2] [--seed 7] [--spacing CT=5,4,4 --spacing MR=5,2.6,2.6]
        [--train TRAIN_SHARDS]

Writes one synthetic archive per lesion scale (a new draw, ``--seed``, unseen by training),
ingests each at the model's spacing, embeds every study and scores it with the shipped plain
prompts (``synth``). For each focal finding (lung nodules, brain masses, hematomas) the
positive studies are binned by the diameter of their largest lesion in voxels of the in-plane
input grid (diameter in mm / in-plane spacing), and each bin's positives are scored against all
negative studies of that finding: the AUC at which the model tells a lesion of that size from
none. With ``--train``, the same bins are also scored by a logistic regression fit on the
model's image embeddings of those training studies: what the image side holds at each size,
whatever the prompts; and the zero-shot prompts are grounded in those studies' reports, as
``hlip-eval run`` grounds them in a run's training shards (docs/evaluation.md §4). Prints the table, writes ``DIR/lesion_size.json`` and ``DIR/lesion_size.png``.

The archives and shards are kept in DIR, so a second model reuses them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hlip.evaluate.embed import embed_dataset, load_model, text_encoder
from hlip.evaluate.grounding import model_corpus
from hlip.evaluate.labels import binary_targets
from hlip.evaluate.metrics import roc_auc
from hlip.evaluate.prompts import load_prompts
from hlip.evaluate.zeroshot import run_zeroshot
from hlip.ingest.deid import study_key
from hlip.synth import Sizes, make_archive

FOCAL = {"lung_nodule": "CT", "mass": "MR", "hemorrhage": "MR"}
"""Focal findings of the default study kinds, with the modality whose spacing sizes them."""
SECRET = "lesion-size"
BINS = (0, 2, 3, 4, 6, 8, 12, 100)
"""Bin edges, in voxels of the in-plane input grid."""
BIN_PAIRS = list(zip(BINS[:-1], BINS[1:], strict=True))


def largest_mm(detail: dict) -> float:
    """The diameter (mm) of a finding's largest lesion."""
    if "nodules" in detail:
        return float(max(d for d, _ in detail["nodules"]))
    return float(detail["diameter"])


def build(
    out: Path, scales: list[float], studies: int, seed: int, spacing: list[str]
) -> list[tuple[Path, dict]]:
    """One archive + shard dataset per lesion scale; returns (shards, key -> truth) per scale."""
    built = []
    for index, scale in enumerate(scales):
        archive_dir, shards = out / f"archive-{scale:g}", out / f"shards-{scale:g}"
        truth_file = out / f"truth-{scale:g}.json"
        if not truth_file.exists():
            sizes = Sizes(lesion_scale=scale, ct_coverage_mm=max(160.0, 80 * scale))
            archive = make_archive(archive_dir, n_studies=studies, seed=seed + index, sizes=sizes)
            truth = {
                study_key(s.study_uid, SECRET.encode()): {
                    "labels": s.labels,
                    "mm": {label: largest_mm(d) for label, d in s.findings.items() if label in FOCAL},
                }
                for s in archive.studies
            }
            truth_file.write_text(json.dumps(truth))
        if not (shards / "manifest.parquet").exists():
            spacing_args = [a for s in spacing for a in ("--spacing", s)]
            subprocess.run(
                [sys.executable, "-m", "hlip.ingest.cli", "run", str(archive_dir), "--reports",
                 str(archive_dir / "reports.csv"), "--out", str(shards), *spacing_args, "--secret", SECRET],
                check=True,
            )  # fmt: skip
        built.append((shards, json.loads(truth_file.read_text())))
    return built


def in_plane_mm(spacing: list[str]) -> dict[str, float]:
    """Modality -> in-plane spacing (mm) from ``MOD=z,y,x`` options."""
    return {s.split("=")[0]: float(s.split("=")[1].split(",")[-1]) for s in spacing}


def fit_probes(loaded, train_shards: str) -> dict:
    """Per focal finding, a logistic regression on the model's image embeddings of the
    training studies: what the image side holds, whatever the prompts."""
    emb = embed_dataset(loaded, train_shards)
    fitted = {}
    for label in FOCAL:
        y = binary_targets(emb.labels, label)
        known = ~np.isnan(y)
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        fitted[label] = model.fit(emb.image[known], y[known])
    return fitted


def study(model: str, built: list[tuple[Path, dict]], voxel_mm: dict[str, float], train: str | None) -> dict:
    """Per way of scoring ("zero-shot", and "probe" with ``train``), per focal finding: the
    AUC over all sizes and per diameter bin."""
    loaded = load_model(model)
    encode, prompts = text_encoder(loaded), load_prompts("synth").select(list(FOCAL))
    probes = fit_probes(loaded, train) if train else {}
    corpus = model_corpus(loaded, [train]) if train else None
    rows: dict[str, dict[str, list]] = {}
    for shards, truth in built:
        emb = embed_dataset(loaded, shards)
        result = run_zeroshot(
            emb.image, emb.labels, prompts, encode, loaded.logit_scale, corpus=corpus, n_boot=100
        )
        for label in FOCAL:
            scored = {"zero-shot": result.scores[label]}
            if label in probes:
                scored["probe"] = probes[label].decision_function(emb.image)
            for method, scores in scored.items():
                for key, target, score in zip(emb.keys, result.targets[label], scores, strict=True):
                    if not np.isnan(target):
                        voxels = truth[key]["mm"].get(label, 0.0) / voxel_mm[FOCAL[label]]
                        rows.setdefault(method, {}).setdefault(label, []).append(
                            (int(target), voxels, float(score))
                        )
    return {method: {label: binned(r) for label, r in by_label.items()} for method, by_label in rows.items()}


def binned(rows: list[tuple[int, float, float]]) -> dict:
    """AUC over all sizes, and of each diameter bin's positives against all negatives."""
    y, voxels, s = (np.array(c) for c in zip(*rows, strict=True))
    negatives = s[y == 0]
    out = {"auc_all": roc_auc(y, s), "bins": []}
    for low, high in BIN_PAIRS:
        inside = (y == 1) & (voxels >= low) & (voxels < high)
        if inside.sum() >= 3:
            both = np.r_[np.ones(inside.sum()), np.zeros(len(negatives))]
            auc = roc_auc(both, np.r_[s[inside], negatives])
            out["bins"].append(
                {
                    "voxels": [low, high],
                    "mean_voxels": float(voxels[inside].mean()),
                    "n": int(inside.sum()),
                    "auc": auc,
                }
            )
    return out


def model_name(model: str) -> str:
    """A short name for a model path: its run folder."""
    path = Path(model)
    return path.parent.name if path.name in ("run", "checkpoints") or path.suffix == ".pt" else path.name


def print_tables(tables: dict) -> None:
    for model, methods in tables.items():
        print(f"\n{model}")
        print(
            "| finding | scored by | all sizes | " + " | ".join(f"{a}-{b} vox" for a, b in BIN_PAIRS) + " |"
        )
        print("|---" * (len(BINS) + 2) + "|")
        for label in FOCAL:
            for method, table in methods.items():
                row = table[label]
                cells = {tuple(b["voxels"]): f"{b['auc']:.2f} ({b['n']})" for b in row["bins"]}
                line = [cells.get((a, b), "-") for a, b in BIN_PAIRS]
                print(f"| {label} | {method} | {row['auc_all']:.3f} | " + " | ".join(line) + " |")


def plot(tables: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FOCAL), figsize=(4 * len(FOCAL), 3.2), sharey=True)
    for ax, label in zip(axes, FOCAL, strict=True):
        for model, methods in tables.items():
            for method, table in methods.items():
                bins = table[label]["bins"]
                x, y = [b["mean_voxels"] for b in bins], [b["auc"] for b in bins]
                ax.plot(x, y, "o-" if method == "zero-shot" else "s--", label=f"{model_name(model)} {method}")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(title=label, xlabel="largest lesion diameter (voxels in-plane)", ylim=(0.0, 1.02))
    axes[0].set_ylabel("AUC against negatives")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--studies", type=int, default=120, help="studies per archive (half CT, half MR)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--spacing", action="append", default=None)
    parser.add_argument(
        "--train", help="training shards: also score by a linear probe on their image embeddings"
    )
    args = parser.parse_args()
    spacing = args.spacing or ["CT=5,4,4", "MR=5,2.6,2.6"]
    args.out.mkdir(parents=True, exist_ok=True)
    built = build(args.out, args.scales, args.studies, args.seed, spacing)
    tables = {model: study(model, built, in_plane_mm(spacing), args.train) for model in args.model}
    print_tables(tables)
    (args.out / "lesion_size.json").write_text(json.dumps(tables, indent=2))
    plot(tables, args.out / "lesion_size.png")
    print(f"\nwrote {args.out / 'lesion_size.json'} and {args.out / 'lesion_size.png'}")


if __name__ == "__main__":
    main()
