"""k-sparse probing of SAE latents on the BBC News categories (SAEBench's "sparse probing" metric).

Sources:

- A. Karvonen et al. 2025, "SAEBench: A Comprehensive Benchmark for Sparse Autoencoders in Language Model
  Interpretability" (sparse probing eval; reference code ``sae_bench/evals/sparse_probing``);
- W. Gurnee et al. 2023, "Finding Neurons in a Haystack: Case Studies with Sparse Probing" (k-sparse
  probes; ranking by the difference of class means is one of their feature-selection methods);
- L. Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (k-sparse probes on SAE latents as a
  downstream quality metric).

Definitions:

- Representation of a sequence: the mean over its token rows (the positions the context conventions keep,
  by default 1..ctx_len-1: position 0 is dropped at extraction; ``row_counts`` of each shard) of the SAE
  latents ``z = sae.encode(x)``, giving ``[n_seq, d_sae]``. The dense
  baseline uses the mean of the raw residual activations ``x`` instead, ``[n_seq, d_in]``. SAEBench
  likewise encodes every token and then mean-pools over the non-BOS, non-pad tokens.
- Tasks: one binary one-vs-rest task per category present in both splits (BBC News: 5 categories).
- Selection (SAEBench ``get_top_k_mean_diff_mask``): the ``k`` features with the largest
  ``|mean(train positives) - mean(train negatives)|``, computed on the raw (unstandardised) pooled
  features of the TRAIN sequences only. Ties go to the lower feature index (stable sort).
- Probe: ``StandardScaler`` + ``sklearn.linear_model.LogisticRegression`` (L2, ``C=1``, lbfgs,
  ``max_iter=1000``, ``class_weight="balanced"``, ``random_state=seed``) on those ``k`` features of the
  train sequences; the scaler is fitted on the train sequences only.
- Metric: balanced accuracy (mean of the true-positive and true-negative rates) on the EVAL sequences,
  in [0, 1]; chance is 0.5 whatever the class ratio. The headline number for each ``k`` is its mean over
  the evaluated categories.

Deliberate differences from the SAEBench reference code (recorded here, not hidden):

- Balancing: SAEBench subsamples the negatives (an equal share from each other class) down to the number
  of positives and reports plain accuracy. Here all sequences are kept, the loss is class-weighted
  (``class_weight="balanced"``) and the score is balanced accuracy, which is what plain accuracy would
  be in expectation on a test set balanced with negatives drawn at random from all other classes
  (SAEBench draws an equal share from each other class, which weighs the negative classes equally).
  This is deterministic and wastes no data. The negative mean in the selection rule is therefore the
  mean over all other-class sequences (weighted by class frequency), not over a stratified subsample.
- Standardisation: SAEBench fits the logistic regression on raw features; here features are
  standardised first (so ``C=1`` means the same for latents of any scale). The *selection* is on raw
  features, as in SAEBench.
- Dense baseline: SAEBench trains a torch probe (AdamW, early stopping on test accuracy); here it is the
  same sklearn probe as above on all ``d_in`` dimensions, with no early stopping.
- Data: SAEBench uses its own classification sets (bias_in_bios, Amazon reviews, AG News, Europarl,
  GitHub code; 4,000 train / 1,000 test texts each, truncated to 128 tokens); here the sequences are
  consecutive ``ctx_len``-token chunks of BBC News articles, split by document (:mod:`rsae.data`). The
  chunks of one article all land in the same split, so sequences are not independent samples: small
  evaluation sets give noisy numbers.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .activations import ActivationStore
from .saes import SAE

PROBE_KS: tuple[int, ...] = (1, 2, 5, 10, 20)
"""Default probe sizes k. SAEBench's default ``k_values`` is (1, 2, 5); 10 and 20 are added here."""

METRIC = "balanced_accuracy"
"""Name of the score reported for every probe (see the module docstring)."""

PROBE_C = 1.0
"""Inverse L2 strength of the logistic regression (sklearn default, as in SAEBench)."""

PROBE_MAX_ITER = 1000
"""lbfgs iteration cap (SAEBench raises sklearn's 100 to 1000 for the same reason: convergence)."""


# -- pooling ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _pool(
    store: ActivationStore,
    encode: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    device: torch.device | str,
    max_sequences: int | None,
    batch_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if max_sequences is not None and (
        isinstance(max_sequences, bool) or not isinstance(max_sequences, int) or max_sequences < 1
    ):
        raise ValueError(f"max_sequences must be a positive integer or None, got {max_sequences!r}")
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive integer, got {batch_rows!r}")
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    n = 0
    for shard in store.iter_shards():
        acts, lab = shard["acts"], shard["label"].long()
        counts = shard.get("row_counts")
        if counts is None:  # shards written before row_counts: ctx_len - 1 rows per sequence
            counts = torch.full_like(lab, store.ctx_len - 1)
        counts = counts.long()
        ends = torch.cumsum(counts, 0)
        starts = ends - counts
        # the last shard may end inside a sequence (extraction cuts to exactly n_tokens): drop that sequence;
        # so is a sequence without rows (all its positions excluded)
        full = (ends <= acts.shape[0]) & (counts > 0)
        keep = torch.nonzero(full & (lab >= 0)).squeeze(1)
        if max_sequences is not None:
            keep = keep[: max_sequences - n]
        i = 0
        while i < keep.shape[0]:
            j, rows = i, 0  # whole sequences, about batch_rows rows (at least one sequence)
            while j < keep.shape[0] and (j == i or rows + int(counts[keep[j]]) <= batch_rows):
                rows += int(counts[keep[j]])
                j += 1
            idx = keep[i:j]
            x = torch.cat([acts[starts[k] : ends[k]] for k in idx.tolist()]).to(device)  # [rows, d_in]
            if encode is not None:
                x = encode(x)
            c = counts[idx]
            if bool((c == c[0]).all()):  # equal lengths (no special tokens excluded): a plain mean
                feats.append(x.float().reshape(idx.shape[0], int(c[0]), -1).mean(dim=1).cpu())
            else:
                seg = torch.repeat_interleave(torch.arange(idx.shape[0], device=x.device), c.to(x.device))
                sums = torch.zeros(idx.shape[0], x.shape[1], device=x.device).index_add_(0, seg, x.float())
                feats.append((sums / c.to(x.device).unsqueeze(1)).cpu())
            i = j
        labels.append(lab[keep])
        n += keep.shape[0]
        if max_sequences is not None and n >= max_sequences:
            break
    if not feats:  # no labelled sequence; pooled_latents sets the width to d_sae
        return torch.empty(0, store.d_in if encode is None else 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


def pooled_latents(
    sae: SAE, store: ActivationStore, max_sequences: int | None = None, batch_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled SAE latents of every labelled sequence of ``store``.

    For sequence ``i`` with rows ``x_i`` [r_i, d_in] (its kept positions, by default 1..ctx_len-1), the feature
    vector is ``mean_over_rows(sae.encode(x_i))`` [d_sae] (latent units, as ``encode`` returns them). Sequences
    with label -1 (unlabelled text) are skipped; so is a sequence cut short at the end of the last shard.
    Source: SAEBench's ``get_sae_meaned_activations`` (encode each token, then mean over tokens).

    Args:
        sae: any :class:`rsae.saes.SAE`; encoding runs on its parameters' device, without gradients.
        store: extracted activations (:class:`rsae.activations.ActivationStore`) with ``d_in == sae.d_in``.
        max_sequences: keep only the first ``max_sequences`` labelled sequences (store order); None = all.
        batch_rows: about this many token rows are encoded at once (rounded down to whole sequences, at
            least one sequence). Memory: one shard plus one batch of ``[batch_rows, d_sae]`` latents.

    Returns:
        ``(features [s, d_sae] float32, labels [s] int64)``, labels being indices into the store's
        ``manifest["labels"]`` (``rsae.data.BBC_CATEGORIES`` for BBC News). ``s`` may be 0.

    Raises:
        ValueError: ``sae.d_in != store.d_in``, or a non-positive ``max_sequences`` / ``batch_rows``.
    """
    if sae.d_in != store.d_in:
        raise ValueError(f"SAE d_in={sae.d_in} does not match the activations' d_in={store.d_in}")
    device = next(sae.parameters()).device
    f, y = _pool(store, sae.encode, device=device, max_sequences=max_sequences, batch_rows=batch_rows)
    if f.shape[0] == 0:
        f = torch.empty(0, sae.d_sae)
    return f, y


def pooled_activations(
    store: ActivationStore, max_sequences: int | None = None, batch_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled raw residual activations of every labelled sequence of ``store`` (dense baseline input).

    Same sequences, order and labels as :func:`pooled_latents`; the feature of sequence ``i`` is
    ``mean_over_rows(x_i)`` [d_in] in residual-stream units. Source: SAEBench's
    ``create_meaned_model_activations``.

    Args:
        store: extracted activations.
        max_sequences: keep only the first ``max_sequences`` labelled sequences; None = all.
        batch_rows: rows pooled at once (memory: one shard plus one batch).

    Returns:
        ``(features [s, d_in] float32, labels [s] int64)``.

    Raises:
        ValueError: a non-positive ``max_sequences`` / ``batch_rows``.
    """
    return _pool(store, None, device="cpu", max_sequences=max_sequences, batch_rows=batch_rows)


# -- probes ----------------------------------------------------------------------------------------------


def _as_features(x: Any, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {list(a.shape)}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def _as_labels(y: Any, n: int, name: str) -> np.ndarray:
    a = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per feature row), got shape {list(a.shape)}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.equal(np.mod(a, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
    return a.astype(np.int64, copy=False)


def _prepare(train_feats, train_labels, test_feats, test_labels, class_names):
    xtr = _as_features(train_feats, "train_feats")
    xte = _as_features(test_feats, "test_feats")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train and test features differ in width: {xtr.shape[1]} vs {xte.shape[1]}")
    ytr = _as_labels(train_labels, xtr.shape[0], "train_labels")
    yte = _as_labels(test_labels, xte.shape[0], "test_labels")
    # label -1 = unlabelled text: not part of any task
    xtr, ytr = xtr[ytr >= 0], ytr[ytr >= 0]
    xte, yte = xte[yte >= 0], yte[yte >= 0]
    ctr, cte = np.unique(ytr), np.unique(yte)
    if ctr.size < 2:
        raise ValueError(
            f"one-vs-rest probing needs at least 2 classes among the labelled train sequences; "
            f"found {ctr.size} ({ctr.tolist()}) in {ytr.size} sequences"
        )
    if cte.size < 2:
        raise ValueError(
            f"one-vs-rest probing needs at least 2 classes among the labelled test sequences; "
            f"found {cte.size} ({cte.tolist()}) in {yte.size} sequences"
        )

    def name(c: int) -> str:
        return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)

    classes, skipped = [], {}
    for c in np.union1d(ctr, cte).tolist():
        if c not in ctr:
            skipped[name(c)] = "absent from train"
        elif c not in cte:
            skipped[name(c)] = "absent from test"
        else:
            classes.append((c, name(c)))
    if not classes:
        raise ValueError(f"no class is present in both train ({ctr.tolist()}) and test ({cte.tolist()})")
    return xtr, ytr, xte, yte, classes, skipped


def _fit_score(
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    yte: np.ndarray,
    seed: int,
) -> tuple[float, bool]:
    """Standardise + class-weighted L2 logistic regression; (balanced accuracy on test, converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # default penalty is L2 in every supported sklearn (``penalty=`` is deprecated from 1.8 on)
    clf = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, class_weight="balanced", random_state=seed),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(xtr, ytr)
    converged = True
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False  # counted in the result's "not_converged"
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return float(balanced_accuracy_score(yte, clf.predict(xte))), converged


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return [int(k) for k in dict.fromkeys(ks)]


def top_k_mean_diff(feats: np.ndarray | torch.Tensor, positive: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Indices of the ``k`` features with the largest ``|mean(positives) - mean(negatives)|``.

    SAEBench's selection rule (``get_top_k_mean_diff_mask``; Gurnee et al. 2023's mean-difference
    ranking). Ties go to the lower index; ``k`` is clipped to the number of features.

    Args:
        feats: ``[n, d]`` features (raw, not standardised).
        positive: ``[n]`` booleans, True for the positive class; both classes must occur.
        k: number of features wanted (>= 1).

    Returns:
        ``[min(k, d)]`` int64 feature indices, best first.

    Raises:
        ValueError: one of the two classes is empty, or ``k < 1``.
    """
    x = _as_features(feats, "feats")
    pos = np.asarray(positive.cpu() if isinstance(positive, torch.Tensor) else positive, dtype=bool)
    if pos.shape != (x.shape[0],):
        raise ValueError(f"positive must have shape [{x.shape[0]}], got {list(pos.shape)}")
    if pos.all() or not pos.any():
        raise ValueError("top_k_mean_diff needs both positive and negative rows")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    diff = np.abs(x[pos].mean(0) - x[~pos].mean(0))
    return np.argsort(-diff, kind="stable")[: min(k, x.shape[1])].astype(np.int64)


def sparse_probe_accuracy(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    ks: Sequence[int] = PROBE_KS,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """k-sparse one-vs-rest probes: balanced test accuracy per category and its mean, for each k.

    For each class ``c`` present in both splits: select the top-k features by |difference of class means|
    on the train rows (:func:`top_k_mean_diff`), fit the standardised, class-weighted L2 logistic
    regression on them, and score balanced accuracy on the test rows (module docstring). Sources:
    Karvonen et al. 2025 (SAEBench), Gurnee et al. 2023, Gao et al. 2024.

    Args:
        train_feats, test_feats: ``[n_train, d]`` / ``[n_test, d]`` pooled features (torch or numpy),
            e.g. from :func:`pooled_latents`.
        train_labels, test_labels: ``[n_train]`` / ``[n_test]`` integer class indices; rows labelled -1
            are dropped (unlabelled).
        ks: probe sizes; a ``k`` above ``d`` is clipped to ``d`` and recorded in ``"k_clipped"``.
        seed: ``random_state`` of the logistic regression (lbfgs is deterministic; kept for the record).
        class_names: names of the class indices (e.g. ``BBC_CATEGORIES``) used as ``per_class`` keys;
            indices without a name are keyed by ``str(index)``.

    Returns:
        ``{"metric": "balanced_accuracy", "ks": [k, ...], "k": {"<k>": mean over evaluated classes},
        "k_clipped": {"<k>": effective k} (only the clipped ones), "per_class": {name: {"k": {"<k>": acc},
        "latents": {"<k>": [feature indices, best first]}, "n_train_pos": int, "n_test_pos": int}},
        "skipped_classes": {name: reason}, "n_train": int, "n_test": int, "n_features": d,
        "n_classes": evaluated classes, "not_converged": number of fits that hit the iteration cap,
        "seed": seed}``. Accuracies are in [0, 1]; chance is 0.5.

    Raises:
        ValueError: fewer than 2 classes among the labelled train (or test) rows, no class in both
            splits, mismatched shapes, non-finite features, or invalid ``ks``.
    """
    ks = _check_ks(ks)
    xtr, ytr, xte, yte, classes, skipped = _prepare(train_feats, train_labels, test_feats, test_labels, class_names)
    d = xtr.shape[1]
    eff = {k: min(k, d) for k in ks}
    per_class: dict[str, Any] = {}
    not_converged = 0
    for c, name in classes:
        pos_tr, pos_te = ytr == c, yte == c
        order = top_k_mean_diff(xtr, pos_tr, max(eff.values()))
        accs, sel, cache = {}, {}, {}
        for k in ks:
            ke = eff[k]
            if ke not in cache:
                idx = order[:ke]
                acc, ok = _fit_score(xtr[:, idx], pos_tr, xte[:, idx], pos_te, seed)
                not_converged += not ok
                cache[ke] = (acc, idx.tolist())
            accs[str(k)], sel[str(k)] = cache[ke]
        per_class[name] = {"k": accs, "latents": sel, "n_train_pos": int(pos_tr.sum()), "n_test_pos": int(pos_te.sum())}
    mean = {str(k): float(np.mean([pc["k"][str(k)] for pc in per_class.values()])) for k in ks}
    return {
        "metric": METRIC,
        "ks": ks,
        "k": mean,
        "k_clipped": {str(k): eff[k] for k in ks if eff[k] != k},
        "per_class": per_class,
        "skipped_classes": skipped,
        "n_train": int(ytr.size),
        "n_test": int(yte.size),
        "n_features": d,
        "n_classes": len(per_class),
        "not_converged": not_converged,
        "seed": seed,
    }


def dense_probe_accuracy(
    train_feats, train_labels, test_feats, test_labels, seed: int = 0, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Dense one-vs-rest probes on all ``d`` features (the upper reference SAEBench reports).

    Same probe, balancing, metric and degenerate-case handling as :func:`sparse_probe_accuracy`, without
    feature selection. Intended input: :func:`pooled_activations` (mean-pooled residual stream, d = d_in).

    Args:
        train_feats, test_feats: ``[n_train, d]`` / ``[n_test, d]`` features (torch or numpy).
        train_labels, test_labels: integer class indices; -1 rows are dropped.
        seed: ``random_state`` of the logistic regression.
        class_names: names of the class indices, used as ``per_class`` keys.

    Returns:
        ``{"metric": "balanced_accuracy", "accuracy": mean over evaluated classes, "per_class": {name:
        {"accuracy": acc, "n_train_pos": int, "n_test_pos": int}}, "skipped_classes": {name: reason},
        "n_train", "n_test", "n_features", "n_classes", "not_converged", "seed"}``.

    Raises:
        ValueError: as :func:`sparse_probe_accuracy`.
    """
    xtr, ytr, xte, yte, classes, skipped = _prepare(train_feats, train_labels, test_feats, test_labels, class_names)
    per_class: dict[str, Any] = {}
    not_converged = 0
    for c, name in classes:
        pos_tr, pos_te = ytr == c, yte == c
        acc, ok = _fit_score(xtr, pos_tr, xte, pos_te, seed)
        not_converged += not ok
        per_class[name] = {"accuracy": acc, "n_train_pos": int(pos_tr.sum()), "n_test_pos": int(pos_te.sum())}
    return {
        "metric": METRIC,
        "accuracy": float(np.mean([pc["accuracy"] for pc in per_class.values()])),
        "per_class": per_class,
        "skipped_classes": skipped,
        "n_train": int(ytr.size),
        "n_test": int(yte.size),
        "n_features": xtr.shape[1],
        "n_classes": len(per_class),
        "not_converged": not_converged,
        "seed": seed,
    }


def _store_class_names(train_store: ActivationStore, eval_store: ActivationStore) -> list[str] | None:
    a, b = train_store.manifest.get("labels"), eval_store.manifest.get("labels")
    if a is not None and b is not None and list(a) != list(b):
        raise ValueError(f"train and eval stores use different label lists: {a} vs {b}")
    return list(a if a is not None else b) if (a is not None or b is not None) else None


def probe_sae(
    sae: SAE,
    train_store: ActivationStore,
    eval_store: ActivationStore,
    ks: Sequence[int] = PROBE_KS,
    max_sequences: int | None = None,
    seed: int = 0,
    dense: bool = True,
    batch_rows: int = 4096,
) -> dict[str, Any]:
    """Sparse probing of ``sae`` on the categories of ``train_store`` / ``eval_store`` (SAEBench-style).

    Pools the SAE latents (:func:`pooled_latents`) of both stores, runs :func:`sparse_probe_accuracy`
    (probes trained on ``train_store``, scored on ``eval_store``) and, if ``dense``, the two activation
    baselines SAEBench also reports: the dense probe on all ``d_in`` pooled residual dimensions
    (:func:`dense_probe_accuracy`) and top-k probes on residual dimensions ("neurons", Gurnee et al. 2023).

    Args:
        sae: the SAE to evaluate (``d_in`` must match the stores').
        train_store, eval_store: activations of the train and eval splits (document-disjoint).
        ks: probe sizes (clipped to ``d_sae`` / ``d_in`` and recorded).
        max_sequences: cap on the labelled sequences used from EACH store (first ones, store order).
        seed: ``random_state`` of every logistic regression.
        dense: also compute the activation baselines (cheap: ``d_in`` = 576 for SmolLM2-135M).
        batch_rows: token rows encoded at once.

    Returns:
        ``{"sae": sparse_probe_accuracy result, "dense": dense_probe_accuracy result or None,
        "activations_top_k": sparse_probe_accuracy result on raw activations or None, "d_sae": int,
        "d_in": int, "max_sequences": max_sequences}``. Per-class keys are the stores' label names.

    Raises:
        ValueError: mismatched ``d_in`` or label lists, fewer than 2 classes in a split, or invalid
            arguments (see the functions above).
    """
    names = _store_class_names(train_store, eval_store)
    ftr, ytr = pooled_latents(sae, train_store, max_sequences, batch_rows)
    fte, yte = pooled_latents(sae, eval_store, max_sequences, batch_rows)
    out: dict[str, Any] = {
        "sae": sparse_probe_accuracy(ftr, ytr, fte, yte, ks=ks, seed=seed, class_names=names),
        "dense": None,
        "activations_top_k": None,
        "d_sae": sae.d_sae,
        "d_in": sae.d_in,
        "max_sequences": max_sequences,
    }
    if dense:
        atr, ytr_a = pooled_activations(train_store, max_sequences, batch_rows)
        ate, yte_a = pooled_activations(eval_store, max_sequences, batch_rows)
        out["dense"] = dense_probe_accuracy(atr, ytr_a, ate, yte_a, seed=seed, class_names=names)
        out["activations_top_k"] = sparse_probe_accuracy(atr, ytr_a, ate, yte_a, ks=ks, seed=seed, class_names=names)
    return out
