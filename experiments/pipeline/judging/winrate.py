"""Win rates from pairwise judgements: counts, win rate with its standard error, and a length-controlled win rate.

Scores are per instruction, from the evaluated model's side, in [0, 1]: 1 = win, 0.5 = tie, 0 = loss, or a continuous
preference (AlpacaEval 2.0's weighted judge). AlpacaEval's preference is 1 + this score (`metrics/helpers.py`):
win rate = mean(score), standard error = sem(score), discrete win rate = (wins + draws / 2) / n with a score > 0.5 a
win and exactly 0.5 a draw.

Length control follows AlpacaEval 2.0's GLM (`alpaca_eval.metrics.glm_winrate`, "length_controlled_v1"): a logistic
regression of the (soft) preference on `tanh(standardised length difference)` plus a per-model intercept and, when
known, the instruction difficulty, with a penalty whose strength is chosen by 5-fold cross-validation on a soft-label
log loss (scikit-learn's GroupKFold over instructions, AlpacaEval's folds), then read at zero length difference and
averaged over instructions; its standard error is AlpacaEval's `lc_standard_error`, the sem of those per-instruction
predictions. Differences from AlpacaEval 2.0 (documented in docs/track3_judging.md):

* AlpacaEval adds the judged rows of two "gamed" baselines (the reference model prompted to be verbose or concise,
  `df_gamed.csv`, fetched from the Hub once and then read from the Hugging Face cache) to every fit's training set,
  each row weighted 0.1 (lambda 0.2 over two baselines); its `instruction_difficulty` column was estimated from
  hundreds of leaderboard models. We fit on the
  judged pair alone, offline. Instruction difficulty is optional: a mapping instruction -> difficulty supplied by the
  user (e.g. AlpacaEval's `instruction_difficulty.csv` joined to its instructions), or estimated from several judged
  models that share the reference (`estimate_instruction_difficulty`). Without it the model is intercept + length.
* AlpacaEval penalises every weight with L1 (liblinear), its intercept (`not_gamed_baseline`) included. Without the
  gamed rows that penalty pulls the LC win rate to 50% whenever the model's advantage is not significant. We use an
  L2 penalty on the length (and difficulty) weights only, with an unpenalised intercept (lbfgs): strong
  regularisation shrinks the length adjustment, so the LC win rate falls back to the raw win rate, not to 50%.
* The length difference is model minus reference (AlpacaEval: baseline minus model); only the sign of the fitted
  weight changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

OUTCOME_SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 4, 10))  # LogisticRegressionCV's default grid (Cs=10)
NO_CV_C = 100.0  # the C of AlpacaEval's fit_LogisticRegressionCV when n_splits=0 (length_controlled_v1 always uses 5)


def win_rate(scores: Sequence[float]) -> dict[str, float | None]:
    """`{"win_rate", "win_rate_se", "n"}`: mean of the scores and its standard error (sample std / sqrt(n)).

    The mean of 1/0.5/0 scores is (wins + ties/2) / n. The standard error is None with fewer than two scores.
    """
    values = np.asarray(scores, dtype=float)
    n = len(values)
    if n == 0:
        return {"win_rate": None, "win_rate_se": None, "n": 0}
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"win_rate": float(values.mean()), "win_rate_se": se, "n": n}


def outcome_of(score: float) -> str:
    """"win", "tie" or "loss" for a model score in [0, 1] (AlpacaEval: a preference above 1.5 wins, 1.5 is a draw)."""
    return "win" if score > 0.5 else "loss" if score < 0.5 else "tie"


def outcome_counts(outcomes: Sequence[str]) -> dict[str, int]:
    """Counts of `win`, `tie`, `loss`, `unparseable` and `skipped` outcomes."""
    counts = {"wins": 0, "ties": 0, "losses": 0, "unparseable": 0, "skipped": 0}
    names = {"win": "wins", "tie": "ties", "loss": "losses", "unparseable": "unparseable", "skipped": "skipped"}
    for outcome in outcomes:
        if outcome not in names:
            raise ValueError(f"Unknown outcome {outcome!r}; expected one of {sorted(names)}.")
        counts[names[outcome]] += 1
    return counts


def standardised_length_difference(model_lengths: Sequence[float], reference_lengths: Sequence[float]) -> np.ndarray:
    """(model length - reference length) / its sample standard deviation (not centred, as in AlpacaEval); zeros when
    every difference is equal."""
    delta = np.asarray(model_lengths, dtype=float) - np.asarray(reference_lengths, dtype=float)
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    return delta / std if std > 0 else np.zeros_like(delta)


def _logistic_regression(C: float):
    """L2-penalised logistic regression with an unpenalised intercept (lbfgs, scikit-learn's default penalty)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, fit_intercept=True, max_iter=1000, tol=1e-8)


def _fit_soft(features: np.ndarray, preferences: np.ndarray, C: float):
    """Fit P(model preferred) on soft labels: each row appears once as class 1 with weight p and once as class 0
    with weight 1 - p (AlpacaEval's duplication trick)."""
    X = np.concatenate([features, features])
    y = np.concatenate([np.ones(len(features)), np.zeros(len(features))])
    weights = np.concatenate([preferences, 1.0 - preferences])
    keep = weights > 0
    return _logistic_regression(C).fit(X[keep], y[keep], sample_weight=weights[keep])


def _soft_log_loss(model, features: np.ndarray, preferences: np.ndarray) -> float:
    p = np.clip(model.predict_proba(features)[:, 1], 1e-15, 1 - 1e-15)
    return float(-np.mean(preferences * np.log(p) + (1 - preferences) * np.log(1 - p)))


def instruction_folds(n: int, folds: int) -> np.ndarray:
    """The fold of each of `n` instructions: scikit-learn's `GroupKFold(folds)` over the soft-label rows (each
    instruction twice, grouped), as AlpacaEval's `fit_LogisticRegressionCV` splits them."""
    from sklearn.model_selection import GroupKFold

    groups = np.concatenate([np.arange(n), np.arange(n)])
    fold_of = np.empty(n, dtype=int)
    for fold, (_, test) in enumerate(GroupKFold(n_splits=folds).split(np.zeros(2 * n), groups=groups)):
        fold_of[groups[test]] = fold
    return fold_of


def choose_C(features: np.ndarray, preferences: np.ndarray, Cs: Sequence[float], folds: int) -> float:
    """The C of `Cs` with the lowest held-out soft log loss over `folds` folds of the instructions
    (`instruction_folds`; the first, i.e. the strongest penalty, on ties). One C: that one; `folds` < 2: `NO_CV_C`."""
    if len(Cs) == 1:
        return float(Cs[0])
    if folds < 2:
        return NO_CV_C
    n = len(preferences)
    if n < 2 * folds:
        raise ValueError(f"Cross-validation with {folds} folds needs at least {2 * folds} instructions, got {n}.")
    fold_of = instruction_folds(n, folds)
    losses = []
    for C in Cs:
        fold_losses = []
        for fold in range(folds):
            train, test = fold_of != fold, fold_of == fold
            if np.all(preferences[train] == 1.0) or np.all(preferences[train] == 0.0):
                fold_losses.append(math.inf)  # a unanimous training fold has no finite fit
                continue
            model = _fit_soft(features[train], preferences[train], C)
            fold_losses.append(_soft_log_loss(model, features[test], preferences[test]))
        losses.append(float(np.mean(fold_losses)))
    return float(Cs[int(np.argmin(losses))])


def length_controlled_win_rate(scores: Sequence[float], model_lengths: Sequence[float],
                               reference_lengths: Sequence[float], *,
                               instruction_difficulty: Sequence[float] | None = None, folds: int = 5,
                               Cs: Sequence[float] = DEFAULT_CS) -> dict:
    """AlpacaEval-style length-controlled win rate of one model against one reference (see the module docstring).

    `scores` are per-instruction preferences for the model in [0, 1]; lengths are in characters (AlpacaEval uses
    `str.len`). Returns `{"win_rate", "win_rate_se", "weights", "C", "n", "note"}` where `win_rate` is the mean
    predicted preference at zero length difference and `win_rate_se` the sem of those per-instruction predictions
    (AlpacaEval's `lc_standard_error`; 0 without instruction difficulty, where every prediction is the same). With fewer than `2 * folds` instructions (and several `Cs`) a length correction cannot
    be estimated: `win_rate` is None and `note` says why. A unanimous outcome (every score 0, or every score 1: no
    finite fit) returns the raw win rate with a `note`.
    """
    preferences = np.asarray(scores, dtype=float)
    n = len(preferences)
    if n == 0:
        return {"win_rate": None, "win_rate_se": None, "weights": {}, "C": None, "n": 0,
                "note": "no judged instructions"}
    if np.any((preferences < 0) | (preferences > 1)):
        raise ValueError("Scores must lie in [0, 1].")
    if len(model_lengths) != n or len(reference_lengths) != n:
        raise ValueError(f"Got {n} scores but {len(model_lengths)} model and {len(reference_lengths)} reference "
                         "lengths.")
    if len(Cs) > 1 and folds >= 2 and n < 2 * folds:
        return {"win_rate": None, "win_rate_se": None, "weights": {}, "C": None, "n": n,
                "note": f"not estimated: {n} judged instructions, {2 * folds} needed for {folds}-fold selection"}
    if n < 2 or np.all(preferences == 1.0) or np.all(preferences == 0.0):
        return {"win_rate": float(preferences.mean()), "win_rate_se": None, "weights": {}, "C": None, "n": n,
                "note": "unanimous outcome (no finite fit): raw win rate"}
    columns = {"tanh_std_delta_len": np.tanh(standardised_length_difference(model_lengths, reference_lengths))}
    if instruction_difficulty is not None:
        difficulty = np.asarray(instruction_difficulty, dtype=float)
        if difficulty.shape != (n,) or not np.all(np.isfinite(difficulty)):
            raise ValueError(f"instruction_difficulty must hold {n} finite numbers.")
        columns["instruction_difficulty"] = difficulty
    features = np.column_stack(list(columns.values()))
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    with threadpool_limits(1):  # tiny fits: BLAS threads only contend (measured 11 s -> 0.3 s on 2 busy cores)
        C = choose_C(features, preferences, Cs, folds)
        model = _fit_soft(features, preferences, C)
    at_zero = features.copy()
    at_zero[:, 0] = 0.0  # tanh(0): no length difference
    predicted = model.predict_proba(at_zero)[:, 1]
    weights = {**dict(zip(columns, map(float, model.coef_[0]))), "intercept": float(model.intercept_[0])}
    note = None
    if length_separates(preferences, columns["tanh_std_delta_len"]):
        note = ("length alone separates wins from losses: the fit is a steep step placed somewhere between them, so "
                "the value at zero length difference is unstable (more pairs, with length differences near zero, "
                "pin it down)")
    return {"win_rate": float(predicted.mean()), "win_rate_se": float(predicted.std(ddof=1) / math.sqrt(n)),
            "weights": weights, "C": C, "n": n, "note": note}


def length_separates(preferences: np.ndarray, length_feature: np.ndarray) -> bool:
    """Whether every clear win (score 1) lies strictly on one side of every clear loss (score 0) in the length
    feature. The fitted slope then grows until the penalty stops it and the intercept (the LC win rate) depends only
    on where the fit puts the step between the two groups: a few pairs far from zero length difference can read
    anywhere from near 0% to near 100%."""
    wins, losses = length_feature[preferences == 1.0], length_feature[preferences == 0.0]
    if len(wins) == 0 or len(losses) == 0:
        return False
    return bool(wins.min() > losses.max() or wins.max() < losses.min())


def estimate_instruction_difficulty(score_sets: Sequence[Mapping[str, float]], prior: float = 1.0) -> dict[str, float]:
    """Instruction difficulty from several models judged against the same reference by the same judge: for each
    instruction, the negated logit of the smoothed mean score across models, `-logit((sum + prior/2) / (k + prior))`
    (higher = harder for the models, as in AlpacaEval where difficulty lowers the win probability of every model).

    `score_sets` holds one `{instruction: score}` mapping per model; instructions absent from some models use the
    models that have them.
    """
    totals: dict[str, list[float]] = {}
    for scores in score_sets:
        for instruction, score in scores.items():
            totals.setdefault(instruction, []).append(float(score))
    difficulty = {}
    for instruction, values in totals.items():
        p = (sum(values) + prior / 2) / (len(values) + prior)
        difficulty[instruction] = -math.log(p / (1 - p))
    return difficulty
