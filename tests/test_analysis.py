"""Marginals (Eq. 7), strategy sampling, ranking with inherited weights."""

import json
import os

import numpy as np
import pytest

from stfusion_tf.analysis import marginals as M
from stfusion_tf.analysis import ranking
from stfusion_tf.data import pipeline
from stfusion_tf.model import template as T
from stfusion_tf.model.strategy import FusionStrategy


def test_marginals_match_hand_computation_and_sum_to_one():
    p = np.array([[0.0, 0.0], [0.25, 0.04], [0.49, 1.0], [0.09, 0.36]])
    m = M.marginals(p)
    ms, mt = 1 - np.sqrt(p[:, 0]), 1 - np.sqrt(p[:, 1])
    # Row 1 by hand: m_S = 0.5, m_T = 0.8.
    np.testing.assert_allclose(m[1], [0.5 * 0.2, 0.5 * 0.8, 0.5 * 0.8, 0.5 * 0.2])
    np.testing.assert_allclose(m[:, 0], ms * (1 - mt))
    np.testing.assert_allclose(m[:, 1], (1 - ms) * mt)
    np.testing.assert_allclose(m[:, 2], ms * mt)
    np.testing.assert_allclose(m.sum(1), 1.0)
    np.testing.assert_allclose(m[0], [0, 0, 1, 0])
    with pytest.raises(ValueError):
        M.marginals([[1.2, 0.1]])


def test_marginal_files_and_plot():
    rows = M.marginals_table(["B1.L1", "T1"], [[0.1, 0.2], [0.3, 0.4]])
    assert M.to_csv(rows).splitlines()[0] == "position,p_S,p_T,S,ST,S+ST,none"
    assert json.loads(M.to_json(rows))[1]["position"] == "T1"
    png = M.plot(["B1.L1", "T1"], [[0.1, 0.2], [0.3, 0.4]],
                 best=FusionStrategy(("B1.L1", "T1"), ("S", "ST")))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_warns_when_the_gates_switched_on_before_the_template_learned(tmp_path):
    """Chance-level train accuracy at the end of the warm-up (fine motion, 1 of 3 seeds with
    8 warm-up epochs) is named in the drop-rate verdict; a learned warm-up is not."""
    from stfusion_tf import files
    from stfusion_tf.analysis import report
    model = T.build_template(T.preset("tiny"), 4)
    rates = T.TemplateGates(model).drop_rates()
    for acc, warned in ((0.27, True), (0.9, False)):
        files.write_json(str(tmp_path / "train_summary.json"),
                         {"warmup_end": {"epoch": 8, "train_accuracy": acc}})
        moved = report._movement(model, str(tmp_path), rates)
        assert ("before the template had learned" in moved["verdict"]) == warned
        assert ("warmup_warning" in moved) == warned
    assert M.warmup_check(None, 4) is None


def test_sample_frequencies_match_drop_rates():
    p = np.array([[0.05, 0.5], [0.3, 0.9], [0.7, 0.2]])
    masks = ranking.sample_masks(p, 4000, seed=3)
    drop_freq = 1 - masks.mean(0)
    se = np.sqrt(p * (1 - p) / 4000)
    assert np.all(np.abs(drop_freq - p) < 4 * se + 1e-9)
    np.testing.assert_array_equal(masks, ranking.sample_masks(p, 4000, seed=3))
    assert not np.array_equal(masks, ranking.sample_masks(p, 4000, seed=4))


@pytest.fixture(scope="module")
def scorer(motion_dir):
    model = T.build_template(T.preset("tiny"), 4)
    gates = T.TemplateGates(model)
    for i, g in enumerate(gates.s + gates.t):
        g.p_logit.assign(-2.0 + 0.2 * i)
    ds = pipeline.eval_dataset(motion_dir, "val", pipeline.InputConfig(batch_size=8))
    return ranking.StrategyScorer(model, gates, ds)


def test_mask_scoring_equals_the_fixed_strategy_network(scorer, motion_dir):
    """Scoring through masks == the DenseNet-3D built with that strategy and the same weights."""
    from stfusion_tf import evaluation
    gates = scorer.gates
    st = ranking.sample_strategies(gates.positions, gates.drop_rates(), 1, seed=11)[0]
    if "none" in st.units:  # a gate-free network cannot express "none"
        st = FusionStrategy(st.positions, tuple("S+ST" if u == "none" else u for u in st.units))
    via_mask = scorer.score(st)
    fixed_model = T.strategy_network(scorer.model, st)
    fixed = evaluation.evaluate(fixed_model, pipeline.eval_dataset(
        motion_dir, "val", pipeline.InputConfig(batch_size=8)))
    assert via_mask["video_top1"] == fixed["video_top1"]
    assert via_mask["clip_top1"] == fixed["clip_top1"]


def test_ranking_resumes_without_rescoring_and_never_retraces(scorer, tmp_path):
    gates = scorer.gates
    path = str(tmp_path / "ranking.jsonl")
    rates = gates.drop_rates()
    calls = []
    real = scorer.score

    def counting(st):
        calls.append(st.key())
        return real(st)

    scorer.score = counting
    try:
        full = ranking.rank(scorer, gates.positions, rates, 12, 5, path, log=lambda *a: None)
        unique = len({r["key"] for r in full})
        assert len(calls) == unique
        # Simulate an interruption: keep 5 rows and a torn last line.
        lines = open(path).read().splitlines()
        with open(path, "w") as f:
            f.write("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
        calls.clear()
        again = ranking.rank(scorer, gates.positions, rates, 12, 5, path, log=lambda *a: None)
    finally:
        scorer.score = real
    done_keys = {json.loads(l)["key"] for l in lines[:5]}
    assert not done_keys & set(calls)  # finished strategies were not scored again
    assert [r["key"] for r in again] == [r["key"] for r in full]
    assert len(open(path).read().splitlines()) == 12
    assert scorer.trace_count <= 2  # one trace per batch shape (full and last batch)
    assert full[0]["video_top1"] >= full[-1]["video_top1"]
    assert os.path.exists(path)


def test_bn_recalibration_re_estimates_statistics_and_restores_them(motion_dir):
    import tensorflow as tf
    model = T.build_template(T.preset("tiny"), 4)
    gates = T.TemplateGates(model)
    cfg = pipeline.InputConfig(batch_size=8)
    recal = pipeline.train_dataset(motion_dir, "train", cfg).take(1)
    plain = ranking.StrategyScorer(model, gates, pipeline.eval_dataset(motion_dir, "val", cfg))
    recal_scorer = ranking.StrategyScorer(model, gates, pipeline.eval_dataset(motion_dir, "val", cfg),
                                          recalibration=recal)
    bn = model.get_layer("stem_bn")
    before = np.asarray(bn.moving_mean).copy()
    st = FusionStrategy.uniform(gates.positions, "ST")
    # Fresh template: moving statistics are still (0, 1); re-calibration changes the scores'
    # inputs, and the template's statistics are put back afterwards.
    captured = {}
    real = recal_scorer._forward

    def spy(mask, x):
        captured.setdefault("mean", np.asarray(bn.moving_mean).copy())
        return real(mask, x)

    recal_scorer._forward = spy
    recal_scorer.score(st)
    np.testing.assert_array_equal(np.asarray(bn.moving_mean), before)
    assert not np.allclose(captured["mean"], before)
    # With one batch, the de-biased moving mean is exactly that batch's mean of the stem
    # convolution's output.
    x = recal_scorer.recal_batches[0]
    stem = model.get_layer("stem_conv")(model.get_layer("stem_pad")(model.get_layer("input_norm")(x)))
    np.testing.assert_allclose(captured["mean"], tf.reduce_mean(stem, axis=[0, 1, 2, 3]).numpy(),
                               rtol=1e-3, atol=1e-5)
    assert plain.score(st)["num_videos"] == 16


def test_fidelity_rank_correlation_and_its_undefined_case(tmp_path):
    from stfusion_tf.analysis import fidelity
    pos = ("B1.L1", "T1")
    (tmp_path / "analysis").mkdir()
    rows = [{"index": i, "key": k, "code": k, "units": u, "video_top1": a, "clip_top1": a}
            for i, (k, u, a) in enumerate([("SF", ["S", "S+ST"], 0.9), ("TF", ["ST", "S+ST"], 0.6),
                                           ("FF", ["S+ST", "S+ST"], 0.3)])]
    (tmp_path / "analysis/ranking.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def train(acc):
        def fn(strategy, run_dir):
            return {"steps": 1, "eval": {"val": {"video_top1": acc[strategy.key()], "clip_top1": 0.0}}}
        return fn

    rep = fidelity.run(str(tmp_path), pos, 3, train({"SF": 0.8, "TF": 0.5, "FF": 0.2}), log=lambda *a: None)
    assert rep["kendall_tau"] == pytest.approx(1.0) and rep["spearman_rho"] == pytest.approx(1.0)
    (tmp_path / "analysis/fidelity.jsonl").unlink()
    rep = fidelity.run(str(tmp_path), pos, 3, train({"SF": 1.0, "TF": 1.0, "FF": 1.0}), log=lambda *a: None)
    assert rep["kendall_tau"] is None and "undefined" in rep["verdict"]
    assert "do not separate them" in (tmp_path / "analysis/fidelity.md").read_text()


def test_uniform_fidelity_pool_covers_the_whole_space_whatever_was_learned(motion_dir, tmp_path):
    """--fidelity_pool=uniform: strategies drawn at drop rate 0.5 even where the template
    learned to keep a branch (p = 0.02), ranked with inherited weights into their own
    files; the learned pool's files are not touched."""
    from stfusion_tf.analysis import fidelity, report
    model = T.build_template(T.preset("tiny"), 4)
    gates = T.TemplateGates(model)
    for g in gates.s + gates.t:
        g.p_logit.assign(-4.0)  # p ~ 0.018: the learned pool would keep nearly everything
    cfg = report.AnalysisConfig(num_samples=40, selection_split="val", report_split="test")
    rows = report.uniform_ranking(model, motion_dir, str(tmp_path), pipeline.InputConfig(batch_size=8),
                                  cfg, log=lambda *a: None)
    assert len(rows) == 40 and (tmp_path / "analysis/ranking_uniform.jsonl").exists()
    kept = np.array([[u in ("S", "S+ST") for u in r["units"]] + [u in ("ST", "S+ST") for u in r["units"]]
                     for r in rows], float)
    # Uniform over the units a DenseNet position can hold (S, ST, S+ST: a branch is kept
    # with probability 2/3), not ~0.98; never 'none' (no residual path to fall back to).
    assert 0.55 < kept.mean() < 0.78
    assert not any("none" in r["units"] for r in rows)
    assert all("macs" in r and 0.0 <= r["video_top1"] <= 1.0 for r in rows)
    rep = fidelity.run(str(tmp_path), gates.positions, 3,
                       lambda st, d: {"steps": 1, "eval": {"val": {"video_top1": st.counts()["S"] / 10,
                                                                    "clip_top1": 0.0}}},
                       log=lambda *a: None, pool="uniform", ranked=rows,
                       recalibrated_fn=lambda st: st.counts()["S"] / 10)
    assert rep["pool"] == "uniform" and rep["num_strategies"] == 3
    if len({r["standalone_video_top1"] for r in rep["strategies"]}) > 1:
        assert rep["recalibrated"]["kendall_tau"] == pytest.approx(1.0)
    assert "re-calibrated" in (tmp_path / "analysis/fidelity_uniform.md").read_text()
    assert (tmp_path / "analysis/fidelity_uniform.md").exists()
    assert not (tmp_path / "analysis/fidelity.json").exists()
    assert not (tmp_path / "analysis/ranking.jsonl").exists()


def test_generalization_trains_each_network_once_and_resumes(tmp_path):
    from stfusion_tf.analysis import generalization as GZ
    runs = GZ.plan(["resnet_tiny"], ["S+ST", "S+ST,S+ST,S+ST,S+ST", "S"], "ss", str(tmp_path))
    calls = []

    def train(cfg, st, run_dir, seed):
        calls.append(st.code())
        acc = (0.9 if st.units[0] == "S+ST" else 0.4) - 0.1 * seed
        return {"steps": 1, "params_trainable": 1000,
                "eval": {"test": {"clip_top1": acc, "video_top1": acc, "num_videos": 8}}}

    table = GZ.run(str(tmp_path), runs, train, log=lambda *a: None)
    assert calls == ["F|F|F|F", "S|S|S|S"]  # the per-stage spec is the same network as S+ST
    assert table["results"][1]["same_as"] == "S+ST" and table["results"][1]["video_top1"] == 0.9
    md = (tmp_path / "analysis/generalization.md").read_text()
    assert "| resnet_tiny | 90.0 (90.0) | 90.0 (90.0) = S+ST | 40.0 (40.0) |" in md
    calls.clear()
    assert GZ.run(str(tmp_path), runs, train, log=lambda *a: None)["results"] == table["results"]
    assert calls == []
    # Two seeds per cell: each network trained twice, mean and std reported.
    runs2 = GZ.plan(["resnet_tiny"], ["S+ST", "S"], "ss", str(tmp_path), seeds=2)
    table = GZ.run(str(tmp_path / "two"), runs2, train, log=lambda *a: None)
    assert calls == ["F|F|F|F", "F|F|F|F", "S|S|S|S", "S|S|S|S"]
    cell = next(c for c in table["cells"] if c["spec"] == "S+ST")
    assert cell["seeds"] == 2 and cell["video_top1"] == pytest.approx(0.85)
    assert cell["video_top1_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert "85.0 ± 7.1" in (tmp_path / "two/analysis/generalization.md").read_text()


def test_aggregate_over_seeds_means_spreads_and_consensus(tmp_path):
    import json
    from stfusion_tf.analysis import aggregate, marginals
    positions = ["B1.L1", "T1", "B2.L1"]
    opts = [("S+ST", "ST", "S"), ("S+ST", "ST", "ST"), ("ST", "ST", "S")]
    rates = [np.array([[0.1, 0.2], [0.9, 0.01], [0.3, 0.6]]),
             np.array([[0.2, 0.1], [0.8, 0.02], [0.5, 0.2]]),
             np.array([[0.3, 0.3], [0.7, 0.03], [0.1, 0.9]])]
    runs = []
    for i, (units, r) in enumerate(zip(opts, rates)):
        d = tmp_path / f"seed{i}" / "analysis"
        d.mkdir(parents=True)
        (d / "marginals.json").write_text(json.dumps(marginals.marginals_table(positions, r)))
        opt = FusionStrategy(tuple(positions), units)
        (d / "summary.json").write_text(json.dumps({"opt": opt.to_dict()}))
        runs.append(str(tmp_path / f"seed{i}"))
    out = aggregate.aggregate(runs, str(tmp_path / "agg"))
    row = out["rows"][2]
    m = np.stack([marginals.marginals(r) for r in rates])
    assert row["S"][0] == pytest.approx(m[:, 2, 0].mean()) and row["S"][1] == pytest.approx(m[:, 2, 0].std())
    assert row["p_T"][0] == pytest.approx(np.mean([0.6, 0.2, 0.9]))
    assert out["consensus"]["units"] == ["S+ST", "ST", "S"]
    assert [r["agreement"] for r in out["rows"]] == pytest.approx([2 / 3, 1.0, 2 / 3])
    for f in ("marginals.json", "marginals.csv", "marginals.png", "consensus_strategy.json",
              "aggregate.md"):
        assert (tmp_path / "agg" / f).exists(), f
    with pytest.raises(ValueError, match="run --mode=analyze"):
        aggregate.aggregate(runs + [str(tmp_path / "missing")], str(tmp_path / "agg2"))
def test_budgeted_opt_never_exceeds_the_budget_and_the_report_shows_costs(motion_dir, tmp_path):
    from stfusion_tf.analysis import cost, report
    from stfusion_tf.errors import UserError
    model = T.build_template(T.preset("tiny"), 4)
    gates = T.TemplateGates(model)
    rng = np.random.default_rng(4)
    for g in gates.s + gates.t:
        g.p_logit.assign(rng.uniform(-1.5, 0.5))
    costs = cost.template_costs(model.config, 4)
    sampled = [costs.row(s) for s in ranking.sample_strategies(gates.positions,
                                                               gates.drop_rates(), 12, 0)]
    macs = sorted(r["macs"] for r in sampled)
    icfg = pipeline.InputConfig(batch_size=8)
    # A budget no sample meets stops before anything is scored or written.
    low = report.AnalysisConfig(num_samples=12, selection_split="val", report_split="test",
                                max_gmacs=(macs[0] - 1) / 1e9)
    with pytest.raises(UserError, match="cheapest of the 12 samples needs"):
        report.analyze(model, motion_dir, str(tmp_path), icfg, low, log=lambda *a: None)
    assert not (tmp_path / "analysis" / "ranking.jsonl").exists()
    budget_macs = macs[len(macs) // 3]
    cfg = report.AnalysisConfig(num_samples=12, selection_split="val", report_split="test",
                                max_gmacs=budget_macs / 1e9)
    res = report.analyze(model, motion_dir, str(tmp_path), icfg, cfg, log=lambda *a: None)
    rows = [json.loads(l) for l in open(tmp_path / "analysis" / "ranking.jsonl")]
    assert all(r["macs"] == costs.row(FusionStrategy(gates.positions, tuple(r["units"])))["macs"]
               for r in rows)
    opt = FusionStrategy.load(str(tmp_path / "analysis" / "opt_strategy.json"))
    assert costs.of(opt).macs <= budget_macs
    within = [r for r in rows if r["macs"] <= budget_macs]
    assert res["cost"]["opt"]["video_top1"] == max(r["video_top1"] for r in within)
    assert res["cost"]["unconstrained_opt"]["video_top1"] == max(r["video_top1"] for r in rows)
    s_budget = res["cost"]["at_uniform_budgets"][0]
    assert s_budget["unit"] == "S" and (s_budget["best"] is None or
                                        s_budget["best"]["macs"] <= s_budget["macs"])
    png = (tmp_path / "analysis" / "cost_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "analysis" / "report.md").read_text()
    assert "![accuracy vs MACs](cost_accuracy.png)" in md and "**Budget**" in md
    assert "## Worst classes" in md and "Pareto front" in md
    classes = json.loads((tmp_path / "analysis" / "opt_classes.json").read_text())
    assert sum(map(sum, classes["confusion_matrix"])) == 16  # every test video, once
    assert classes["accuracy"] == pytest.approx(res["comparison"]["Opt"]["video_top1"])
