"""Metrics against plain NumPy/SciPy references, hand-computed cases and pipeline.npz item 6."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from conftest import competition_reference

from dwise_jax import metrics


def err(a, b) -> float:
    """The fixture README's measure: max|a - b| / max|b|, NaN positions must match."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    return float(np.nanmax(np.abs(a - b)) / np.nanmax(np.abs(b)))


# --------------------------------------------------------------------------- Pearson


def test_pearson_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 200))
    y = 0.5 * x + rng.normal(size=(7, 200))
    r = metrics.pearson_per_neuron(x, y, -1)
    want = [scipy.stats.pearsonr(a, b).statistic for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(r, want, rtol=1e-7)
    np.testing.assert_allclose(metrics.pearson_per_neuron(x.T, y.T, 0), r, rtol=1e-12)


def test_pearson_hand_cases():
    x = np.array([1.0, 2.0, 3.0])
    assert metrics.pearson_per_neuron(x, np.array([1.0, 3.0, 2.0]), 0) == pytest.approx(0.5)
    assert metrics.pearson_per_neuron(x, 2 * x + 1, 0) == pytest.approx(1.0, abs=1e-7)
    assert metrics.pearson_per_neuron(x, -x, 0) == pytest.approx(-1.0, abs=1e-7)
    assert metrics.pearson_per_neuron(x, np.full(3, 0.5), 0) == 0.0  # constant: eps, not NaN
    nan = np.array([1.0, np.nan, 2.0])
    assert np.isnan(metrics.pearson_per_neuron(x, nan, 0))
    assert metrics.pearson_per_neuron(x, nan, 0, nan_to_zero=True) == 0.0


def test_pearson_keeps_float32():
    x = np.arange(10, dtype=np.float32)
    assert metrics.pearson_per_neuron(x, x, 0).dtype == np.float32
    assert metrics.pearson_per_neuron(x.astype(np.float64), x, 0).dtype == np.float64


def test_nan_case_fixture(pipeline_fixture):
    f, _ = pipeline_fixture
    pred, target = f["metrics/nan_case/pred"], f["metrics/nan_case/target"]
    assert (
        err(metrics.pearson_per_neuron(pred, target, -1), f["metrics/nan_case/winner_corr"]) < 1e-5
    )


# --------------------------------------------------------------------------- frame cuts


@pytest.mark.parametrize("length", [0, 40, 50, 51, 52, 250, 299, 300, 301, 313, 400])
def test_cut_frames_is_the_original_cut(length):
    x = np.arange(2 * 420).reshape(2, 420)[:, :length]
    want = x[..., :300][..., 50:][..., :-1]
    np.testing.assert_array_equal(metrics.cut_frames(x), want)
    padded = np.concatenate([x, np.full((2, 20), -1)], axis=-1)
    np.testing.assert_array_equal(metrics.cut_frames(padded, length), want)
    # a length longer than the array: the original's slicing clamps
    np.testing.assert_array_equal(metrics.cut_frames(x, length + 30), want)


def test_cut_frames_counts():
    assert metrics.cut_frames(np.zeros((3, 300))).shape == (3, 249)
    assert metrics.cut_frames(np.zeros((3, 313))).shape == (3, 249)
    assert metrics.cut_frames(np.zeros((3, 250))).shape == (3, 199)
    assert metrics.submission_frames(300) == slice(50, 299)


# --------------------------------------------------------------------------- competition


def _random_mice(rng, neurons=(5, 3), lengths=((120, 90), (310, 70, 100))):
    preds, targets = {}, {}
    for m, (n, ls) in enumerate(zip(neurons, lengths, strict=True)):
        targets[f"m{m}"] = [rng.gamma(2.0, size=(n, L)) for L in ls]
        preds[f"m{m}"] = [t * 0.5 + rng.gamma(2.0, size=t.shape) for t in targets[f"m{m}"]]
    return preds, targets


def _streamed(preds, targets, **kwargs) -> metrics.CorrelationScores:
    stream = metrics.StreamingCorrelation(**kwargs)
    for mouse in preds:
        for pred, target in zip(preds[mouse], targets[mouse], strict=True):
            stream.add(mouse, pred, target)
    return stream.scores()


@pytest.mark.parametrize("cut", ["baseline", "submission"])
def test_streaming_correlation_reference(cut):
    rng = np.random.default_rng(1)
    preds, targets = _random_mice(rng)
    scores = _streamed(preds, targets, cut=cut)
    want = competition_reference(preds, targets, cut)
    for mouse in preds:
        np.testing.assert_allclose(scores.per_mouse[mouse], want[mouse], rtol=1e-6)
    all_neurons = np.concatenate(list(want.values()))
    assert scores.neuron_mean == pytest.approx(np.mean(all_neurons), rel=1e-6)
    assert scores.mouse_mean == pytest.approx(np.mean([np.mean(w) for w in want.values()]),
                                              rel=1e-6)
    assert scores.neuron_mean != pytest.approx(scores.mouse_mean)  # 5 vs 3 neurons


def test_streaming_correlation_weighting_by_hand():
    t = np.tile(np.arange(60.0), (3, 1))
    preds = {"a": [np.stack([t[0], t[0], -t[0]])], "b": [t[:1].copy()]}
    targets = {"a": [t], "b": [t[:1]]}
    scores = _streamed(preds, targets, skip=0)
    np.testing.assert_allclose(scores.per_neuron, [1, 1, -1, 1], atol=1e-7)
    assert scores.neuron_mean == pytest.approx(0.5, abs=1e-7)  # (1 + 1 - 1 + 1) / 4
    assert scores.mouse_mean == pytest.approx((1 / 3 + 1) / 2, abs=1e-7)


def test_streaming_correlation_equals_the_fixture(pipeline_fixture):
    f, meta = pipeline_fixture
    mice = meta["fake_dataset"]["mice"]
    preds, targets = {}, {}
    for m, name in enumerate(mice):
        trials = meta["metrics"]["trial_order"][str(m)]
        preds[name] = [f[f"metrics/mouse{m}/pred/{t}"] for t in trials]
        targets[name] = [f[f"fake/mouse{m}/responses/{t}"][:, : p.shape[-1]]
                         for t, p in zip(trials, preds[name], strict=True)]
    baseline = _streamed(preds, targets)
    assert err(baseline.per_neuron, f["metrics/baseline/per_neuron"]) < 1e-5
    assert err(baseline.neuron_mean, f["metrics/baseline/mean"]) < 1e-5
    for m, name in enumerate(mice):
        assert err(baseline.per_mouse[name], f[f"metrics/baseline/as_dict/mouse{m}"]) < 1e-5
    winner = _streamed(preds, targets, cut="submission", nan_to_zero=False)
    for m, name in enumerate(mice):
        assert err(winner.per_mouse[name], f[f"metrics/winner_corr/mouse{m}"]) < 1e-5
    assert err(list(winner.mouse_means.values()), f["metrics/oof/mouse_corr"]) < 1e-5
    assert err(winner.mouse_mean, f["metrics/oof/mean"]) < 1e-5
    assert abs(winner.per_mouse[mice[0]][5]) < 1e-6  # the constant prediction
    # NaN in a target: NaN for the winner's r (all frames), 0 in the starter kit's.
    nan = metrics.StreamingCorrelation(skip=0, nan_to_zero=False)
    nan.add("m", f["metrics/nan_case/pred"], f["metrics/nan_case/target"])
    assert err(nan.scores().per_mouse["m"], f["metrics/nan_case/winner_corr"]) < 1e-5
    zero = metrics.StreamingCorrelation()
    zero.add("m", f["metrics/nan_case/pred"], f["metrics/nan_case/target"])
    assert err(zero.scores().per_mouse["m"], f["metrics/nan_case/baseline_corr"]) < 1e-5


def test_streaming_correlation_rejects_mismatch():
    with pytest.raises(ValueError, match="differ"):
        metrics.StreamingCorrelation().add("a", np.zeros((2, 60)), np.zeros((2, 61)))
    with pytest.raises(ValueError, match="cut"):
        metrics.StreamingCorrelation(cut="whole").add("a", np.zeros((2, 60)), np.zeros((2, 60)))


# --------------------------------------------------------------------------- validation


def _corrmetric_batches(f):
    """The fixture's batches, converted to channels-last (batch, time, neurons)."""
    batches = []
    for b in range(2):
        key = f"metrics/corrmetric/batch{b}"
        preds = [f[f"{key}/pred/{i}"].transpose(0, 2, 1) for i in range(2)]
        targets = [f[f"{key}/target/{i}"].transpose(0, 2, 1) for i in range(2)]
        batches.append((preds, targets, f[f"{key}/mice_weights"]))
    return batches


def test_validation_correlation_fixture(pipeline_fixture):
    """The original's val_corr as training computes it (fold_run.validate): per readout, float64
    PearsonSums over the (sample, frame) rows of its own mouse's samples, batch by batch; the
    mean r per readout, then their mean."""
    f, _ = pipeline_fixture
    sums = [metrics.PearsonSums.zeros(f["metrics/corrmetric/batch0/pred/0"].shape[1]),
            metrics.PearsonSums.zeros(f["metrics/corrmetric/batch0/pred/1"].shape[1])]
    for bp, bt, bw in _corrmetric_batches(f):
        for i in range(2):
            keep = bw[:, i] != 0
            n = bp[i].shape[-1]
            sums[i] = sums[i] + metrics.PearsonSums.of(
                bp[i][keep].reshape(-1, n), bt[i][keep].reshape(-1, n))
    per_readout = [float(np.mean(s.correlation())) for s in sums]
    assert err(per_readout, f["metrics/corrmetric/mouse_corr"]) < 1e-5
    assert err(np.mean(per_readout), f["metrics/corrmetric/val_corr"]) < 1e-5


def test_pearson_sums_reference():
    rng = np.random.default_rng(2)
    pred = rng.normal(size=(64, 6))
    target = pred + rng.normal(size=pred.shape)
    sums = metrics.PearsonSums.zeros(6)
    for rows in np.array_split(np.arange(64), 5):
        sums = sums + metrics.PearsonSums.of(pred[rows], target[rows])
    want = [np.corrcoef(a, b)[0, 1] for a, b in zip(pred.T, target.T, strict=True)]
    np.testing.assert_allclose(sums.correlation(), want, rtol=1e-6)
    np.testing.assert_allclose(sums.correlation(), metrics.pearson_per_neuron(pred, target, 0),
                               rtol=1e-9)


def test_pearson_sums_constant_series():
    sums = metrics.PearsonSums.of(
        np.full((50, 2), 3.0), np.random.default_rng(3).normal(size=(50, 2))
    )
    np.testing.assert_allclose(sums.correlation(), 0.0, atol=1e-6)


# --------------------------------------------------------------------------- repeats


def _repeats(rng, videos=3, repeats=(4, 2, 5), neurons=6, frames=(40, 25, 30), noise=0.7):
    signal = [rng.gamma(2.0, size=(neurons, t)) for t in frames[:videos]]
    responses = [
        s + noise * rng.normal(size=(r,) + s.shape) for s, r in zip(signal, repeats, strict=True)
    ]
    return signal, responses


def test_correlation_to_average_reference():
    rng = np.random.default_rng(4)
    signal, responses = _repeats(rng)
    preds = [s + 0.3 * rng.normal(size=s.shape) for s in signal]
    r = metrics.correlation_to_average(preds, responses)
    p = np.concatenate(preds, axis=1)
    mean = np.concatenate([x.mean(0) for x in responses], axis=1)
    want = [scipy.stats.pearsonr(a, b).statistic for a, b in zip(p, mean, strict=True)]
    np.testing.assert_allclose(r, want, rtol=1e-6)
    # A per-repeat prediction is averaged over repeats first.
    per_repeat = [
        np.broadcast_to(x, (len(rs),) + x.shape) + 0 for x, rs in zip(preds, responses, strict=True)
    ]
    np.testing.assert_allclose(metrics.correlation_to_average(per_repeat, responses), r, rtol=1e-12)
    # Predicting the mean itself gives 1.
    np.testing.assert_allclose(
        metrics.correlation_to_average([x.mean(0) for x in responses], responses), 1.0, atol=1e-7
    )


def _feve_reference(preds, responses, explainable=False):
    """neuralpredictors-style FEVE, one 'image' per (video, frame), written with loops (with
    `explainable`: also its denominator, total variance - noise variance, and total variance)."""
    targets, predictions = [], []
    for p, r in zip(preds, responses, strict=True):
        for t in range(r.shape[-1]):
            targets.append(r[:, :, t])  # (repeats, neurons)
            predictions.append(np.broadcast_to(p[..., t], r[:, :, t].shape))
    img_var = np.vstack([np.var(t, axis=0, ddof=1) for t in targets])
    pred_sq = np.vstack([(t - p) ** 2 for t, p in zip(targets, predictions, strict=True)])
    total_var = np.var(np.vstack(targets), axis=0, ddof=1)
    noise_var = img_var.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        feve = 1 - (pred_sq.mean(0) - noise_var) / (total_var - noise_var)
    return (feve, total_var - noise_var, total_var) if explainable else feve


def test_feve_reference():
    rng = np.random.default_rng(5)
    signal, responses = _repeats(rng)
    preds = [s + 0.3 * rng.normal(size=s.shape) for s in signal]
    np.testing.assert_allclose(  # every neuron here has a fraction of explainable variance > 0.5
        metrics.feve(preds, responses), _feve_reference(preds, responses), rtol=1e-10
    )
    per_repeat = [rng.normal(size=r.shape) + s for r, s in zip(responses, signal, strict=True)]
    np.testing.assert_allclose(
        metrics.feve(per_repeat, responses), _feve_reference(per_repeat, responses), rtol=1e-10
    )


def test_feve_hand_cases():
    rng = np.random.default_rng(6)
    signal = [rng.normal(size=(2, 10)) for _ in range(3)]
    noiseless = [np.broadcast_to(s, (3,) + s.shape).copy() for s in signal]
    np.testing.assert_allclose(metrics.feve(signal, noiseless), 1.0)
    # Predicting the grand mean without noise: MSE = total var * (n - 1) / n, FEVE = 1 / n.
    n = 3 * 3 * 10
    grand = np.concatenate(signal, axis=1).mean(1, keepdims=True)
    const = [np.broadcast_to(grand, s.shape) for s in signal]
    np.testing.assert_allclose(metrics.feve(const, noiseless), 1.0 / n, rtol=1e-10)
    with pytest.raises(ValueError):
        metrics.feve([signal[0]], [noiseless[0][:1]])


def test_feve_keeps_the_neurons_the_sensorium_evaluation_keeps():
    """FEVE is scored where the fraction of explainable variance, (total - noise) / total, is at
    least 0.15 (the Sensorium evaluation's threshold); below it, NaN unless the threshold is
    lowered."""
    rng = np.random.default_rng(9)
    signal, responses = _repeats(rng, neurons=2)
    for s, r in zip(signal, responses, strict=True):  # neuron 1: a faint signal in loud noise
        r[:, 1] = 0.1 * s[1] + 2.0 * rng.normal(size=r[:, 1].shape)
    preds = [s + 0.3 * rng.normal(size=s.shape) for s in signal]
    reference, explainable, total = _feve_reference(preds, responses, explainable=True)
    fev = explainable / total
    assert fev[0] > 0.5 and fev[1] < 0.15
    explained = metrics.feve(preds, responses)
    assert explained[0] == pytest.approx(reference[0], rel=1e-10) and np.isnan(explained[1])
    if fev[1] > 0:
        lowered = metrics.feve(preds, responses, fev_threshold=0.0)
        np.testing.assert_allclose(lowered, reference, rtol=1e-10)


def test_feve_and_the_report_where_feve_is_undefined():
    """Neuron 0 carries a signal; neuron 1 is silent (FEVE 0/0); neuron 2 alternates +-1 over
    repeats and frames, so its repeats differ more than its responses do overall (explainable
    variance < 0). FEVE is NaN for both, and the report's FEVE is neuron 0's alone."""
    from dwise_jax import report

    rng = np.random.default_rng(8)
    signal, responses = _repeats(rng, neurons=3)
    for r in responses:
        r[:, 1] = 0.0
        r[:, 2] = (-1.0) ** np.add.outer(np.arange(r.shape[0]), np.arange(r.shape[2]))
    preds = [s + 0.3 * rng.normal(size=s.shape) for s in signal]
    reference, explainable, _ = _feve_reference(preds, responses, explainable=True)
    assert explainable[0] > 0 and explainable[1] == 0 and explainable[2] < -0.1
    explained = metrics.feve(preds, responses)
    assert explained[0] == pytest.approx(reference[0], rel=1e-10)
    assert np.isnan(explained[1:]).all()
    scores = report.repeat_scores(preds, responses)
    assert scores["feve_neurons"] == 1
    assert scores["feve"] == pytest.approx(_feve_reference(preds, responses)[0], rel=1e-10)
    assert np.isfinite(scores["correlation_to_average"])
    silent = report.repeat_scores(preds, [0 * r for r in responses])
    assert silent["feve"] is None and silent["feve_neurons"] == 0


# --------------------------------------------------------------------------- Poisson loss


def test_poisson_loss_reference_and_hand_case():
    rng = np.random.default_rng(7)
    output = [rng.gamma(2.0, size=(4, 120)), rng.gamma(2.0, size=(4, 80))]
    target = [rng.poisson(2.0, size=o.shape).astype(float) for o in output]
    o = np.concatenate([x[:, 50:] for x in output], axis=1)
    t = np.concatenate([x[:, 50:] for x in target], axis=1)
    loss = o - t * np.log(o + 1e-12)
    np.testing.assert_allclose(metrics.poisson_loss(output, target), loss.sum(1), rtol=1e-12)
    np.testing.assert_allclose(
        metrics.poisson_loss(output, target, avg=True), loss.mean(1), rtol=1e-12
    )
    # output = target = 1 on 70 scored frames: 1 - log(1 + 1e-12) per frame.
    ones = np.ones((2, 120))
    np.testing.assert_allclose(metrics.poisson_loss(ones, ones), 70 * (1 - np.log1p(1e-12)))
    np.testing.assert_allclose(metrics.poisson_loss(ones, 0 * ones, skip=0), [120, 120])


# --------------------------------------------------------------------------- the split report


def test_split_report_scores_repeated_videos_and_the_poisson_loss(sim_root, tmp_path):
    """`folds` of the tiny simulated dataset: each mouse's oracle clips repeat. The report's
    correlation to average, FEVE and Poisson loss against references that find the repeats by
    comparing the videos themselves, not by their hashes."""
    from dwise_jax import report
    from dwise_jax.data import folds
    from dwise_jax.data.sensorium import SensoriumDataset

    dataset = SensoriumDataset.open(sim_root)
    scorer = report.SplitScorer(dataset, "folds")
    rng = np.random.default_rng(7)
    want_repeats, want_poisson = {}, {}
    for mouse in dataset.mice:
        groups, cut_pairs = [], []
        for trial in folds.labeled_trials(mouse, range(folds.NUM_FOLDS)):
            target = report.load_target(dataset, "folds", mouse, trial)
            pred = (0.5 * np.clip(target, 0, None)
                    + rng.uniform(0.1, 1.0, target.shape)).astype(np.float32)
            scorer.add(mouse, trial, {1: pred}, main=1)
            video = mouse.load("videos", trial)
            pair = (pred[:, 50:].astype(np.float64), target[:, 50:].astype(np.float64))
            cut_pairs.append(pair)
            for g in groups:
                if np.array_equal(g[0], video, equal_nan=True):
                    g[1].append(pair)
                    break
            else:
                groups.append((video, [pair]))
        repeated = [g[1] for g in groups if len(g[1]) > 1]
        assert repeated  # the tiny dataset has two oracle clips shown twice per mouse
        preds = [np.stack([p for p, _ in g]) for g in repeated]
        responses = [np.stack([t for _, t in g]) for g in repeated]
        mean_p = np.concatenate([p.mean(0) for p in preds], axis=1)
        mean_r = np.concatenate([r.mean(0) for r in responses], axis=1)
        cta = [scipy.stats.pearsonr(a, b).statistic for a, b in zip(mean_p, mean_r, strict=True)]
        feve, explainable, total = _feve_reference(preds, responses, explainable=True)
        kept = (explainable > 0) & (explainable >= 0.15 * total)  # the Sensorium evaluation's
        want_repeats[mouse.name] = (len(repeated), sum(map(len, repeated)), np.mean(cta),
                                    np.mean(feve[kept]) if kept.any() else None, int(kept.sum()))
        losses = np.concatenate([p - t * np.log(p + 1e-12) for p, t in cut_pairs], axis=1)
        want_poisson[mouse.name] = losses.mean()
    scores = scorer.summary()
    for name, (videos, trials, cta, feve, neurons) in want_repeats.items():
        got = scores.repeats[name]
        assert (got["videos"], got["trials"], got["feve_neurons"]) == (videos, trials, neurons)
        assert got["correlation_to_average"] == pytest.approx(cta, rel=1e-5)
        assert got["feve"] == pytest.approx(feve, rel=1e-5)
        assert scores.poisson[name] == pytest.approx(want_poisson[name], rel=1e-5)
    text = report.write_report(tmp_path, scores, scorer.examples, {}).read_text()
    assert "## Repeated videos" in text and "FEVE" in text
